"""Topic administration: the app's topics exist, with the configured partition count, before a worker starts.

Co-partitioning needs every user-keyed topic to have the same partition count, so an existing topic with
another count is an error rather than something to live with.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from instructrec.config import KafkaSettings
from streams.kafka.compat import hide_sasl_tokens

TOPIC_ALREADY_EXISTS = 36  # Kafka error code: a concurrent creator won the race


class TopicError(RuntimeError):
    """The app's topics cannot be created, or exist with the wrong partition count."""


def _admin(kafka: KafkaSettings):
    from aiokafka.admin import AIOKafkaAdminClient

    hide_sasl_tokens()
    return AIOKafkaAdminClient(**kafka.aiokafka_kwargs())


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a library's own error logging while we probe; the probe reports the failure itself."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


async def kafka_metadata(kafka: KafkaSettings) -> dict[str, Any]:
    """One metadata round trip: the brokers, the controller and the topic names."""
    admin = _admin(kafka)
    try:
        with _quiet("aiokafka"):
            await admin.start()
            cluster = await admin.describe_cluster()
            topics = await admin.list_topics()
    finally:
        await admin.close()
    return {**cluster, "topics": sorted(topics)}


async def ensure_topics(kafka: KafkaSettings, names: Iterable[str] | None = None) -> list[str]:
    """Create the app's topics (or `names`) with the configured partition count; return the ones created."""
    from aiokafka.admin import NewTopic

    names = sorted(set(names if names is not None else kafka.topics.all()))
    admin = _admin(kafka)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(name, kafka.partitions, kafka.replication_factor) for name in missing]
            )
            errors = [
                f"{error['topic']}: {error['error_message'] or error['error_code']}"
                for error in response.to_object()["topic_errors"]
                if error["error_code"] not in (0, TOPIC_ALREADY_EXISTS)
            ]
            if errors:
                raise TopicError(f"could not create topics on {kafka.broker}: {'; '.join(errors)}")
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    wrong = {t["topic"]: len(t["partitions"]) for t in described if len(t["partitions"]) != kafka.partitions}
    if wrong:
        raise TopicError(
            f"topics with a partition count other than the configured {kafka.partitions}: {wrong}. "
            f"Delete them (or the broker's data) or configure INSTRUCTREC_KAFKA__PARTITIONS to match."
        )
    return missing
