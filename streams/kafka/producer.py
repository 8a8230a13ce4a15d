"""Producing the app's events from batch jobs and the command line.

Events are sent with their schema's key (user id, item id, ...) through aiokafka's default partitioner
(murmur2, as Java's), the partitioning the Faust app's co-partitioned tables rely on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from instructrec.config import KafkaSettings
from instructrec.events import SCHEMAS, Event, encode
from streams.kafka.compat import hide_sasl_tokens

ROLES = tuple(SCHEMAS)  # items, clicks, queries, recommendations, feedback, model_updates, dead_letter


def role_of(name: str) -> str:
    """A topic role from a role or its CLI spelling ("model-updates", "dead-letter")."""
    role = name.replace("-", "_")
    if role not in SCHEMAS:
        raise ValueError(
            f"unknown topic {name!r}; choose one of {', '.join(r.replace('_', '-') for r in ROLES)}"
        )
    return role


def topic_of(kafka: KafkaSettings, role: str) -> str:
    return getattr(kafka.topics, role_of(role))


@dataclass
class EventProducer:
    """An aiokafka producer for events (`async with EventProducer(kafka) as p: await p.send(event)`)."""

    kafka: KafkaSettings
    linger_ms: int = 5
    _producer: AIOKafkaProducer | None = field(default=None, init=False)
    sent: int = field(default=0, init=False)

    async def __aenter__(self) -> EventProducer:
        hide_sasl_tokens()
        self._producer = AIOKafkaProducer(
            **self.kafka.aiokafka_kwargs(), acks="all", linger_ms=self.linger_ms
        )
        try:
            await self._producer.start()
        except BaseException:  # a refused connection (TLS, SASL): close what start opened
            await self._producer.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._producer is not None
        try:
            await self._producer.flush()
        finally:
            await self._producer.stop()

    async def send(self, event: Event, *, wait: bool = False) -> None:
        """Queue `event` on its topic (await delivery too with `wait=True`)."""
        await self.send_raw(event.topic, event.key.encode(), encode(event), wait=wait)

    async def send_raw(self, role: str, key: bytes | None, value: bytes, *, wait: bool = False) -> None:
        assert self._producer is not None, "use EventProducer as an async context manager"
        delivery = await self._producer.send(topic_of(self.kafka, role), key=key, value=value)
        self.sent += 1
        if wait:
            await delivery

    async def send_all(self, events: Iterable[Event]) -> int:
        n = 0
        for event in events:
            await self.send(event)
            n += 1
        return n

    async def flush(self) -> None:
        assert self._producer is not None
        await self._producer.flush()
