"""The gate: a candidate model is served only if it ranks the held-out examples better than the incumbent.

Both are scored on the same held-out slice — the newest examples, newer than anything the candidate trained
on (prequential) — by NDCG@10 and HR@10 of the chosen item among that example's candidates, fused with the
prior as serving fuses. The decision is paired: per example, the candidate's NDCG@10 minus the incumbent's;
the candidate is accepted only if the mean gain is at least `min_margin` and a paired bootstrap puts the gain
above zero with probability `confidence`. Noise does not promote a model; a worse one never passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

K = 10


def ranks(scores: Sequence[np.ndarray], targets: Sequence[int]) -> np.ndarray:
    """0-based rank of each target among its list's scores (ties: pessimistic)."""
    return np.array([int((s >= s[t]).sum()) - 1 for s, t in zip(scores, targets, strict=True)])


def ndcg_hr(rank: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    hit = rank < k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    return ndcg, hit.astype(float)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str
    metrics: dict[str, float]


def judge(
    candidate: np.ndarray,
    incumbent: np.ndarray,
    *,
    min_margin: float,
    confidence: float,
    seed: int = 0,
    rounds: int = 2000,
) -> Verdict:
    """`candidate`, `incumbent`: each held-out example's rank of the chosen item under either model."""
    if len(candidate) != len(incumbent) or not len(candidate):
        return Verdict(False, "no held-out examples to judge on", {})
    cand_ndcg, cand_hr = ndcg_hr(candidate)
    inc_ndcg, inc_hr = ndcg_hr(incumbent)
    gain = cand_ndcg - inc_ndcg
    rng = np.random.default_rng(seed)
    means = gain[rng.integers(0, len(gain), size=(rounds, len(gain)))].mean(axis=1)
    p_better = float((means > 0).mean())
    metrics = {
        "candidate_ndcg@10": float(cand_ndcg.mean()),
        "incumbent_ndcg@10": float(inc_ndcg.mean()),
        "candidate_hr@10": float(cand_hr.mean()),
        "incumbent_hr@10": float(inc_hr.mean()),
        "gain_ndcg@10": float(gain.mean()),
        "p_better": p_better,
        "judged": float(len(gain)),  # holdout examples whose chosen item was among the candidates
    }
    if gain.mean() < min_margin:
        return Verdict(
            False, f"NDCG@10 gain {gain.mean():+.4f} is below the margin {min_margin:.4f}", metrics
        )
    if p_better < confidence:
        return Verdict(
            False, f"the gain is not reliable: P(gain > 0) = {p_better:.2f} < {confidence:.2f}", metrics
        )
    return Verdict(True, f"NDCG@10 {gain.mean():+.4f}, P(gain > 0) = {p_better:.2f}", metrics)


def standard_error(values: np.ndarray) -> float:
    return float(np.std(values) / math.sqrt(max(1, len(values))))
