"""Ranking metrics from the 0-based rank of each user's single target, plus coverage and diversity of served lists.

With one relevant item per user, HR@k and Recall@k are the same number (the target is in the top k or not);
both names are reported so tables line up with papers that use either. NDCG@k is 1 / log2(rank + 2) when
rank < k (the ideal DCG is 1), MRR@k is 1 / (rank + 1) when rank < k. A rank is the number of items placed
before the target, so rank 0 means first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import combinations

import numpy as np

KS = (1, 5, 10)  # the cut-offs every ranker is reported at
RECALL_KS = (20, 50)  # extra cut-offs for retrievers: Recall@K bounds what a reranker of the top K can reach


def hit(ranks: np.ndarray, k: int) -> np.ndarray:
    """1 where the target is in the top k, else 0 (per user)."""
    return (np.asarray(ranks) < k).astype(np.float64)


def ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def mrr(ranks: np.ndarray, k: int) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / (ranks + 1.0), 0.0)


def ranking_metrics(
    ranks: np.ndarray, ks: Iterable[int] = KS, recall_ks: Iterable[int] = ()
) -> dict[str, float]:
    """Mean metrics over users: {"NDCG@k", "Recall@k", "HR@k", "MRR@k"} for each k in `ks`, and only
    "Recall@k" for each k in `recall_ks`."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no ranks to aggregate")
    out: dict[str, float] = {}
    for k in ks:
        out[f"NDCG@{k}"] = float(ndcg(ranks, k).mean())
        out[f"Recall@{k}"] = float(hit(ranks, k).mean())
        out[f"HR@{k}"] = out[f"Recall@{k}"]
        out[f"MRR@{k}"] = float(mrr(ranks, k).mean())
    for k in recall_ks:
        out[f"Recall@{k}"] = float(hit(ranks, k).mean())
    return out


def coverage(lists: Iterable[Sequence[int]], n_items: int) -> float:
    """Share of the catalogue that appears in at least one served list."""
    seen = {item for served in lists for item in served}
    return len(seen) / n_items


def intra_list_diversity(lists: Iterable[Sequence[int]], genres: Sequence[Iterable[str]]) -> float:
    """Mean over lists of the mean pairwise Jaccard distance between the items' genre sets.

    0 means every list repeats one genre profile, 1 means no two items in a list share a genre. Items with
    no genres count as distance 1 from everything (nothing says they are alike). Lists shorter than 2 are
    skipped.
    """
    sets = [frozenset(g) for g in genres]
    per_list = []
    for served in lists:
        pairs = list(combinations(served, 2))
        if not pairs:
            continue
        distances = [1.0 - _jaccard(sets[a], sets[b]) for a, b in pairs]
        per_list.append(sum(distances) / len(distances))
    return float(np.mean(per_list)) if per_list else 0.0


def _jaccard(a: frozenset, b: frozenset) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 0.0
