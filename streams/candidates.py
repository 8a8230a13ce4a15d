"""Candidate retrieval for a query: which searches to run, how to merge them, and what to fall back on.

A query searches Qdrant by up to two vectors: its intention text (MiniLM) when it has text, and the user's
recent items — the collaborative retriever's query vector when it is trained, else the mean text vector of
those items. The lists are merged by reciprocal-rank fusion. Consumed items and the query's filters are
applied by the index adapter (client-side, see `instructrec.qdrant`).

When Qdrant fails (after its retries), the answer still comes: from the collaborative retriever's
neighbours of the user's recent items, computed in-process, or from popularity — flagged degraded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from instructrec.events import QueryEvent
from instructrec.instructions import LETTERS
from instructrec.qdrant import CF, TEXT, CandidateFilter, Hit, VectorName
from streams.context import UserContext
from streams.services import ItemInfo, Services

RRF_K = 60  # the usual reciprocal-rank-fusion constant: rank 1 and rank 10 differ, but not by orders of magnitude
MAX_RERANKED = len(LETTERS)  # T3 labels candidates a..z


def sizes(k: int, candidates: int) -> tuple[int, int]:
    """(candidates to rerank, candidates to fetch) for an answer of `k` items.

    The reranker sees `candidates` (or k, if larger) up to the 26 letters T3 can label; a longer answer is
    topped up from retrieval order.
    """
    rerank = min(max(k, candidates), MAX_RERANKED)
    return rerank, max(rerank, k)


def candidate_filter(query: QueryEvent, context: UserContext) -> CandidateFilter:
    f = query.filters
    excluded = set(f.exclude_item_ids)
    if f.exclude_seen:
        excluded |= context.consumed()
    return CandidateFilter(
        categories=frozenset(f.categories),
        exclude_categories=frozenset(f.exclude_categories),
        year_min=f.year_min,
        year_max=f.year_max,
        exclude_ids=frozenset(excluded),
    )


@dataclass(frozen=True)
class Search:
    using: VectorName
    vector: np.ndarray
    why: str  # "intention" or "history": for logs and degraded reasons


def plan_searches(intention: np.ndarray | None, collaborative: np.ndarray | None,
                  history_text: np.ndarray | None) -> list[Search]:  # fmt: skip
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


def fallback(services: Services, query_vector: np.ndarray | None, k: int, flt: CandidateFilter) -> tuple[list[Hit], str]:
    """Candidates without Qdrant: the collaborative neighbours of the user's recent items, else popularity.
    Returns the hits and which source answered."""
    info: Callable[[str], ItemInfo | None] = services.items.get
    collaborative = services.collaborative
    if collaborative is not None and query_vector is not None:
        pairs, source = collaborative.neighbours(query_vector, k, flt, info), "recent-item neighbours"
    else:
        pairs, source = services.popularity.top(k, flt, info), "popularity"
    hits = []
    for item, score in pairs:
        known = info(item)
        hits.append(Hit(item, score, known.title if known else "", known.categories if known else (),
                        known.year if known else None))  # fmt: skip
    return hits, source
