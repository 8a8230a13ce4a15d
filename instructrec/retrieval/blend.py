"""A weighted sum of per-user normalised retriever scores, weights chosen on validation.

Raw scores live on different scales (SASRec logits, co-occurrence counts), so each component's row is
normalised first; z-scoring over the catalogue keeps a component's contrast without letting one huge count
dominate. The first component's weight is fixed at 1; the others are tuned on the validation targets
(full ranking, history masked, NDCG@10), one at a time over a grid.

Tuning never holds a [users × items] matrix: each coordinate's grid is tried on a chunk of validation users
at a time, keeping only every trial's target ranks (so the result is the whole-matrix result exactly), and
when the validation users are many a seeded sample of `valid_users` of them stands for all.

A blend is not a single dot product, so it is not a vector retriever: it scores the whole catalogue
in-process for the histories it is given, or rescoring a vector retriever's over-fetched candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from instructrec.data.split import LeaveOneOut
from instructrec.evaluation.metrics import ndcg
from instructrec.evaluation.protocols import (
    RowScorer,
    retriever_rows,
    sample_users,
    score_chunks,
    target_ranks,
)
from instructrec.retrieval.base import Histories, Retriever, load_retriever, read_config, write_config

Normalisation = Literal["zscore", "minmax", "none"]
WEIGHT_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)
# Validation users the weights are tuned on: every one up to this many, else a seeded sample of this many
# (NDCG@10 over 10,000 users has a standard error near 0.002, finer than the grid's steps).
VALID_USERS = 10_000


def normalise(scores: np.ndarray, how: Normalisation = "zscore") -> np.ndarray:
    """Row-wise normalisation of a [users × items] score matrix."""
    scores = np.asarray(scores, dtype=np.float32)
    if how == "zscore":
        std = scores.std(axis=1, keepdims=True)
        return (scores - scores.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
    if how == "minmax":
        low, high = scores.min(axis=1, keepdims=True), scores.max(axis=1, keepdims=True)
        return (scores - low) / np.where(high > low, high - low, 1.0)
    return scores


def tune_scorers(
    components: Sequence[RowScorer],
    targets: Sequence[int],
    histories: Histories,
    grid: Sequence[float] = WEIGHT_GRID,
    how: Normalisation = "zscore",
    k: int = 10,
    chunk: int | None = None,
) -> tuple[list[float], float]:
    """Weights (first fixed at 1) maximising NDCG@k of the blended scores, and that NDCG.

    Coordinate ascent, one pass in component order: exact for two components, a good start beyond. Each
    coordinate scores the users once, `chunk` at a time, trying its current weight and the whole grid.
    """
    weights = [1.0] + [0.0] * (len(components) - 1)
    if len(components) == 1:  # nothing to tune
        (ranks,) = _trial_ranks(components, weights, 0, [1.0], targets, histories, how, chunk)
        return weights, _quality(ranks, k)
    best = -1.0
    for i in range(1, len(components)):
        trials = [weights[i], *grid]
        qualities = [
            _quality(r, k)
            for r in _trial_ranks(components, weights, i, trials, targets, histories, how, chunk)
        ]
        best = qualities[0]  # the current weights (from the previous coordinate, or the start)
        for w, value in zip(grid, qualities[1:], strict=True):
            if value > best:
                best, weights = value, [*weights[:i], w, *weights[i + 1 :]]
    return weights, best


def _trial_ranks(
    components: Sequence[RowScorer],
    weights: Sequence[float],
    i: int,
    trials: Sequence[float],
    targets: Sequence[int],
    histories: Histories,
    how: Normalisation,
    chunk: int | None,
) -> np.ndarray:
    """[trials × users] target ranks (history masked) of the blend with component i weighted by each trial
    and the others by `weights` (in one ascent pass those are the components before i: the later ones are
    still 0), a chunk of users at a time."""
    targets = np.asarray(targets, dtype=np.int64)
    others = [(w, c) for j, (w, c) in enumerate(zip(weights, components, strict=True)) if j != i and w]
    parts = []
    for rows, scores in score_chunks(components[i], len(targets), chunk):
        own = normalise(scores, how)
        base = _weighted_sum([(w, normalise(c(rows), how)) for w, c in others])
        blends = (w * own if base is None else base + w * own for w in trials)
        parts.append(np.stack([target_ranks(b, targets[rows], histories[rows]) for b in blends]))
    return np.concatenate(parts, axis=1)


def _weighted_sum(parts: Sequence[tuple[float, np.ndarray]]) -> np.ndarray | None:
    total = None
    for weight, scores in parts:
        total = weight * scores if total is None else total + weight * scores
    return total


def _quality(ranks: np.ndarray, k: int) -> float:
    return float(ndcg(ranks, k).mean())


class Blend:
    kind = "blend"

    def __init__(
        self,
        components: Sequence[Retriever],
        weights: Sequence[float] | None = None,
        normalisation: Normalisation = "zscore",
        grid: Sequence[float] = WEIGHT_GRID,
        valid_users: int | None = VALID_USERS,
        seed: int = 0,
    ) -> None:
        self.components = list(components)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.components)
        self.normalisation = normalisation
        self.grid = tuple(grid)
        self.valid_users, self.seed = valid_users, seed  # tuning's sample of validation users
        self.valid_ndcg10: float | None = None

    def fit(self, split: LeaveOneOut, fit_components: bool = True) -> Blend:
        """Fit every component (unless already fitted), then tune the weights on validation."""
        if fit_components:
            for component in self.components:
                component.fit(split)
        return self.tune(split.histories("valid"), split.targets("valid"))

    def tune(self, histories: Histories, targets: Sequence[int], chunk: int | None = None) -> Blend:
        """Weights on (a seeded sample of `valid_users` of) these validation users, `chunk` users at a time."""
        users = sample_users(len(targets), self.valid_users, self.seed)
        histories, targets = [histories[u] for u in users], [targets[u] for u in users]
        scorers = [retriever_rows(component, histories) for component in self.components]
        self.weights, self.valid_ndcg10 = tune_scorers(
            scorers, targets, histories, self.grid, self.normalisation, chunk=chunk
        )
        return self

    def score(self, histories: Histories) -> np.ndarray:
        # zero-weight components are skipped, but the first always scores: there is always a matrix
        parts = [
            (weight, normalise(component.score(histories), self.normalisation))
            for i, (weight, component) in enumerate(zip(self.weights, self.components, strict=True))
            if weight or i == 0
        ]
        return _weighted_sum(parts)

    def save(self, directory: str | Path) -> None:
        config = {
            "weights": self.weights,
            "normalisation": self.normalisation,
            "valid_ndcg10": self.valid_ndcg10,
        }
        directory = write_config(directory, self.kind, {**config, "components": len(self.components)})
        for i, component in enumerate(self.components):
            component.save(directory / f"component-{i}")

    @classmethod
    def load(cls, directory: str | Path) -> Blend:
        config = read_config(directory)
        components = [load_retriever(Path(directory) / f"component-{i}") for i in range(config["components"])]
        blend = cls(components, config["weights"], config["normalisation"])
        blend.valid_ndcg10 = config.get("valid_ndcg10")
        return blend
