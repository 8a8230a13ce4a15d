"""Web views of a worker (Faust's web server, bound to `settings.web.host`, loopback by default).

- `POST /recommend` — body: a query (`user_id`, optional `text`, `k`, `filters`, `request_id`). Publishes it
  to the queries topic and awaits its recommendation: 200 with the recommendation, 400 for an invalid query,
  429 (with Retry-After) for a user over `settings.stream.user_rate_per_s`, 504 when no answer comes within
  `settings.web.recommend_timeout_s`. Whichever worker owns the user's partition answers; every worker's
  `Replies` listener reads all partitions of the recommendations topic, so the view works on any worker.
- `GET /users/{user_id}/context` — the user's context, routed to the worker that holds it.
- `GET /health` — 200 when Kafka, the reply listener and Qdrant answer (reranker state reported); else 503.
- `GET /metrics` — Prometheus exposition.
- `GET /` — the try-it page (`streams/page/`: plain HTML, CSS and JavaScript, no build step, nothing
  external), which calls the views here; its script and style are served from `GET /page/{name}`.
- `GET /users?limit=N` — users with a history that this worker's share of the context table holds (the
  table is partitioned across workers: another worker knows other users), most recently active first.
- `GET /live` — the figures the page refreshes: the served model version, events/s and latency p50/p99
  over the last minute, prequential NDCG@10 / HR@10 per model version (this worker's).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import itertools
import logging
import math
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson
from faust import web as faust_web

from instructrec.config import KafkaSettings
from instructrec.events import EventError, QueryEvent, Recommendation, decode, encode, validate
from streams.kafka.reader import TopicReader
from streams.metrics import LiveWindow, Snapshot
from streams.ratelimit import UserRateLimiter
from streams.state.context import UserContext
from streams.state.prequential import Prequential

if TYPE_CHECKING:
    from streams.app import StreamApp

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
LIVE_SAMPLE_S = 5.0  # how often the live window snapshots the metrics
USERS_LIMIT, USERS_MAX = 50, 500
# Table entries one `GET /users` reads at most: a large RocksDB table must not stall the event loop.
USERS_SCAN = 5_000
# The page's files (the rest of streams/page/ is not served) and the page's policy: its own script and
# style only, and requests to this worker only, so an injected string could neither run nor send anything.
PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class Replies:
    """Awaits recommendations by request id: one reader, outside the consumer group, of every partition of the
    recommendations topic from its end (answers to requests made before it started are not wanted)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self.ready = asyncio.Event()
        self._waiting: dict[str, asyncio.Future] = {}

    async def run(self) -> None:
        # An answer is awaited by a caller: a long poll must not sit on it.
        reader = TopicReader(self.kafka, self.kafka.topics.recommendations, fetch_max_wait_ms=50)
        async with reader:
            self.ready.set()
            try:
                while True:
                    for record in await reader.batch(timeout_ms=500):
                        self._deliver(record.value)
            finally:
                self.ready.clear()

    def _deliver(self, raw: bytes) -> None:
        if not self._waiting:
            return
        try:
            answer = decode(Recommendation, raw)
        except EventError:
            return  # not ours to judge: the topic's producers are the agents
        future = self._waiting.get(answer.request_id)
        if future is not None and not future.done():
            future.set_result(answer)

    async def wait(self, request_id: str, publish, timeout_s: float) -> Recommendation:
        """Register for `request_id`, run `publish()`, then await the answer (asyncio.TimeoutError after
        `timeout_s`)."""
        await asyncio.wait_for(self.ready.wait(), timeout_s)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await publish()
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.pop(request_id, None)


