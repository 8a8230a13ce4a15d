"""Prometheus metrics of one stream app, on their own registry (no process-global state: two apps in one
process, as in tests, do not collide). `GET /metrics` serves them."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets from 1 ms to 10 s: the query path is expected in the tens of milliseconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.events_in = Counter("instructrec_events_in", "events consumed", ["topic"], registry=r)
        self.events_out = Counter("instructrec_events_out", "events produced", ["topic"], registry=r)
        self.dead_letters = Counter(
            "instructrec_dead_letters", "events sent to the dead-letter topic", ["topic"], registry=r
        )
        self.duplicates = Counter(
            "instructrec_duplicates", "redelivered events skipped", ["topic"], registry=r
        )
        self.degraded = Counter(
            "instructrec_degraded_answers", "answers flagged degraded", ["cause"], registry=r
        )
        self.stage_seconds = Histogram(
            "instructrec_stage_seconds",
            "query path stage durations",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "instructrec_query_batch_size",
            "queries per micro-batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.recommend_seconds = Histogram(
            "instructrec_recommend_seconds",
            "POST /recommend end to end",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.catalog_items = Counter(
            "instructrec_catalog_items_indexed", "items written to Qdrant", registry=r
        )
        self.recovery_restarts = Counter(
            "instructrec_recovery_restarts", "stalled table recoveries restarted", registry=r
        )
        self.prequential_ndcg = Gauge(
            "instructrec_prequential_ndcg10",
            "rolling NDCG@10 of answers against the user's next interaction",
            ["version"],
            registry=r,
        )
        self.prequential_hr = Gauge(
            "instructrec_prequential_hr10",
            "rolling HR@10 of answers against the next interaction",
            ["version"],
            registry=r,
        )
        self.prequential_answers = Counter(
            "instructrec_prequential_answers",
            "answers scored against the next interaction",
            ["version"],
            registry=r,
        )
        self.reranker_circuit_open = Gauge(
            "instructrec_reranker_circuit_open", "1 while the reranker circuit breaker is open", registry=r
        )

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
