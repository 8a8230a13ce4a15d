"""The Faust app: topics, tables and agents, built by a factory (`create_app`) rather than at import time.

- Topics are those of DESIGN §1, with the configured partition count (pre-created by
  `streams.kafka.admin.ensure_topics` before a worker starts). Values are raw bytes: every agent decodes them itself with `instructrec.events.decode`,
  so that an invalid value becomes a dead letter instead of a serializer crash. Keys are the user id
  (clicks, queries, recommendations, feedback) — so these topics and the user tables are co-partitioned — or
  the item id (items).
- Tables: the user context and the served log, keyed by user id, changelog-backed; RocksDB in production,
  memory in tests (`settings.stream.store`).
- At-least-once processing (exactly-once is unreliable on the local broker); duplicates are absorbed by the
  idempotent context updates and the served log's request ids.
- The web server binds to `settings.web.host` (loopback by default), never 0.0.0.0 unasked.

Agents that micro-batch (`stream.take_events`) must touch tables inside `streams.kafka.compat.processing(event)`:
Faust picks the changelog partition and the RocksDB shard of a table write from the *current event*, which
during a batch is whichever event arrived last, not the one being handled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust

from instructrec.config import KafkaSettings, Settings
from streams import agents, web
from streams.deadletter import DeadLetters
from streams.kafka.compat import (
    close_fetcher_quietly,
    flush_the_whole_buffer,
    hide_sasl_tokens,
    pause_after_empty_fetch,
    rejoin_on_empty_assignment,
    rejoin_on_stale_commit,
    seek_uncommitted_to_the_start,
    seek_with_flow_stopped,
)
from streams.metrics import Metrics
from streams.services import Services
from streams.state import context, recovery, served
from streams.state.prequential import Prequential

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    items: faust.TopicT
    clicks: faust.TopicT
    queries: faust.TopicT
    recommendations: faust.TopicT
    feedback: faust.TopicT
    model_updates: faust.TopicT
    dead_letter: faust.TopicT


@dataclass(frozen=True)
class Tables:
    context: Any  # faust Table: user id -> UserContext bytes
    served: Any  # faust Table: user id -> Served bytes


@dataclass
class StreamApp:
    """Everything an agent or view needs, passed explicitly (no module-level state)."""

    app: faust.App
    settings: Settings
    services: Services
    topics: Topics
    tables: Tables
    metrics: Metrics
    dead_letters: DeadLetters
    web_port: int
    # Request ids being answered right now: the query actors run concurrently, and a redelivered query must
    # not be answered while its first delivery is still on its way (the served log knows only finished ones).
    in_flight: set[str] = field(default_factory=set)
    # Rolling quality of each model version's answers against the users' next interactions (this worker's).
    prequential: Prequential = field(default_factory=Prequential)

    def send(self, topic: faust.TopicT, key: str, value: bytes, role: str) -> None:
        """Queue a message on the app's producer without awaiting it (see `streams.state.served` for why)."""
        topic.send_soon(key=key.encode(), value=value)
        self.metrics.events_out.labels(role).inc()


def create_app(settings: Settings, services: Services, *, web_port: int | None = None) -> StreamApp:
    """The app with every agent and view installed; `web_port` overrides `settings.web.port` (two workers on
    one machine need two ports)."""
    if settings.stream.rejoin_on_stale_commit:
        rejoin_on_stale_commit()
    if settings.kafka.empty_fetch_pause_s:
        pause_after_empty_fetch(settings.kafka.empty_fetch_pause_s)
    hide_sasl_tokens()
    rejoin_on_empty_assignment()  # a member the leader did not know of joins again instead of dying
    close_fetcher_quietly()  # a stop with the broker gone must not wait out Faust's stop timeout
    seek_with_flow_stopped()  # records fetched during a rebalance's seek must not be dropped unhandled
    seek_uncommitted_to_the_start()  # ... nor those of a partition nothing was committed on
    flush_the_whole_buffer()  # no offset commit while answers of the queries it covers are still queued
    port = settings.web.port if web_port is None else web_port
    app = faust.App(settings.stream.app_id, **faust_options(settings, port))
    topics = declare_topics(app, settings.kafka)
    tables = declare_tables(app, settings)
    metrics = Metrics()
    stream = StreamApp(
        app=app,
        settings=settings,
        services=services,
        topics=topics,
        tables=tables,
        metrics=metrics,
        dead_letters=DeadLetters(topics.dead_letter, metrics),
        web_port=port,
    )
    agents.install(stream)
    web.install(stream)
    recovery.install(stream)
    return stream


