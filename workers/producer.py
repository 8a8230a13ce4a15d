"""Producing and consuming the app's topics from batch jobs and the command line.

Events are sent with their schema's key (user id, item id, ...) through aiokafka's default partitioner
(murmur2, as Java's), the partitioning the Faust app's co-partitioned tables rely on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from instructrec.config import KafkaSettings
from instructrec.events import SCHEMAS, Event, encode

ROLES = tuple(SCHEMAS)  # items, clicks, queries, recommendations, feedback, model_updates, dead_letter


def role_of(name: str) -> str:
    """A topic role from a role or its CLI spelling ("model-updates", "dead-letter")."""
    role = name.replace("-", "_")
    if role not in SCHEMAS:
        raise ValueError(f"unknown topic {name!r}; choose one of {', '.join(r.replace('_', '-') for r in ROLES)}")
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
        self._producer = AIOKafkaProducer(**self.kafka.aiokafka_kwargs(), acks="all", linger_ms=self.linger_ms)
        await self._producer.start()
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


async def consume(
    kafka: KafkaSettings,
    role: str,
    *,
    from_beginning: bool = False,
    idle_timeout_s: float | None = None,
    ready: asyncio.Event | None = None,
) -> AsyncIterator[tuple[int, int, bytes | None, bytes | None]]:
    """(partition, offset, key, value) of every message on a topic's partitions, outside any consumer group:
    from the start or only what arrives from now on; stops after `idle_timeout_s` without a message.
    `ready` is set once the start positions are fixed (produce after it to be sure to see the messages)."""
    from streams.compat import pause_after_empty_fetch

    topic = topic_of(kafka, role)
    pause_after_empty_fetch(kafka.empty_fetch_pause_s)  # an idle subscriber must not spin a core
    consumer = AIOKafkaConsumer(**kafka.aiokafka_kwargs(), group_id=None, enable_auto_commit=False,
                                fetch_max_wait_ms=100)  # fmt: skip
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ValueError(f"topic {topic!r} does not exist on {kafka.broker}")
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        if from_beginning:
            await consumer.seek_to_beginning(*assigned)
        else:
            await consumer.seek_to_end(*assigned)
        for tp in assigned:
            await consumer.position(tp)  # fix the start now: what is produced after this call is seen
        if ready is not None:
            ready.set()
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    last = loop.time()
                    yield record.partition, record.offset, record.key, record.value
            if idle_timeout_s is not None and loop.time() - last > idle_timeout_s:
                return
    finally:
        await consumer.stop()