def install(stream: StreamApp) -> None:
    app = stream.app
    replies = Replies(stream.settings.kafka)
    timeout_s = stream.settings.web.recommend_timeout_s
    # Its own limiter, apart from the queries agent's: a request admitted here is counted once more there,
    # in that limiter. A request may reach any worker's view, so this one is per worker; the agent's, on the
    # worker that owns the user's partition, is the exact per-user bound (its excess: a dead letter, a 504).
    limiter = UserRateLimiter.from_settings(stream.settings.stream)

    @app.task
    async def reply_listener() -> None:
        while True:  # a broker hiccup must not end the listener for the worker's lifetime
            try:
                await replies.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reply listener failed; restarting in 1 s")
                await asyncio.sleep(1.0)

    @app.task
    async def reranker_version() -> None:
        """Learn the served model version at start-up (answers report it; until then "unknown")."""
        try:
            await stream.services.reranker.refresh_model_version()
        except Exception as error:  # Triton may start after us: the first answer will tell
            log.info("reranker version not known yet: %s", error)

    @app.page("/recommend")
    class RecommendView(faust_web.View):
        async def post(self, request: faust_web.Request) -> faust_web.Response:
            started = time.perf_counter()
            try:
                body = orjson.loads(await request.read())
                if isinstance(body, dict) and "request_id" not in body:
                    body = {**body, "request_id": uuid.uuid4().hex}
                query = validate(QueryEvent, body)
            except orjson.JSONDecodeError as error:
                return self.error(400, f"not JSON: {error}")
            except EventError as error:
                return self.error(400, str(error), fields=list(error.fields))
            if limiter is not None and not limiter.allow(query.user_id):
                retry = max(1, math.ceil(limiter.retry_after_s(query.user_id)))  # whole seconds, at least 1
                headers = {"Retry-After": str(retry)}
                return self.error(
                    429, limiter.refusal(query.user_id), headers=headers, request_id=query.request_id
                )

            async def publish() -> None:
                await stream.topics.queries.send(key=query.user_id.encode(), value=encode(query))
                stream.metrics.events_out.labels("queries").inc()

            try:
                answer = await replies.wait(query.request_id, publish, timeout_s)
            except TimeoutError:
                stream.metrics.recommend_seconds.labels("timeout").observe(time.perf_counter() - started)
                return self.error(
                    504, f"no recommendation within {timeout_s:g} s", request_id=query.request_id
                )
            stream.metrics.recommend_seconds.labels("ok").observe(time.perf_counter() - started)
            return self.bytes(encode(answer), content_type="application/json")

    @app.page("/users/{user_id}/context")
    class ContextView(faust_web.View):
        @app.table_route(table=stream.tables.context, match_info="user_id")
        async def get(self, request: faust_web.Request, user_id: str) -> faust_web.Response:
            raw = stream.tables.context.get(user_id)
            if raw is None:
                return self.error(404, f"no context for user {user_id!r}")
            return self.json({"user_id": user_id, **UserContext.from_bytes(raw).describe()})

    @app.page("/health")
    class HealthView(faust_web.View):
        async def get(self, request: faust_web.Request) -> faust_web.Response:
            checks = await health(stream, replies)
            ok = all(check["ok"] for name, check in checks.items() if name != "reranker")
            return self.json(
                {"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503
            )

    @app.page("/metrics")
    class MetricsView(faust_web.View):
        async def get(self, request: faust_web.Request) -> faust_web.Response:
            body, content_type = stream.metrics.exposition()
            # aiohttp wants the charset apart from the media type
            return self.bytes(body, content_type=content_type.split(";")[0])

    install_page(stream)


def install_page(stream: StreamApp) -> None:
    """The try-it page and the two JSON views only it needs."""
    app = stream.app
    window = LiveWindow()

    @app.timer(LIVE_SAMPLE_S)
    async def live_sampler() -> None:
        window.add(Snapshot.of(stream.metrics, time.monotonic()))

    @app.page("/")
    class PageView(faust_web.View):
        async def get(self, request: faust_web.Request) -> faust_web.Response:
            return page_response(self, "index.html")

    @app.page("/page/{name}")
    class PageFileView(faust_web.View):
        async def get(self, request: faust_web.Request, name: str) -> faust_web.Response:
            if name not in PAGE_FILES:
                return self.error(404, f"no page file {name!r}")
            return page_response(self, name)

    @app.page("/users")
    class UsersView(faust_web.View):
        async def get(self, request: faust_web.Request) -> faust_web.Response:
            try:
                limit = parse_limit(request.query.get("limit"))
            except ValueError as error:
                return self.error(400, str(error))
            entries = itertools.islice(stream.tables.context.items(), USERS_SCAN)
            return self.json({"users": users_with_history(entries, limit)})

    @app.page("/live")
    class LiveView(faust_web.View):
        async def get(self, request: faust_web.Request) -> faust_web.Response:
            return self.json(live_figures(stream, window, time.monotonic()))


@functools.cache
def page_file(name: str) -> bytes:
    return importlib.resources.files("streams").joinpath("page", name).read_bytes()


def page_response(view: faust_web.View, name: str) -> faust_web.Response:
    headers = {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"}
    return view.bytes(page_file(name), content_type=PAGE_FILES[name], headers=headers)


def parse_limit(raw: str | None) -> int:
    """`?limit=`: USERS_LIMIT when absent, else an integer in 1..USERS_MAX (ValueError with the reason)."""
    if raw is None:
        return USERS_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(f"limit must be an integer, got {raw!r}") from None
    if not 1 <= limit <= USERS_MAX:
        raise ValueError(f"limit must be in 1..{USERS_MAX}, got {limit}")
    return limit


def users_with_history(entries: Iterable[tuple[str, bytes | None]], limit: int) -> list[dict[str, Any]]:
    """The `limit` most recently active users among `entries` (user id → context bytes) that have a history:
    a user who only asked (a cold start, say) has nothing to show."""
    found = []
    for user_id, raw in entries:
        context = UserContext.from_bytes(raw)
        if context.history:
            found.append((context.updated, user_id, len(context.history)))
    found.sort(key=lambda row: (-row[0], row[1]))
    return [{"user_id": user_id, "history": n} for _, user_id, n in found[:limit]]


def live_figures(stream: StreamApp, window: LiveWindow, now: float) -> dict[str, Any]:
    reranker = stream.services.reranker
    return {
        "model_version": reranker.model_version or "unknown",
        "circuit": reranker.circuit_state,
        **window.figures(Snapshot.of(stream.metrics, now)),
        "prequential": prequential_rows(stream.prequential),
    }


def prequential_rows(prequential: Prequential) -> list[dict[str, Any]]:
    """One row per model version with scored answers: its rolling NDCG@10 / HR@10 and how many answers."""
    rows = []
    for version in prequential.versions():
        summary = prequential.summary(version)
        if summary["answers"]:
            rows.append(
                {
                    "version": version,
                    "ndcg10": summary["ndcg@10"],
                    "hr10": summary["hr@10"],
                    "answers": int(summary["answers"]),
                    "scored_total": int(summary["scored_total"]),
                }
            )
    return rows


async def health(stream: StreamApp, replies: Replies) -> dict[str, dict[str, Any]]:
    app = stream.app
    checks: dict[str, dict[str, Any]] = {}
    assignment = app.consumer.assignment() if app.consumer else set()
    checks["kafka"] = {
        "ok": bool(assignment) or not app.rebalancing,
        "partitions": len(assignment),
        "rebalancing": bool(app.rebalancing),
        "recovering": bool(app.tables.recovery.in_recovery),
        # False outside a rebalance means the stream hands nothing to the agents (Faust's flow control)
        "flowing": bool(app.consumer.flow_active) if app.consumer else False,
        "queries_in_flight": len(stream.in_flight),  # taken and not yet answered
    }
    checks["replies"] = {"ok": replies.ready.is_set()}
    try:
        count = await asyncio.wait_for(stream.services.index.count(), HEALTH_TIMEOUT_S)
        checks["qdrant"] = {"ok": True, "items": count}
    except Exception as error:  # any failure is "down", with the reason
        checks["qdrant"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    reranker = stream.services.reranker
    circuit = reranker.circuit_state
    # reported, not required: without it answers are degraded, not missing
    checks["reranker"] = {
        "ok": circuit != "open",
        "circuit": circuit,
        "model_version": reranker.model_version,
    }
    return checks
