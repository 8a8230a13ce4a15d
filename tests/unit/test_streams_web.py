"""The web layer's reply matching (no Kafka: answers are delivered by hand) and the child-process settings."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from instructrec.config import Settings, TopicNames
from instructrec.events import Recommendation, encode
from instructrec.infra.worker import settings_env
from streams.web import Replies


def answer(request_id: str) -> bytes:
    return encode(
        Recommendation(request_id=request_id, user_id="u", items=(), model_version="1", template_id="t")
    )


async def test_a_waiting_request_gets_its_own_answer_and_ignores_others() -> None:
    replies = Replies(Settings().kafka)
    replies.ready.set()
    published = asyncio.Event()

    async def publish() -> None:
        published.set()

    waiting = asyncio.create_task(replies.wait("r1", publish, 5.0))
    await published.wait()
    replies._deliver(answer("r2"))  # someone else's
    replies._deliver(b"garbage")  # never fatal
    assert not waiting.done()
    replies._deliver(answer("r1"))
    got = await waiting
    assert got.request_id == "r1" and replies._waiting == {}


async def test_no_answer_in_time_is_a_timeout_and_leaves_nothing_behind() -> None:
    replies = Replies(Settings().kafka)
    replies.ready.set()

    async def publish() -> None:
        return None

    with pytest.raises(TimeoutError):
        await replies.wait("r1", publish, 0.05)
    assert replies._waiting == {}


async def test_waiting_requires_the_listener_to_be_positioned() -> None:
    replies = Replies(Settings().kafka)  # never started: not ready

    async def publish() -> None:
        raise AssertionError("must not publish before the listener can see the answer")

    with pytest.raises(TimeoutError):
        await replies.wait("r1", publish, 0.05)


def test_a_child_process_rebuilds_the_same_settings() -> None:
    settings = Settings()
    settings = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={
                    "broker": "kafka://10.0.0.1:9999",
                    "sasl_password": "s3cret",
                    "topics": TopicNames(items="items-x"),
                }
            ),
            "stream": settings.stream.model_copy(update={"store": "memory", "batch_size": 3}),
        }
    )
    base = {**os.environ, "INSTRUCTREC_KAFKA__BROKER": "kafka://stale:1"}  # the parent's own must not leak
    code = (
        "from instructrec.config import Settings; s = Settings(); "
        "print(s.kafka.broker, s.kafka.topics.items, s.kafka.sasl_password.get_secret_value(), "
        f"s.stream.store, s.stream.batch_size, str(s.state_dir) == {str(settings.state_dir)!r})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=settings_env(settings, base),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["kafka://10.0.0.1:9999", "items-x", "s3cret", "memory", "3", "True"]
