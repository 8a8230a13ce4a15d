"""Reading a whole topic outside any consumer group: every partition, from its end (only what arrives from
now on) or its beginning. The web view awaits answers this way, and `instructrec subscribe` prints them.

    async with TopicReader(kafka, "recommendations") as reader:   # positions fixed: produce after this
        async for record in reader:
            ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from instructrec.config import KafkaSettings
from streams.kafka.compat import (
    close_fetcher_quietly,
    hide_sasl_tokens,
    pause_after_empty_fetch,
    refresh_metadata,
)


@dataclass
class TopicReader:
    kafka: KafkaSettings
    topic: str
    from_beginning: bool = False
    # An answer may be awaited by a caller: a long poll must not sit on it.
    fetch_max_wait_ms: int = 100
    metadata_timeout_s: float = 10.0  # how long a freshly created topic's metadata may lag
    _consumer: AIOKafkaConsumer | None = field(default=None, init=False, repr=False)

    async def __aenter__(self) -> TopicReader:
        pause_after_empty_fetch(self.kafka.empty_fetch_pause_s)  # an idle reader must not spin a core
        hide_sasl_tokens()
        close_fetcher_quietly()
        consumer = AIOKafkaConsumer(
            **self.kafka.aiokafka_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
        )
        try:  # a refused connection (TLS, SASL) fails start: the consumer is closed all the same
            await consumer.start()
            partitions = await self._partitions(consumer)
            assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            if self.from_beginning:
                await consumer.seek_to_beginning(*assigned)
            else:
                await consumer.seek_to_end(*assigned)
            for tp in assigned:  # resolve the positions now: what is produced after this is seen
                await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        return self

    async def _partitions(self, consumer: AIOKafkaConsumer) -> set[int]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.metadata_timeout_s
        partitions = consumer.partitions_for_topic(self.topic)
        while not partitions:
            if loop.time() > deadline:
                raise ValueError(f"topic {self.topic!r} does not exist on {self.kafka.broker}")
            await asyncio.sleep(0.2)
            await refresh_metadata(consumer)
            partitions = consumer.partitions_for_topic(self.topic)
        return partitions

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    async def batch(self, timeout_ms: int = 200) -> list[Any]:
        """The records that arrived (possibly none) within `timeout_ms`, in partition order."""
        assert self._consumer is not None, "use TopicReader as an async context manager"
        batches = await self._consumer.getmany(timeout_ms=timeout_ms)
        return [record for records in batches.values() for record in records]

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            for record in await self.batch():
                yield record

    async def records(self, idle_timeout_s: float | None = None) -> AsyncIterator[Any]:
        """Every record as it arrives; ends after `idle_timeout_s` without one (None: never)."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            for record in await self.batch():
                last = loop.time()
                yield record
            if idle_timeout_s is not None and loop.time() - last > idle_timeout_s:
                return
