"""Web views of a worker (Faust's web server, bound to `settings.web.host`, loopback by default).

- `POST /recommend` — body: a query (`user_id`, optional `text`, `k`, `filters`, `request_id`). Publishes it
  to the queries topic and awaits its recommendation: 200 with the recommendation, 400 for an invalid query,
  504 when no answer comes within `settings.web.recommend_timeout_s`. Whichever worker owns the user's
  partition answers; every worker's `Replies` listener reads all partitions of the recommendations topic, so
  the view works on any worker.
- `GET /users/{user_id}/context` — the user's context, routed to the worker that holds it.
- `GET /health` — 200 when Kafka, the reply listener and Qdrant answer (reranker state reported); else 503.
- `GET /metrics` — Prometheus exposition.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from faust import web as faust_web

from instructrec.config import KafkaSettings
from instructrec.events import EventError, QueryEvent, Recommendation, decode, encode, validate
from streams.kafka.reader import TopicReader
from streams.state.context import UserContext

if TYPE_CHECKING:
    from streams.app import StreamApp

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0


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


async def health(stream: StreamApp, replies: Replies) -> dict[str, dict[str, Any]]:
    app = stream.app
    checks: dict[str, dict[str, Any]] = {}
    assignment = app.consumer.assignment() if app.consumer else set()
    checks["kafka"] = {
        "ok": bool(assignment) or not app.rebalancing,
        "partitions": len(assignment),
        "rebalancing": bool(app.rebalancing),
        "recovering": bool(app.tables.recovery.in_recovery),
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
