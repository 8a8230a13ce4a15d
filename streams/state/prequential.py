"""Prequential quality of the live stream: each answer is scored against what its user did next.

When a user interacts after an answer (the next click after it, or a click that names its request id), the
answer is scored by where that item stood in it: NDCG@10 and HR@10 of one relevant item. Scores are kept per
model version in a rolling window (the last `window` scored answers) — on `/metrics` and, every `report_every`
answers, published to `model-updates` as a `prequential` update — so a newly swapped-in version is judged
on the traffic it actually served, beside the version before it.

Each answer is scored once (the served log marks it), so redelivered clicks change nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

K = 10


def answer_metrics(served: Sequence[str], item: str, k: int = K) -> tuple[float, float]:
    """(NDCG@k, HR@k) of a served list against the one item the user went on to choose."""
    top = list(served)[:k]
    if item not in top:
        return 0.0, 0.0
    return 1.0 / math.log2(top.index(item) + 2), 1.0


@dataclass
class Prequential:
    window: int = 500
    report_every: int = 100
    _scores: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    _since_report: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    scored: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, version: str, ndcg: float, hit: float) -> bool:
        """Add one scored answer; True when the version is due a report."""
        scores = self._scores[version]
        scores.append((ndcg, hit))
        while len(scores) > self.window:
            scores.popleft()
        self.scored[version] += 1
        self._since_report[version] += 1
        if self._since_report[version] >= self.report_every:
            self._since_report[version] = 0
            return True
        return False

    def summary(self, version: str) -> dict[str, float]:
        scores = self._scores.get(version) or ()
        n = len(scores)
        if not n:
            return {"answers": 0.0}
        return {
            "ndcg@10": sum(s[0] for s in scores) / n,
            "hr@10": sum(s[1] for s in scores) / n,
            "answers": float(n),
            "scored_total": float(self.scored[version]),
        }

    def versions(self) -> list[str]:
        return list(self._scores)
