"""Metrics and evaluation protocols (full ranking, reranked full ranking, sampled candidates)."""

from instructrec.evaluation.metrics import coverage, intra_list_diversity, ranking_metrics
from instructrec.evaluation.protocols import (
    evaluate_full,
    evaluate_reranked,
    evaluate_sampled,
    matrix_scorer,
    reranked_ranks,
    sample_candidates,
    sampled_ranks,
    target_ranks,
    top_k,
)

__all__ = [
    "coverage",
    "evaluate_full",
    "evaluate_reranked",
    "evaluate_sampled",
    "intra_list_diversity",
    "matrix_scorer",
    "ranking_metrics",
    "reranked_ranks",
    "sample_candidates",
    "sampled_ranks",
    "target_ranks",
    "top_k",
]
