"""The process-local services the agents call: the item index, the text encoder, the collaborative retriever,
the reranker client, and small caches. Built once per worker (`Services.load`) and passed to `create_app`;
tests pass fakes that satisfy the same protocols.

Models run on one dedicated thread (`run_model`): torch releases the GIL, so the event loop keeps consuming,
heartbeating and answering web requests while a query is embedded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from instructrec.adapters.qdrant import AsyncItemIndex, ItemIndex
from instructrec.artifacts import Artifacts
from instructrec.candidates import CandidateFilter, GenreAffinity, Hit, PlanConfig
from instructrec.catalogue import Catalogue
from instructrec.config import Settings
from instructrec.instructions import intention_kind
from instructrec.retrieval.base import Retriever, VectorRetriever

log = logging.getLogger(__name__)
T = TypeVar("T")


class TextEncoderLike(Protocol):
    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class RerankerClient(Protocol):
    """Everything the stream uses of `instructrec.adapters.triton.TritonReranker`."""

    @property
    def model_version(self) -> str:
        """The version that answered last, or that the server named; "" until known."""
        ...

    @property
    def circuit_state(self) -> str:
        """ "closed", "open" or "half_open": open means answers are degraded without a call."""
        ...

    async def score_with_versions(self, requests: Sequence[bytes]) -> list[tuple[np.ndarray, str]]:
        """Each request's scores and the version that scored it."""
        ...

    async def refresh_model_version(self) -> str: ...

    async def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------- caches


@dataclass(frozen=True, slots=True)
class ItemInfo:
    title: str
    categories: tuple[str, ...] = ()
    year: int | None = None


class ItemCache:
    """Titles and filterable attributes of recently seen items (LRU): what the instruction renderer and the
    Qdrant-free fallback need, without a round trip per history item."""

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, ItemInfo] = OrderedDict()

    def put(self, item_id: str, info: ItemInfo) -> None:
        self._items[item_id] = info
        self._items.move_to_end(item_id)
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def put_hit(self, hit: Hit) -> None:
        self.put(hit.item_id, ItemInfo(hit.title, hit.categories, hit.year))

    def get(self, item_id: str) -> ItemInfo | None:
        info = self._items.get(item_id)
        if info is not None:
            self._items.move_to_end(item_id)
        return info

    def missing(self, item_ids: Iterable[str]) -> list[str]:
        return [i for i in dict.fromkeys(item_ids) if i not in self._items]

    def __len__(self) -> int:
        return len(self._items)


class CachedEncoder:
    """Intention vectors, remembered (LRU): people phrase needs alike ("something funny"), and embedding one
    short text costs tens of ms on a busy CPU. Used from the one model thread only, so it needs no lock."""

    def __init__(self, encoder: TextEncoderLike, capacity: int = 10_000) -> None:
        self.encoder = encoder
        self.capacity = capacity
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        if missing:
            for text, vector in zip(missing, self.encoder.encode(missing), strict=True):
                self._vectors[text] = vector
        out = np.stack([self._vectors[t] for t in texts])
        for text in texts:
            self._vectors.move_to_end(text)
        while len(self._vectors) > self.capacity:
            self._vectors.popitem(last=False)
        return out


class LivePopularity:
    """Most-clicked items: a prior from the trained popularity retriever, plus what this worker has seen
    on the clicks topic since it started. The answer of last resort (cold start, Qdrant down)."""

    def __init__(self, prior: dict[str, float] | None = None, live_weight: float = 1.0) -> None:
        self.prior = prior or {}
        self.live: Counter[str] = Counter()
        self.live_weight = live_weight

    def count(self, item_id: str) -> None:
        self.live[item_id] += 1

    def top(
        self, k: int, flt: CandidateFilter, info: Callable[[str], ItemInfo | None]
    ) -> list[tuple[str, float]]:
        scores = Counter(self.prior)
        for item, n in self.live.items():
            scores[item] += self.live_weight * n
        out = []
        for item, score in scores.most_common():
            known = info(item)
            if flt.accepts(item, known.categories if known else (), known.year if known else None):
                out.append((item, float(score)))
                if len(out) == k:
                    break
        return out


# ------------------------------------------------------------------------------------- collaborative vectors


