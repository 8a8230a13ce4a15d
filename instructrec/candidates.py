"""Candidates for a request: what a candidate is, the hard constraints on candidates, and how the searches
for one request are planned and merged.

A request searches by up to two vectors: its intention text (MiniLM) when it has text, and the user's recent
items — the collaborative retriever's query vector when it is trained, else the mean text vector of those
items. The lists are merged by reciprocal-rank fusion. Consumed items and the request's filters are hard
constraints (`CandidateFilter`), applied by whatever index answers the searches.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from instructrec.instructions import LETTERS

VectorName = Literal["text", "cf"]
TEXT: VectorName = "text"
CF: VectorName = "cf"

RRF_K = (
    60  # the usual reciprocal-rank-fusion constant: rank 1 and rank 10 differ, but not by orders of magnitude
)
MAX_RERANKED = len(LETTERS)  # T3 labels candidates a..z


@dataclass(frozen=True, slots=True)
class Hit:
    item_id: str
    score: float
    title: str = ""
    categories: tuple[str, ...] = ()
    year: int | None = None


@dataclass(frozen=True)
class CandidateFilter:
    """Hard constraints on candidates: any of `categories`, none of `exclude_categories`, a year range
    (inclusive; an item without a year fails a range) and item ids to leave out (consumed, excluded)."""

    categories: frozenset[str] = frozenset()
    exclude_categories: frozenset[str] = frozenset()
    year_min: int | None = None
    year_max: int | None = None
    exclude_ids: frozenset[str] = frozenset()

    @property
    def constrains_payload(self) -> bool:
        return (
            bool(self.categories or self.exclude_categories)
            or self.year_min is not None
            or (self.year_max is not None)
        )

    def accepts(self, item_id: str, categories: Collection[str] = (), year: int | None = None) -> bool:
        if item_id in self.exclude_ids:
            return False
        if self.categories and not self.categories.intersection(categories):
            return False
        if self.exclude_categories and self.exclude_categories.intersection(categories):
            return False
        if self.year_min is not None and (year is None or year < self.year_min):
            return False
        return not (self.year_max is not None and (year is None or year > self.year_max))

    def accepts_hit(self, hit: Hit) -> bool:
        return self.accepts(hit.item_id, hit.categories, hit.year)


NO_FILTER = CandidateFilter()


def sizes(k: int, candidates: int) -> tuple[int, int]:
    """(candidates to rerank, candidates to fetch) for an answer of `k` items.

    The reranker sees `candidates` (or k, if larger) up to the 26 letters T3 can label; a longer answer is
    topped up from retrieval order.
    """
    rerank = min(max(k, candidates), MAX_RERANKED)
    return rerank, max(rerank, k)


@dataclass(frozen=True)
class Search:
    using: VectorName
    vector: np.ndarray
    why: str  # "intention" or "history": for logs and degraded reasons


def plan_searches(
    intention: np.ndarray | None, collaborative: np.ndarray | None, history_text: np.ndarray | None
) -> list[Search]:
    """The searches for one query: by intention text, and by recent items (collaborative, else text mean)."""
    searches = []
    if intention is not None:
        searches.append(Search(TEXT, intention, "intention"))
    if collaborative is not None:
        searches.append(Search(CF, collaborative, "history"))
    elif history_text is not None:
        searches.append(Search(TEXT, history_text, "history"))
    return searches


def mean_vector(vectors: Sequence[np.ndarray]) -> np.ndarray | None:
    """Normalised mean (the text retriever's history query vector); None without vectors."""
    if not vectors:
        return None
    mean = np.mean(np.stack(vectors), axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else None


def merge(lists: Sequence[Sequence[Hit]], limit: int) -> list[Hit]:
    """Reciprocal-rank fusion of ranked lists; one list passes through unchanged (its own scores kept)."""
    lists = [hits for hits in lists if hits]
    if len(lists) == 1:
        return list(lists[0][:limit])
    fused: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for hits in lists:
        for rank, hit in enumerate(hits, start=1):
            fused[hit.item_id] = fused.get(hit.item_id, 0.0) + 1.0 / (RRF_K + rank)
            first.setdefault(hit.item_id, hit)
    order = sorted(fused, key=lambda item: -fused[item])[:limit]
    return [_with_score(first[item], fused[item]) for item in order]


def _with_score(hit: Hit, score: float) -> Hit:
    return Hit(hit.item_id, score, hit.title, hit.categories, hit.year)
