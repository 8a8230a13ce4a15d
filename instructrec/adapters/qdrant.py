"""The item index in Qdrant: one point per catalogue item, two named vectors, searched with client-side filters.

- ``"text"``: the item's all-MiniLM-L6-v2 sentence vector (384). Stored unit-normalised under ``Distance.DOT``,
  which ranks exactly as cosine; queries are normalised here too (local mode would re-normalise every stored
  vector on each cosine query).
- ``"cf"``: the collaborative retriever's item vector (SASRec, ``Distance.DOT``), for items the trained
  retriever knows; a new catalogue item has the text vector only, which Qdrant allows.
- payload: ``item_id``, ``title``, ``categories`` (keyword index), ``year`` (integer index; server only —
  embedded mode ignores payload indexes).

Filtering happens in the client. Embedded mode evaluates a filter in Python point by point, several times
slower than an unfiltered search (DESIGN §6). So a search over-fetches (``limit`` = k plus the excluded ids,
more with payload filters), drops what the filter rejects, and widens the fetch when too little survives;
only a very selective payload filter falls back to Qdrant's own filtering.

Point ids are uuid5 of the item id, so an item's re-index replaces its point. Every call retries under the
adapters' `RetryPolicy` and then raises `IndexUnavailable`. Embedded mode keeps a file lock: one process owns
the storage. ``AsyncItemIndex`` runs the (blocking) calls on one dedicated thread so an event loop stays
responsive and calls never overlap.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from instructrec.adapters.retry import RetryPolicy
from instructrec.candidates import NO_FILTER, CandidateFilter, Hit
from instructrec.config import QdrantSettings

log = logging.getLogger(__name__)

VectorName = Literal["text", "cf"]
TEXT: VectorName = "text"
CF: VectorName = "cf"
TEXT_DIM = 384  # all-MiniLM-L6-v2
PAYLOAD_FIELDS = ["item_id", "title", "categories", "year"]
_POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "instructrec/items")
T = TypeVar("T")


class IndexUnavailable(RuntimeError):
    """Qdrant did not answer after the configured retries; the message says what was attempted."""


class SchemaMismatch(ValueError):
    """The collection exists with other vectors: a configuration error, never retried."""


def _transient(error: BaseException) -> bool:
    return not isinstance(error, SchemaMismatch)


def point_id(item_id: str) -> str:
    """The stable point id of a catalogue item (uuid5 of its id: any string id maps to a valid point id)."""
    return str(uuid.uuid5(_POINT_NAMESPACE, item_id))


@dataclass(frozen=True, slots=True)
class IndexedItem:
    """What is written for one item. Vectors are optional: an item without a vector is simply not found by
    a search on it (a new item has no collaborative vector)."""

    item_id: str
    title: str
    categories: tuple[str, ...] = ()
    year: int | None = None
    text_vector: np.ndarray | None = None
    cf_vector: np.ndarray | None = None


def payload_filter(flt: CandidateFilter):
    """The payload part as a Qdrant filter (ids stay client-side): the slow path, see the module doc."""
    from qdrant_client import models

    must: list[Any] = []
    must_not: list[Any] = []
    if flt.categories:
        must.append(
            models.FieldCondition(key="categories", match=models.MatchAny(any=sorted(flt.categories)))
        )
    if flt.exclude_categories:
        must_not.append(
            models.FieldCondition(key="categories", match=models.MatchAny(any=sorted(flt.exclude_categories)))
        )
    if flt.year_min is not None or flt.year_max is not None:
        must.append(models.FieldCondition(key="year", range=models.Range(gte=flt.year_min, lte=flt.year_max)))
    return models.Filter(must=must or None, must_not=must_not or None)


def fetch_limits(k: int, flt: CandidateFilter, max_fetch: int) -> list[int]:
    """The growing `limit`s a search tries until k hits survive the filter.

    The first fetch covers k plus every excluded id (they may all rank high: a user's own history does under
    a collaborative query vector); payload filters quadruple it, as they may reject most of what comes back.
    Each next try is four times larger, up to `max_fetch`.
    """
    first = k + len(flt.exclude_ids)
    if flt.constrains_payload:
        first *= 4
    limits = []
    limit = min(max(first, k), max_fetch)
    while True:
        limits.append(limit)
        if limit >= max_fetch:
            return limits
        limit = min(limit * 4, max_fetch)


def normalised(vector: Sequence[float] | np.ndarray) -> list[float]:
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(array))
    return (array / norm if norm > 0 else array).tolist()


def _warn_plaintext_key(url: str) -> None:
    """An API key over plain http travels in clear. Warned, not refused: the chart's in-release Qdrant is
    reached over the cluster network by http with its key, and a service mesh may encrypt below us (mTLS),
    which we cannot see. The warning names the URL, never the key."""
    log.warning("qdrant: the API key is sent to %s in clear text; use an https:// URL", url)


def _hit(point, score: float | None = None) -> Hit:
    """A search result (ScoredPoint) or a stored record (Record: no score, pass one)."""
    payload = point.payload or {}
    year = payload.get("year")
    return Hit(
        item_id=str(payload.get("item_id", point.id)),
        score=float(point.score if score is None else score),
        title=str(payload.get("title", "")),
        categories=tuple(payload.get("categories") or ()),
        year=year if isinstance(year, int) else None,
    )


# ------------------------------------------------------------------------------------------------ the index


@dataclass
class ItemIndex:
    """Blocking adapter; `AsyncItemIndex` wraps it for an event loop."""

    settings: QdrantSettings
    text_dim: int = TEXT_DIM
    cf_dim: int | None = None  # None: settings.cf_dim
    sleep: Callable[[float], None] = time.sleep  # injectable for tests of the retry path
    _client: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.cf_dim is None:
            self.cf_dim = self.settings.cf_dim

    @property
    def collection(self) -> str:
        return self.settings.collection

    @property
    def local(self) -> bool:
        return self.settings.url is None

    @property
    def client(self):
        if self._client is None:
            self._client = self._call("open the storage", self._open)
        return self._client

    def _open(self):
        from qdrant_client import QdrantClient

        if self.local:
            path = self.settings.path.expanduser()
            path.mkdir(parents=True, exist_ok=True)
            return QdrantClient(path=str(path))
        api_key = self.settings.api_key.get_secret_value() if self.settings.api_key else None
        if api_key is not None and not self.settings.url.lower().startswith("https://"):
            _warn_plaintext_key(self.settings.url)
        return QdrantClient(
            url=self.settings.url, api_key=api_key, timeout=math.ceil(self.settings.timeout_s)
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> ItemIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- retries

    def _call(self, what: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
        policy = policy or self.retry_policy
        try:
            return policy.call(fn, what=f"qdrant: {what}", transient=_transient, sleep=self.sleep)
        except SchemaMismatch:
            raise
        except Exception as error:  # any client, transport or storage error, once the retries are spent
            raise IndexUnavailable(
                f"qdrant: could not {what} after {policy.attempts} attempt(s): {type(error).__name__}: {error}"
            ) from error

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.settings.retries, self.settings.backoff_s, max(self.settings.backoff_s, 1.0))

    # -- schema

    def ensure_collection(self) -> bool:
        """Create the collection (and payload indexes) unless it exists; True when created.

        An existing collection with other vector sizes is an error: re-creating it would drop the catalogue.
        """
        from qdrant_client import models

        def ensure() -> bool:
            client = self.client
            if client.collection_exists(self.collection):
                self._check_schema(client.get_collection(self.collection))
                created = False
            else:
                client.create_collection(
                    self.collection,
                    vectors_config={
                        TEXT: models.VectorParams(size=self.text_dim, distance=models.Distance.DOT),
                        CF: models.VectorParams(size=self.cf_dim, distance=models.Distance.DOT),
                    },
                )
                created = True
                if not self.local:  # embedded mode ignores payload indexes (and warns about them)
                    client.create_payload_index(
                        self.collection, "categories", models.PayloadSchemaType.KEYWORD
                    )
                    client.create_payload_index(self.collection, "year", models.PayloadSchemaType.INTEGER)
            self._tune_local_storage()
            return created

        return self._call(f"ensure collection {self.collection!r}", ensure)

    def _check_schema(self, info) -> None:
        vectors = info.config.params.vectors
        sizes = (
            {name: params.size for name, params in vectors.items()} if isinstance(vectors, Mapping) else {}
        )
        expected = {TEXT: self.text_dim, CF: self.cf_dim}
        if sizes != expected:
            raise SchemaMismatch(
                f"collection {self.collection!r} has vectors {sizes}, expected {expected}: point "
                f"INSTRUCTREC_QDRANT__COLLECTION elsewhere or delete the collection to re-index"
            )

    def _tune_local_storage(self) -> None:
        """Embedded mode commits every point to SQLite with an fsync, which makes indexing a catalogue take
        minutes; WAL with synchronous=NORMAL is tens of times faster (`benchmarks/stream.py` times the
        catalogue build). A committed write survives a crash of the process; only an OS crash may lose the last
        ones (the items topic can replay them).

        The one private API of this adapter (qdrant-client 1.20's local-mode internals: `QdrantClient._client
        .collections[name].storage.storage`, a sqlite3 connection), so it is best effort."""
        if not self.local:
            return
        collection = getattr(self._client, "_client", None)
        collection = getattr(collection, "collections", {}).get(self.collection)
        connection = getattr(getattr(collection, "storage", None), "storage", None)
        if connection is None:
            log.info("qdrant: embedded storage internals changed; keeping its default (slow) commits")
            return
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")

    # -- writes

    def upsert(self, items: Sequence[IndexedItem], policy: RetryPolicy | None = None) -> int:
        """Write items in batches of `upsert_batch`; returns how many were written. `policy` overrides the
        configured retries (the catalog agent rides out longer outages than a query can wait for)."""
        from qdrant_client import models

        points = []
        for item in items:
            vectors: dict[str, list[float]] = {}
            if item.text_vector is not None:
                vectors[TEXT] = normalised(item.text_vector)
            if item.cf_vector is not None:
                vectors[CF] = np.asarray(item.cf_vector, dtype=np.float32).reshape(-1).tolist()
            payload: dict[str, Any] = {
                "item_id": item.item_id,
                "title": item.title,
                "categories": list(item.categories),
            }
            if item.year is not None:
                payload["year"] = int(item.year)
            points.append(models.PointStruct(id=point_id(item.item_id), vector=vectors, payload=payload))
        size = self.settings.upsert_batch
        for start in range(0, len(points), size):
            batch = points[start : start + size]
            self._call(
                f"upsert {len(batch)} points",
                lambda b=batch: self.client.upsert(self.collection, b, wait=True),
                policy,
            )
        return len(points)

    # -- reads

    def search(
        self,
        using: VectorName,
        vector: Sequence[float] | np.ndarray,
        k: int,
        flt: CandidateFilter = NO_FILTER,
    ) -> list[Hit]:
        """The best `k` items by the named vector that pass `flt`, best first (fewer if the catalogue has
        fewer)."""
        query = (
            normalised(vector) if using == TEXT else np.asarray(vector, dtype=np.float32).reshape(-1).tolist()
        )
        hits: list[Hit] = []
        fetched = 0
        for limit in fetch_limits(k, flt, self.settings.max_fetch):
            points = self._query(using, query, limit)
            hits = [hit for hit in map(_hit, points) if flt.accepts_hit(hit)]
            fetched = len(points)
            if len(hits) >= k or fetched < limit:  # enough, or the whole collection was seen
                return hits[:k]
        if flt.constrains_payload:
            # Most of the catalogue fails the payload filter: let Qdrant filter (slow in embedded mode, rare).
            points = self._query(using, query, k + len(flt.exclude_ids), payload_filter(flt))
            hits = [hit for hit in map(_hit, points) if flt.accepts_hit(hit)]
        return hits[:k]

    def _query(self, using: str, query: list[float], limit: int, query_filter=None) -> list:
        def run():
            return self.client.query_points(
                self.collection,
                query=query,
                using=using,
                limit=limit,
                query_filter=query_filter,
                with_payload=PAYLOAD_FIELDS,
                with_vectors=False,
            ).points

        return self._call(f"search {using!r} (limit {limit})", run)

    def lookup(
        self, item_ids: Iterable[str], vectors: Sequence[VectorName] = ()
    ) -> dict[str, tuple[Hit, dict]]:
        """Stored items by id: (payload as a Hit with score 0, {vector name: array}); unknown ids are absent."""
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}

        def run():
            return self.client.retrieve(
                self.collection,
                ids=[point_id(i) for i in ids],
                with_payload=PAYLOAD_FIELDS,
                with_vectors=list(vectors) if vectors else False,
            )

        out: dict[str, tuple[Hit, dict]] = {}
        for record in self._call(f"retrieve {len(ids)} points", run):
            found = record.vector if isinstance(record.vector, dict) else {}
            arrays = {name: np.asarray(found[name], dtype=np.float32) for name in vectors if name in found}
            hit = _hit(record, score=0.0)
            out[hit.item_id] = (hit, arrays)
        return out

    def count(self) -> int:
        return self._call("count points", lambda: self.client.count(self.collection, exact=True).count)


@dataclass
class AsyncItemIndex:
    """`ItemIndex` for an event loop: every call runs on one dedicated thread (embedded Qdrant is neither
    async nor safe to call from two threads at once; numpy releases the GIL while it searches)."""

    index: ItemIndex
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="qdrant"), init=False, repr=False
    )

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def ensure_collection(self) -> bool:
        return await self._run(self.index.ensure_collection)

    async def upsert(self, items: Sequence[IndexedItem], policy: RetryPolicy | None = None) -> int:
        return await self._run(self.index.upsert, items, policy)

    async def search(self, using: VectorName, vector, k: int, flt: CandidateFilter = NO_FILTER) -> list[Hit]:
        return await self._run(self.index.search, using, vector, k, flt)

    async def search_many(self, searches: Sequence[tuple[VectorName, Any, int, CandidateFilter]]) -> list:
        """Several searches in one hop to the thread; each result is a list of hits or its IndexUnavailable."""

        def run():
            out: list[list[Hit] | IndexUnavailable] = []
            for using, vector, k, flt in searches:
                try:
                    out.append(self.index.search(using, vector, k, flt))
                except IndexUnavailable as error:
                    out.append(error)
            return out

        return await self._run(run)

    async def lookup(self, item_ids: Iterable[str], vectors: Sequence[VectorName] = ()) -> dict:
        return await self._run(self.index.lookup, list(item_ids), vectors)

    async def count(self) -> int:
        return await self._run(self.index.count)

    async def close(self) -> None:
        await self._run(self.index.close)
        self._executor.shutdown(wait=False)
