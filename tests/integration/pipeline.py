"""What the stream's integration tests share: a module's own topics, group and storage on the session's
services (`stream_settings`), HTTP to a worker, and a background reader of a topic. The fixtures that start a
worker on them are in conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from instructrec.adapters.triton import repository as triton_repository
from instructrec.config import Settings, TopicNames
from instructrec.events import QueryEvent, Recommendation, decode
from instructrec.infra import run_sync
from streams.kafka.admin import ensure_topics
from streams.kafka.producer import EventProducer, topic_of
from streams.kafka.reader import TopicReader

DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MODEL = triton_repository.MODEL_NAME
N_ITEMS = 120  # embedding is the slow part of indexing (≈ 10–30 items/s on 2 busy cores)
TIMEOUT_S = 180.0


# ------------------------------------------------------------------------------------------------ helpers


def stream_settings(base: Settings, root: Path, *, artifacts: Path | None = None) -> Settings:
    """`base` (pointed at the session's services) with this module's own topics, group, state and storage."""
    run = uuid.uuid4().hex[:8]
    topics = TopicNames(**{role: f"{name}-{run}" for role, name in TopicNames().model_dump().items()})
    settings = base.model_copy(
        update={
            "kafka": base.kafka.model_copy(update={"topics": topics}),
            "qdrant": base.qdrant.model_copy(update={"url": None, "path": root / "qdrant"}),
            "stream": base.stream.model_copy(update={"store": "memory", "app_id": f"test-stream-{run}"}),
            "state_dir": root / "state",
            "model": base.model.model_copy(update={"artifacts": artifacts or root / "no-artifacts"}),
            "triton": base.triton.model_copy(
                update={"timeout_s": 30.0, "retries": 0}
            ),  # a busy CI box is slow
            "web": base.web.model_copy(update={"recommend_timeout_s": 90.0}),
        }
    )
    run_sync(ensure_topics(settings.kafka))
    return settings


def http(
    method: str, url: str, body: dict | bytes | None = None, timeout_s: float = 120.0
) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


class Listener:
    """Reads a topic from its current end in the background (start it before producing what it should see)."""

    def __init__(self, settings: Settings, role: str) -> None:
        self.settings, self.role = settings, role
        self.messages: list[tuple[int, int, bytes | None, bytes | None]] = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Listener:
        self._reader = TopicReader(self.settings.kafka, topic_of(self.settings.kafka, self.role))
        async with asyncio.timeout(60):
            await self._reader.__aenter__()

        async def run() -> None:
            async for record in self._reader:
                self.messages.append((record.partition, record.offset, record.key, record.value))

        self._task = asyncio.create_task(run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._reader.__aexit__(*exc)

    async def wait_for(self, done, timeout_s: float = TIMEOUT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():
                await asyncio.sleep(0.2)


def answers(listener: Listener) -> dict[str, list[Recommendation]]:
    out: dict[str, list[Recommendation]] = {}
    for *_, value in listener.messages:
        answer = decode(Recommendation, value)
        out.setdefault(answer.request_id, []).append(answer)
    return out


async def ask(settings: Settings, queries: list[QueryEvent]) -> dict[str, list[Recommendation]]:
    """Produce queries and return their answers (every answer per request id, so duplicates would show)."""
    wanted = {q.request_id for q in queries}
    async with Listener(settings, "recommendations") as listener:
        async with EventProducer(settings.kafka) as producer:
            await producer.send_all(queries)
        await listener.wait_for(lambda: wanted <= set(answers(listener)))
        await asyncio.sleep(1.0)  # a duplicate, if any, would arrive right behind
    return {r: a for r, a in answers(listener).items() if r in wanted}