@dataclass
class Collaborative:
    """The trained retrievers in-process: query vectors for a user's recent items and the item vectors that
    go into Qdrant's "cf" field (the vector retriever, SASRec), and the retrieval scores the reranker fuses
    with its own — the pipeline's retriever (`scorer`, e.g. the blend it was trained against) when it is not
    the vector retriever itself."""

    retriever: VectorRetriever  # item_vectors(), query_vectors(histories of dense rows)
    item_ids: list[str]  # row → catalogue item id
    fusion_weight: float = 0.0  # a request without a text
    name: str = "sasrec"
    scorer: Retriever | None = None  # scores the whole catalogue: score(histories of rows) → [users × items]
    fusion_weights: dict[str, float] = field(default_factory=dict)  # per intention kind ("I0", "I1", "I2")
    rows: dict[str, int] = field(init=False)
    vectors: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.vectors = np.asarray(self.retriever.item_vectors(), dtype=np.float32)
        if len(self.vectors) != len(self.item_ids):
            raise ValueError(f"{len(self.vectors)} item vectors but {len(self.item_ids)} item ids")
        self.rows = {item_id: row for row, item_id in enumerate(self.item_ids)}

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def weight_for(self, text: str | None) -> float:
        """The fusion weight for a request with this text: its intention kind's, as tuned on validation."""
        return self.fusion_weights.get(intention_kind(text).value, self.fusion_weight)

    def vector_of(self, item_id: str) -> np.ndarray | None:
        row = self.rows.get(item_id)
        return None if row is None else self.vectors[row]

    def known(self, item_ids: Iterable[str]) -> list[int]:
        return [self.rows[i] for i in item_ids if i in self.rows]

    def query_vectors(self, histories: Sequence[Sequence[str]]) -> list[np.ndarray | None]:
        """One query vector per history (item ids, oldest first); None when the retriever knows none of them."""
        rows = [self.known(h) for h in histories]
        wanted = [i for i, r in enumerate(rows) if r]
        out: list[np.ndarray | None] = [None] * len(histories)
        if wanted:
            vectors = self.retriever.query_vectors([rows[i] for i in wanted])
            for i, vector in zip(wanted, vectors, strict=True):
                out[i] = np.asarray(vector, dtype=np.float32)
        return out

    def catalogue_scores(
        self, histories: Sequence[Sequence[str]], queries: Sequence[np.ndarray | None]
    ) -> list[np.ndarray | None]:
        """Retrieval scores of every known item per history (None when the retriever knows none of the
        history): the pipeline retriever's when there is one, else the query vector's dot products."""
        if self.scorer is None:
            return [None if q is None else self.vectors @ q for q in queries]
        rows = [self.known(h) for h in histories]
        wanted = [i for i, r in enumerate(rows) if r]
        out: list[np.ndarray | None] = [None] * len(histories)
        if wanted:
            for i, scores in zip(wanted, self.scorer.score([rows[i] for i in wanted]), strict=True):
                out[i] = np.asarray(scores, dtype=np.float32)
        return out

    def scores(self, catalogue: np.ndarray, item_ids: Sequence[str]) -> list[float | None]:
        """`catalogue_scores` of these items (None for an item the retriever does not know)."""
        return [None if (row := self.rows.get(i)) is None else float(catalogue[row]) for i in item_ids]

    def neighbours(
        self, query: np.ndarray, k: int, flt: CandidateFilter, info: Callable[[str], ItemInfo | None]
    ) -> list[tuple[str, float]]:
        """Top-k items by the query vector without Qdrant (the fallback when it is down)."""
        scores = self.vectors @ query
        out = []
        for row in np.argsort(-scores):
            item = self.item_ids[int(row)]
            known = info(item)
            if flt.accepts(item, known.categories if known else (), known.year if known else None):
                out.append((item, float(scores[row])))
                if len(out) == k:
                    break
        return out


def load_collaborative(settings: Settings) -> Collaborative | None:
    """The pipeline's retriever from `artifacts/<dataset>/`, when it was trained and is (or holds) a vector
    retriever. Item ids come from the retriever's saved `item_ids.json`, else from the dataset itself."""
    from instructrec.retrieval.base import load_retriever

    artifacts = Artifacts.of(settings.model.artifacts, settings.stream.dataset)
    pipeline = artifacts.pipeline_summary()
    name, weight = pipeline.get("retriever", "sasrec"), float(pipeline.get("fusion_weight", 0.0))
    directory = artifacts.retriever(name)
    if not (directory / "config.json").is_file():
        log.info("no trained retriever at %s: candidates come from text vectors only", directory)
        return None
    retriever = load_retriever(directory)
    # A blend is not a vector retriever: its vector component feeds Qdrant, the blend scores for fusion.
    components = retriever.components if hasattr(retriever, "components") else []
    vector = next((r for r in [retriever, *components] if isinstance(r, VectorRetriever)), None)
    if vector is None:
        log.info("retriever %s has no vectors: candidates come from text vectors only", name)
        return None
    item_ids = artifacts.item_ids(name) or _dataset_item_ids(settings)
    if item_ids is None:
        return None
    weights = {k: float(v) for k, v in pipeline.get("fusion_weights", {}).items()}
    return Collaborative(vector, item_ids, weight, name, None if vector is retriever else retriever, weights)


