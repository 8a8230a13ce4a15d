"""The local broker's quirks and the shims in streams.kafka.compat, against the real noida-db."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient

from instructrec.config import KafkaSettings
from streams.kafka.compat import pause_after_empty_fetch

pytestmark = pytest.mark.integration


async def test_an_idle_consumer_does_not_spin_on_empty_fetches(kafka_settings: KafkaSettings) -> None:
    """noida-db answers an empty fetch at once (no max wait): unshimmed, one idle consumer sends ~4,000
    fetches a second and spins a core. With the pause it sends at most one per `pause_s`."""
    topic = f"idle-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(**kafka_settings.aiokafka_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    pause_after_empty_fetch(kafka_settings.empty_fetch_pause_s)
    fetches = 0
    shimmed = AIOKafkaClient.send

    async def counting(self, node_id, request, *args, **kwargs):
        nonlocal fetches
        fetches += type(request).__name__.startswith("FetchRequest")
        return await shimmed(self, node_id, request, *args, **kwargs)

    AIOKafkaClient.send = counting
    consumer = AIOKafkaConsumer(topic, **kafka_settings.aiokafka_kwargs(), fetch_max_wait_ms=500)
    try:
        await consumer.start()
        await consumer.getmany(timeout_ms=500)  # assigned and fetching
        fetches = 0
        await asyncio.sleep(2.0)
        # 2 s / 5 ms = 400 at most (fewer on a busy machine); unshimmed it was ~8,000 here
        assert 0 < fetches <= 2.0 / kafka_settings.empty_fetch_pause_s + 10, fetches
    finally:
        await consumer.stop()
        AIOKafkaClient.send = shimmed
