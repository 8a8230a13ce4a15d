"""A weighted sum of per-user normalised retriever scores, weights chosen on validation.

Raw scores live on different scales (SASRec logits, co-occurrence counts), so each component's row is
normalised first; z-scoring over the catalogue keeps a component's contrast without letting one huge count
dominate. The first component's weight is fixed at 1; the others are tuned on the validation targets
(full ranking, history masked, NDCG@10), one at a time over a grid.

A blend is not a single dot product, so it is not a vector retriever: it scores the whole catalogue
in-process (cheap at this scale), or rescoring a vector retriever's over-fetched candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from instructrec.data.split import LeaveOneOut
from instructrec.evaluation.metrics import ndcg
from instructrec.evaluation.protocols import target_ranks
from instructrec.retrieval.base import Histories, Retriever, load_retriever, read_config, write_config

Normalisation = Literal["zscore", "minmax", "none"]
WEIGHT_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)


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


def tune_weights(
    components: Sequence[np.ndarray],
    targets: Sequence[int],
    histories: Histories,
    grid: Sequence[float] = WEIGHT_GRID,
    how: Normalisation = "zscore",
    k: int = 10,
) -> tuple[list[float], float]:
    """Weights (first fixed at 1) maximising NDCG@k of the blended scores, and that NDCG.

    Coordinate ascent, one pass in component order: exact for two components, a good start beyond.
    """
    normalised = [normalise(s, how) for s in components]
    weights = [1.0] + [0.0] * (len(normalised) - 1)

    def quality(ws: list[float]) -> float:
        blended = sum(w * s for w, s in zip(ws, normalised, strict=True))
        return float(ndcg(target_ranks(blended, targets, histories), k).mean())

    best = quality(weights)
    for i in range(1, len(weights)):
        for w in grid:
            trial = [*weights[:i], w, *weights[i + 1 :]]
            value = quality(trial)
            if value > best:
                best, weights = value, trial
    return weights, best


class Blend:
    kind = "blend"

    def __init__(
        self,
        components: Sequence[Retriever],
        weights: Sequence[float] | None = None,
        normalisation: Normalisation = "zscore",
        grid: Sequence[float] = WEIGHT_GRID,
    ) -> None:
        self.components = list(components)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.components)
        self.normalisation = normalisation
        self.grid = tuple(grid)
        self.valid_ndcg10: float | None = None

    def fit(self, split: LeaveOneOut, fit_components: bool = True) -> Blend:
        """Fit every component (unless already fitted), then tune the weights on validation."""
        if fit_components:
            for component in self.components:
                component.fit(split)
        return self.tune(split.histories("valid"), split.targets("valid"))

    def tune(self, histories: Histories, targets: Sequence[int]) -> Blend:
        scores = [component.score(histories) for component in self.components]
        self.weights, self.valid_ndcg10 = tune_weights(
            scores, targets, histories, self.grid, self.normalisation
        )
        return self

    def score(self, histories: Histories) -> np.ndarray:
        total = None
        for weight, component in zip(self.weights, self.components, strict=True):
            if weight or total is None:  # skip zero-weight components, but always produce a matrix
                part = weight * normalise(component.score(histories), self.normalisation)
                total = part if total is None else total + part
        return total

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