def _dataset_item_ids(settings: Settings) -> list[str] | None:
    try:
        from instructrec.data import load

        dataset = load(settings.stream.dataset, root=settings.data_root)
    except (FileNotFoundError, ValueError) as error:
        log.warning("cannot map the retriever's rows to item ids (%s): not using it", error)
        return None
    return [item.id for item in dataset.items]


def load_counts(settings: Settings, catalogue: Catalogue) -> np.ndarray | None:
    """Training interactions per catalogue item (the plan's source without a history), when trained."""
    directory = Artifacts.of(settings.model.artifacts, settings.stream.dataset).retriever("popularity")
    if not len(catalogue) or not (directory / "config.json").is_file():
        return None
    from instructrec.retrieval.popularity import Popularity

    counts = np.asarray(Popularity.load(directory).counts, dtype=np.float64)
    return counts if len(counts) == len(catalogue) else None


def load_catalogue(settings: Settings, collaborative: Collaborative | None) -> Catalogue:
    """The trained items' attributes, aligned with the collaborative retriever's rows; empty when untrained."""
    path = Artifacts.of(settings.model.artifacts, settings.stream.dataset).catalogue
    if path.is_file():
        catalogue = Catalogue.load(path)
    elif collaborative is not None:  # artefacts from before the catalogue was saved: rebuild it from the data
        try:
            from instructrec.data import load

            catalogue = Catalogue.from_dataset(load(settings.stream.dataset, root=settings.data_root))
        except (FileNotFoundError, ValueError) as error:
            log.warning("no catalogue.json and no dataset to rebuild it (%s): planning without it", error)
            return Catalogue.empty()
    else:
        return Catalogue.empty()
    if collaborative is not None and catalogue.item_ids != collaborative.item_ids:
        log.error("catalogue.json and the retriever's item ids disagree: planning without the catalogue")
        return Catalogue.empty(catalogue.nouns)
    return catalogue


def top_popular(catalogue: Catalogue, counts: np.ndarray | None, n: int = 1000) -> LivePopularity:
    """The live popularity's prior: the trained catalogue's most interacted items."""
    if counts is None:
        return LivePopularity()
    top = np.argsort(-counts)[:n]
    return LivePopularity({catalogue.item_ids[int(r)]: float(counts[r]) for r in top})


# ------------------------------------------------------------------------------------------------ services


@dataclass
class Services:
    index: AsyncItemIndex
    encoder: TextEncoderLike
    reranker: RerankerClient
    collaborative: Collaborative | None = None
    popularity: LivePopularity = field(default_factory=LivePopularity)
    items: ItemCache = field(default_factory=ItemCache)
    catalogue: Catalogue = field(default_factory=Catalogue.empty)  # the trained items (the plan's catalogue)
    counts: np.ndarray | None = (
        None  # training interactions per catalogue item (popularity without a history)
    )
    plan: PlanConfig = field(default_factory=PlanConfig)  # the candidate plan's weights, as trained
    affinity: GenreAffinity | None = None  # request text → category affinity (built from the encoder)
    intentions: CachedEncoder = field(init=False)  # the encoder behind a cache, for query texts
    _models: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="models"), repr=False
    )

    def __post_init__(self) -> None:
        self.intentions = CachedEncoder(self.encoder)

    async def run_model(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._models, fn, *args)

    @classmethod
    def load(cls, settings: Settings, reranker: RerankerClient | None = None) -> Services:
        """Everything from configuration: the Qdrant storage or server, MiniLM, the trained retriever (if
        any) and the Triton client. Opening embedded Qdrant takes its file lock."""
        from instructrec.retrieval.text import TextEncoder

        collaborative = load_collaborative(settings)
        catalogue = load_catalogue(settings, collaborative)
        counts = load_counts(settings, catalogue)
        plan = (
            Artifacts.of(settings.model.artifacts, settings.stream.dataset).pipeline_summary().get("plan", {})
        )
        cf_dim = collaborative.dim if collaborative is not None else settings.qdrant.cf_dim
        index = ItemIndex(settings.qdrant, cf_dim=cf_dim)
        index.ensure_collection()
        if reranker is None:
            from instructrec.adapters.triton import TritonReranker

            reranker = TritonReranker(settings.triton)
        encoder = TextEncoder()
        encoder.encode(["warm-up: the first call pays for lazy initialisation"])
        return cls(
            index=AsyncItemIndex(index),
            encoder=encoder,
            reranker=reranker,
            collaborative=collaborative,
            popularity=top_popular(catalogue, counts),
            catalogue=catalogue,
            counts=counts,
            plan=PlanConfig(**plan),
            affinity=GenreAffinity.build(encoder.encode, catalogue) if catalogue.categories else None,
        )

    async def close(self) -> None:
        await self.reranker.close()
        await self.index.close()
        self._models.shutdown(wait=False)
