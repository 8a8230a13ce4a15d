"""The candidate plan: one decision of a request's candidates, shared by the stream, the evaluation and training,
so that offline figures are the stream's figures.

A request is a user's history (catalogue rows, most recent last), an optional text and the hard constraints
of the query (its filters, the consumed items). The plan:

1. reads what the text asks (`parse_ask`: named categories, a period, exclusions) and turns it, with the
   query's filters and exclusions, into one `CandidateFilter`;
2. scores the catalogue collaboratively: the pipeline's retriever (the blend) for a history, popularity
   without one, plus — for a text — `affinity_weight` × the log of the item's category affinity to the text
   (`GenreAffinity`: how close the request's meaning is to each category, so "a film that gives me chills"
   leans to horror without naming it);
3. asks for one search (`Prepared.search`) by the text's vector over the item texts, under the filter; the
   caller runs it — Qdrant in the stream, the same vectors in numpy offline (`TextIndex`);
4. merges the collaborative list (under the filter) and the search's hits by weighted reciprocal-rank fusion.
   A narrow request gets only what satisfies it (a search for "a 1962 war western" shows the few there are);
   when fewer than `min_matching` items do, the list is topped up under a relaxed ask (`Ask.relaxed`: any of
   the categories, then no period, then no categories; exclusions are promises and never relaxed), after
   every item that satisfies it, and the plan says what it relaxed.

Each candidate keeps its collaborative score: the prior the reranker is fused with, as it was trained. With
no text the plan is exactly the retriever's top-k (the sequential protocol).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace

import numpy as np

from instructrec.catalogue import Catalogue, describe
from instructrec.instructions import LETTERS, Ask, parse_ask
from instructrec.instructions.vocabulary import words_for

RRF_K = (
    60  # the usual reciprocal-rank-fusion constant: rank 1 and rank 10 differ, but not by orders of magnitude
)
MAX_RERANKED = len(LETTERS)  # T3 labels candidates a..z
AFFINITY_FLOOR = 0.01  # an item of no affine category keeps some chance: affinity is a lean, not a filter
MAX_REASONS = 3
MAX_REASON_CHARS = 100


@dataclass(frozen=True, slots=True)
class Hit:
    """An item found by a search, with the attributes filters and reasons read."""

    item_id: str
    score: float
    title: str = ""
    categories: tuple[str, ...] = ()
    year: int | None = None


@dataclass(frozen=True)
class CandidateFilter:
    """Hard constraints on candidates: any of `categories` (all of `all_categories`), none of
    `exclude_categories`, a year range (inclusive; an item without a year fails a range) and item ids to
    leave out (consumed, excluded)."""

    categories: frozenset[str] = frozenset()
    exclude_categories: frozenset[str] = frozenset()
    year_min: int | None = None
    year_max: int | None = None
    exclude_ids: frozenset[str] = frozenset()
    all_categories: frozenset[str] = frozenset()

    @property
    def constrains_payload(self) -> bool:
        return bool(self.categories or self.exclude_categories or self.all_categories) or (
            self.year_min is not None or self.year_max is not None
        )

    def accepts(self, item_id: str, categories: Collection[str] = (), year: int | None = None) -> bool:
        if item_id in self.exclude_ids:
            return False
        if self.categories and not self.categories.intersection(categories):
            return False
        if self.all_categories and not self.all_categories <= set(categories):
            return False
        if self.exclude_categories and self.exclude_categories.intersection(categories):
            return False
        if self.year_min is not None and (year is None or year < self.year_min):
            return False
        return not (self.year_max is not None and (year is None or year > self.year_max))

    def accepts_hit(self, hit: Hit) -> bool:
        return self.accepts(hit.item_id, hit.categories, hit.year)

    def mask(self, catalogue: Catalogue) -> np.ndarray:
        """`accepts` over the whole catalogue at once: bool [items]."""
        keep = np.ones(len(catalogue), dtype=bool)
        genres = catalogue.genre_matrix
        if self.categories:
            keep &= genres[:, catalogue.columns(self.categories)].any(axis=1)
        if self.all_categories:
            columns = catalogue.columns(self.all_categories)
            keep &= genres[:, columns].all(axis=1) if len(columns) == len(self.all_categories) else False
        if self.exclude_categories:
            keep &= ~genres[:, catalogue.columns(self.exclude_categories)].any(axis=1)
        years = catalogue.years
        if self.year_min is not None:
            keep &= (years >= 0) & (years >= self.year_min)
        if self.year_max is not None:
            keep &= (years >= 0) & (years <= self.year_max)
        for item_id in self.exclude_ids:
            row = catalogue.rows.get(item_id)
            if row is not None:
                keep[row] = False
        return keep

    def with_ask(self, ask: Ask) -> CandidateFilter:
        """These constraints and what a request asks, together (the tighter period wins)."""
        low = max((y for y in (self.year_min, ask.year_min) if y is not None), default=None)
        high = min((y for y in (self.year_max, ask.year_max) if y is not None), default=None)
        any_of, all_of = self.categories, self.all_categories
        if ask.genres and ask.any_genre:
            any_of = (any_of & ask.genres) if any_of else ask.genres
        elif ask.genres:
            all_of = all_of | ask.genres
        return replace(
            self,
            categories=any_of,
            all_categories=all_of,
            exclude_categories=self.exclude_categories | ask.excluded,
            year_min=low,
            year_max=high,
        )


NO_FILTER = CandidateFilter()


def sizes(k: int, candidates: int) -> tuple[int, int]:
    """(candidates to rerank, candidates to fetch) for an answer of `k` items.

    The reranker sees `candidates` (or k, if larger) up to the 26 letters T3 can label; a longer answer is
    topped up from the plan's order.
    """
    rerank = min(max(k, candidates), MAX_RERANKED)
    return rerank, max(rerank, k)


# ------------------------------------------------------------------------------------------- affinity


class GenreAffinity:
    """How close a request's meaning is to each category: cosine similarity of the request's sentence vector
    to a prototype per category (the mean vector of its name and the *training* pool of its mood phrases),
    as a softmax. Built once from the text encoder, so offline and the stream compute the same numbers."""

    def __init__(self, categories: Sequence[str], prototypes: np.ndarray, temperature: float = 0.05) -> None:
        self.categories = list(categories)
        self.prototypes = np.asarray(prototypes, dtype=np.float32)
        self.temperature = temperature

    @classmethod
    def build(
        cls, encode: Callable[[Sequence[str]], np.ndarray], catalogue: Catalogue, temperature: float = 0.05
    ) -> GenreAffinity:
        """`encode`: texts → unit sentence vectors (the text retriever's encoder)."""
        phrases: list[str] = []
        owners: list[int] = []
        for j, category in enumerate(catalogue.categories):
            words = words_for(category)
            for phrase in (words.noun.format(item=catalogue.nouns.item), *words.moods):
                phrases.append(phrase)
                owners.append(j)
        vectors = np.asarray(encode(phrases), dtype=np.float32) if phrases else np.zeros((0, 1), np.float32)
        prototypes = np.zeros((len(catalogue.categories), vectors.shape[1]), dtype=np.float32)
        np.add.at(prototypes, np.asarray(owners, dtype=np.int64), vectors)
        prototypes /= np.maximum(np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-9)
        return cls(catalogue.categories, prototypes, temperature)

    def of_text(self, vector: np.ndarray) -> np.ndarray:
        """Softmax over categories of the request vector's similarity to their prototypes."""
        vector = np.asarray(vector, dtype=np.float32)
        sims = self.prototypes @ (vector / max(float(np.linalg.norm(vector)), 1e-9))
        weights = np.exp((sims - sims.max()) / self.temperature)
        return weights / weights.sum()

    def of_items(self, vector: np.ndarray, catalogue: Catalogue) -> np.ndarray:
        """Per item: the affinity of its categories (their sum: the chance it belongs to a wanted one)."""
        return np.minimum(catalogue.genre_matrix @ self.of_text(vector), 1.0)


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class PlanConfig:
    fetch: int = 100  # candidates each source contributes to the merge
    text_weight: float = 1.0  # the intention search's weight in the merge (the collaborative list has 1)
    affinity_weight: float = 1.0  # how far a request's category affinity moves the collaborative scores
    min_matching: int = 3  # fewer candidates than this satisfying the ask: top up under a relaxed ask
    rrf_k: int = RRF_K


@dataclass(frozen=True)
class PlanRequest:
    history: Sequence[int] = ()  # catalogue rows the user interacted with, most recent last
    text: str | None = None
    filter: CandidateFilter = NO_FILTER  # the query's own filters and the items to leave out
    n: int = 20  # candidates wanted


@dataclass(frozen=True)
class Search:
    """The one search the plan needs run: the request's text vector over item texts, under `filter`."""

    vector: np.ndarray
    n: int
    filter: CandidateFilter


@dataclass(frozen=True)
class Prepared:
    request: PlanRequest
    ask: Ask  # what the text asks
    filter: CandidateFilter  # the query's constraints and the ask's, together
    # Looser filters to top the list up with when too few items satisfy the ask: (what was let go, filter).
    relaxations: tuple[tuple[str, CandidateFilter], ...] = ()

    def search(self, vector: np.ndarray | None, config: PlanConfig) -> Search | None:
        if vector is None or not self.request.text:
            return None
        return Search(np.asarray(vector, dtype=np.float32), config.fetch, self.filter)


@dataclass(frozen=True)
class Candidate:
    item_id: str
    score: float  # the plan's merged score: higher first
    prior: float | None  # the collaborative score (the reranker's fusion prior); None for an unknown item
    row: int | None  # catalogue row; None for an item the trained catalogue does not know
    sources: tuple[str, ...]  # "history", "popular", "intention"
    title: str = ""
    categories: tuple[str, ...] = ()
    year: int | None = None
    text: str = ""  # how the reranker sees it (`catalogue.describe`)
    relaxed: bool = False  # it satisfies only a relaxed ask: ranked after every item that satisfies the ask


@dataclass(frozen=True)
class Plan:
    candidates: tuple[Candidate, ...]
    ask: Ask
    filter: CandidateFilter
    relaxed: tuple[str, ...] = ()


def prepare(request: PlanRequest, catalogue: Catalogue, config: PlanConfig = PlanConfig()) -> Prepared:
    """Step 1: what the request asks, the filter that holds it, and the looser ones to fall back on."""
    ask = parse_ask(request.text, catalogue.categories)
    relaxations = tuple((what, request.filter.with_ask(looser)) for what, looser in ask.relaxed())
    return Prepared(request, ask, request.filter.with_ask(ask), relaxations)


def collaborative_scores(
    prepared: Prepared,
    catalogue: Catalogue,
    *,
    retrieval: np.ndarray | None,
    popularity: np.ndarray | None,
    affinity: np.ndarray | None,
    config: PlanConfig = PlanConfig(),
) -> tuple[np.ndarray | None, str]:
    """Step 2: the collaborative score of every catalogue item and its source: the retriever's scores of the
    history, else popularity; leaned by the text's category affinity. (The filter applies in `merge`.)"""
    if retrieval is not None and len(prepared.request.history):
        base, source = np.asarray(retrieval, dtype=np.float64), "history"
    elif popularity is not None:
        base, source = _standardised(np.log1p(np.asarray(popularity, dtype=np.float64))), "popular"
    else:
        return None, ""
    scores = base.copy()
    if affinity is not None and config.affinity_weight:
        scores += config.affinity_weight * np.log(AFFINITY_FLOOR + np.asarray(affinity, dtype=np.float64))
    return scores, source


def merge(
    prepared: Prepared,
    catalogue: Catalogue,
    *,
    collaborative: np.ndarray | None,
    source: str,
    hits: Sequence[Hit] = (),
    hits_source: str = "intention",
    config: PlanConfig = PlanConfig(),
) -> Plan:
    """Steps 3-4: the collaborative list and the text search's hits, by weighted reciprocal-rank fusion, topped
    up under the relaxed asks when too few items satisfy the request. (`hits_source`: what the search was by —
    the request's text, or, for a stream without a trained retriever, the history's mean text vector.)"""
    n = prepared.request.n
    fused: dict[str, float] = {}
    found: dict[str, list[str]] = {}
    if collaborative is not None:
        for rank, row in enumerate(
            _order(collaborative, prepared.filter.mask(catalogue), max(config.fetch, n)), 1
        ):
            item_id = catalogue.item_ids[row]
            fused[item_id] = 1.0 / (config.rrf_k + rank)
            found[item_id] = [source]
    extra: dict[str, Hit] = {}
    kept = [hit for hit in hits if prepared.filter.accepts_hit(hit)]
    for rank, hit in enumerate(kept, start=1):
        fused[hit.item_id] = fused.get(hit.item_id, 0.0) + config.text_weight / (config.rrf_k + rank)
        found.setdefault(hit.item_id, []).append(hits_source)
        if hit.item_id not in catalogue.rows:
            extra.setdefault(hit.item_id, hit)
    chosen = sorted(fused, key=lambda item: -fused[item])[:n]
    strict = len(chosen)  # these satisfy the ask; what the relaxed asks add comes after
    relaxed: list[str] = []
    if len(chosen) < min(n, config.min_matching) and collaborative is not None:
        taken = set(chosen)
        floor = min((fused[i] for i in chosen), default=1.0)
        for what, looser in prepared.relaxations:
            more = [
                catalogue.item_ids[r] for r in _order(collaborative, looser.mask(catalogue), n + len(taken))
            ]
            more = [i for i in more if i not in taken][: n - len(chosen)]
            if more:
                relaxed.append(what)
            for step, item_id in enumerate(more, start=1):
                fused[item_id] = floor * (1 - step / (2 * n))  # after every item that satisfies the ask
                found[item_id] = [source]
                taken.add(item_id)
                chosen.append(item_id)
            if len(chosen) >= n:
                break
    candidates = [
        _candidate(item_id, fused, found, collaborative, catalogue, extra, relaxed=i >= strict)
        for i, item_id in enumerate(chosen)
    ]
    return Plan(tuple(candidates), prepared.ask, prepared.filter, tuple(relaxed))


def _order(scores: np.ndarray, mask: np.ndarray, n: int) -> list[int]:
    """The best `n` rows by score among those the mask keeps (and that have a score)."""
    keep = np.flatnonzero(mask & np.isfinite(scores))
    return keep[np.argsort(-scores[keep], kind="stable")][:n].tolist()


def _candidate(
    item_id, fused, found, collaborative, catalogue: Catalogue, extra: dict[str, Hit], relaxed: bool
) -> Candidate:
    row = catalogue.rows.get(item_id)
    prior = float(collaborative[row]) if collaborative is not None and row is not None else None
    if prior is not None and not np.isfinite(prior):
        prior = None
    if row is not None:
        title, genres, year, text = (
            catalogue.titles[row],
            catalogue.genres[row],
            catalogue.year(row),
            catalogue.describe(row),
        )
    else:
        hit = extra[item_id]
        title, genres, year = hit.title or f"item {item_id}", hit.categories, hit.year
        text = describe(title, genres)
    return Candidate(
        item_id, fused[item_id], prior, row, tuple(found[item_id]), title, genres, year, text, relaxed
    )


def _standardised(x: np.ndarray) -> np.ndarray:
    std = float(x.std())
    return (x - x.mean()) / std if std > 0 else x - x.mean()


# ---------------------------------------------------------------------------------------- offline search


class TextIndex:
    """The intention search offline: the same item text vectors the stream puts in Qdrant, searched exactly."""

    def __init__(self, catalogue: Catalogue, vectors: np.ndarray) -> None:
        if len(vectors) != len(catalogue):
            raise ValueError(f"{len(vectors)} text vectors for {len(catalogue)} items")
        self.catalogue = catalogue
        self.vectors = np.asarray(vectors, dtype=np.float32)

    def search(self, search: Search) -> list[Hit]:
        c = self.catalogue
        vector = search.vector / max(float(np.linalg.norm(search.vector)), 1e-9)
        scores = self.vectors @ vector
        scores[~search.filter.mask(c)] = -np.inf
        top = np.argsort(-scores, kind="stable")[: search.n]
        return [
            Hit(c.item_ids[r], float(scores[r]), c.titles[r], c.genres[r], c.year(r))
            for r in top
            if np.isfinite(scores[r])
        ]


def plan(
    request: PlanRequest,
    catalogue: Catalogue,
    *,
    retrieval: np.ndarray | None,
    popularity: np.ndarray | None,
    text_vector: np.ndarray | None,
    affinity: GenreAffinity | None,
    index: TextIndex | None,
    config: PlanConfig = PlanConfig(),
) -> Plan:
    """The whole plan in one call, searching in-process (evaluation and training)."""
    prepared = prepare(request, catalogue, config)
    leaning = (
        affinity.of_items(text_vector, catalogue)
        if affinity is not None and text_vector is not None and request.text
        else None
    )
    scores, source = collaborative_scores(
        prepared, catalogue, retrieval=retrieval, popularity=popularity, affinity=leaning, config=config
    )
    search = prepared.search(text_vector, config)
    hits = index.search(search) if search is not None and index is not None else []
    return merge(prepared, catalogue, collaborative=scores, source=source, hits=hits, config=config)


# ------------------------------------------------------------------------------------------------ reasons


def neighbour(row: int, history: Sequence[int], vectors: np.ndarray | None) -> int | None:
    """The history item most like `row` by the collaborative item vectors (cosine), or None."""
    if vectors is None or not len(history):
        return None
    history = list(dict.fromkeys(history))
    candidates = vectors[history]
    target = vectors[row]
    sims = (
        candidates
        @ target
        / (np.linalg.norm(candidates, axis=1) * max(float(np.linalg.norm(target)), 1e-9) + 1e-9)
    )
    return history[int(np.argmax(sims))]


def reasons(candidate: Candidate, ask: Ask, did: str, neighbour_title: str | None = None) -> tuple[str, ...]:
    """Why an item is recommended, from data (never generated text): what of the request it matches, the
    history item it neighbours, or where it came from. At most `MAX_REASONS`, each within `MAX_REASON_CHARS`."""
    out: list[str] = []
    matched = ask.matches(candidate.categories, candidate.year)
    if matched:
        out.append("matches: " + ", ".join(matched))
    if neighbour_title and "history" in candidate.sources:
        out.append(f"because you {did} {neighbour_title}")
    if "intention" in candidate.sources and not matched:
        out.append("close to your request")
    if "popular" in candidate.sources and not out:
        out.append("popular right now")
    return tuple(_cut(r) for r in out[:MAX_REASONS])


def _cut(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1].rstrip() + "…"
