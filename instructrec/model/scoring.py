"""Scoring rendered instructions with a reranker, in batches, without gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from instructrec.instructions import Instruction
from instructrec.model.batch import Tokenizer
from instructrec.model.reranker import Reranker


def score(
    reranker: Reranker,
    instructions: Sequence[Instruction],
    title_of: Callable[[int], str],
    row_of: Callable[[int], int],
    batch_size: int = 32,
    tokenizer: Tokenizer | None = None,
    text_of: Callable[[int], str] | None = None,
) -> list[np.ndarray]:
    """One score per candidate of each instruction, in the instruction's candidate order (`text_of`: the
    candidates' descriptions, default their titles)."""
    tokenizer = tokenizer or reranker.text_tokenizer()
    was_training = reranker.training
    reranker.eval()
    # Similar lengths together: padding is most of the cost of a mixed batch.
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i].parts))
    by_position: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = tokenizer.collate([instructions[i] for i in chunk], title_of, row_of, text_of)
            scores = reranker(batch).float().cpu().numpy()
            for row, i in enumerate(chunk):
                by_position[i] = scores[row, : len(instructions[i].candidates)].copy()
    reranker.train(was_training)
    return [by_position[i] for i in range(len(instructions))]


def fuse(rerank: np.ndarray, retrieval: np.ndarray, weight: float) -> np.ndarray:
    """Product of experts over one candidate list: the reranker's log-probabilities plus `weight` times the
    retriever's. Both are listwise softmax scores, so log-softmax puts them on one scale; weight 0 is the
    reranker alone."""
    return _log_softmax(np.asarray(rerank, dtype=np.float64)) + weight * _log_softmax(
        np.asarray(retrieval, dtype=np.float64)
    )


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