def faust_options(settings: Settings, web_port: int) -> dict[str, Any]:
    kafka, host = settings.kafka, settings.web.host
    data_dir = (
        settings.stream.data_dir
        or Path(settings.state_dir) / "faust" / f"{settings.stream.app_id}-{web_port}"
    )
    data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates its own folder in it, not the parents
    return {
        "broker": kafka.broker,
        "broker_credentials": broker_credentials(kafka),
        "broker_commit_interval": settings.stream.commit_interval_s,
        "topic_partitions": kafka.partitions,
        "topic_replication_factor": kafka.replication_factor,
        "processing_guarantee": "at_least_once",
        "producer_max_batch_size": settings.stream.producer_batch_kb * 1024,
        "consumer_auto_offset_reset": "earliest",
        # Faust hands it to aiokafka's group_instance_id (static membership; see StreamSettings.instance_id).
        "consumer_group_instance_id": settings.stream.instance_id,
        "store": f"{settings.stream.store}://",
        "datadir": str(data_dir),
        "web_enabled": True,
        "web_bind": host,
        "web_host": host,
        "web_port": web_port,
        # Table routing (GET /users/{id}/context on any worker) proxies to the owner's canonical URL.
        "canonical_url": settings.stream.canonical_url or f"http://{host}:{web_port}",
        "key_serializer": "raw",
        "value_serializer": "raw",
    }


def broker_credentials(kafka: KafkaSettings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """The configured SASL/SSL security as Faust credentials (None for plaintext): the same context, user and
    mechanism as `KafkaSettings.aiokafka_kwargs` gives the project's own clients. Faust derives the protocol
    from them: SASL with a context is SASL_SSL, without one SASL_PLAINTEXT."""
    context = kafka.ssl_context() if kafka.tls else None
    if kafka.sasl:
        username, password = kafka.sasl_login()
        return faust.SASLCredentials(
            username=username,
            password=password,
            ssl_context=context,
            mechanism=kafka.sasl_mechanism or "PLAIN",
        )
    return faust.SSLCredentials(context) if context is not None else None


def declare_topics(app: faust.App, kafka: KafkaSettings) -> Topics:
    names = kafka.topics

    def topic(name: str) -> faust.TopicT:
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=kafka.partitions,
            replicas=kafka.replication_factor,
        )

    return Topics(
        items=topic(names.items),
        clicks=topic(names.clicks),
        queries=topic(names.queries),
        recommendations=topic(names.recommendations),
        feedback=topic(names.feedback),
        model_updates=topic(names.model_updates),
        dead_letter=topic(names.dead_letter),
    )


def declare_tables(app: faust.App, settings: Settings) -> Tables:
    stream = settings.stream
    rocksdb = {  # faust.stores.rocksdb.RocksDBOptions; the memory store ignores them
        "write_buffer_size": stream.table_write_buffer_mb * 2**20,
        "max_write_buffer_number": stream.table_write_buffers,
        "block_cache_size": stream.table_block_cache_mb * 2**20,
        "max_open_files": stream.table_max_open_files,
    }

    def table(name: str, help: str):
        # Values are our own compact JSON (bytes): the record classes own their format and its evolution.
        return app.Table(
            name,
            default=None,
            key_type=str,
            value_type=bytes,
            partitions=settings.kafka.partitions,
            help=help,
            options=dict(rocksdb),  # Faust pops keys from it: one copy per table
        )

    return Tables(
        context=table(context.TABLE, "per-user context: recent items, explicit preferences, intention"),
        served=table(served.TABLE, "per-user answered request ids and recent impressions"),
    )
