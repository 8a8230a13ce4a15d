"""Prometheus metrics of one stream app, on their own registry (no process-global state: two apps in one
process, as in tests, do not collide). `GET /metrics` serves them.

`ThreadCpu` adds the CPU time of every thread of the process, so where a worker's cores go is one scrape away;
`gc_paused` times the garbage collector's pauses, which stop every thread.

`LiveWindow` turns the cumulative counters and histograms into the figures of the last minute (events/s,
latency quantiles) for `GET /live`: it keeps periodic snapshots and compares the newest with the oldest.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets from 1 ms to 10 s: the query path is expected in the tens of milliseconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BOUNDS = (*LATENCY_BUCKETS, math.inf)  # as exposed: every histogram ends with the +Inf bucket


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
        r.register(ThreadCpu())
        self.gc_pause_seconds = Histogram(
            "instructrec_gc_pause_seconds",
            "garbage-collection pauses by generation: every thread of the process waits through them",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ThreadCpu:
    """A collector: CPU seconds (user + system) per thread of this process, Python threads by their name and
    the others by their kernel name after "native:" (a BLAS or OpenMP pool, gRPC's, RocksDB's). A native pool
    is invisible to a Python profiler: its spin-waiting was once the worker's busiest thread
    (benchmarks/stream.py reads these per step). Linux only (/proc); elsewhere it reports nothing."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "instructrec_thread_cpu_seconds", "CPU time per thread of this process", labels=["thread"]
        )
        for name, seconds in sorted(thread_cpu_seconds().items()):
            family.add_metric([name], seconds)
        yield family


class GcPauses:
    """A `gc.callbacks` hook timing each collection into `Metrics.gc_pause_seconds`. The interpreter holds
    every thread while it collects, so a long pause is a stall of the whole worker (`gc_paused` installs it
    for the worker's lifetime)."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.histogram.labels(str(info["generation"])).observe(time.perf_counter() - self._started)


@contextlib.contextmanager
def gc_paused(metrics: Metrics) -> Iterator[None]:
    """Time garbage collections into `metrics` while the block runs (gc's callbacks are the process's)."""
    hook = GcPauses(metrics.gc_pause_seconds)
    gc.callbacks.append(hook)
    try:
        yield
    finally:
        gc.callbacks.remove(hook)


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed) of this process, read from /proc."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    hz = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = defaultdict(float)
    tasks = Path("/proc/self/task")
    for task in tasks.iterdir() if tasks.is_dir() else ():
        try:
            stat = (task / "stat").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 on: the name may hold spaces
        name = names.get(int(task.name)) or f"native:{comm}"
        totals[name] += (int(fields[11]) + int(fields[12])) / hz  # utime + stime
    return dict(totals)


# ------------------------------------------------------------------------------------------- live figures


def counter_totals(counter: Counter) -> dict[str, float]:
    """A counter with one label: its running total per label value."""
    return {
        next(iter(sample.labels.values())): sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


def cumulative_buckets(histogram: Histogram, **labels: str) -> tuple[float, ...]:
    """One labelled series' cumulative bucket counts, one per `LATENCY_BOUNDS` (zeros until it is observed)."""
    counts = {
        float(sample.labels["le"]): sample.value
        for metric in histogram.collect()
        for sample in metric.samples
        if sample.name.endswith("_bucket") and all(sample.labels.get(k) == v for k, v in labels.items())
    }
    return tuple(counts.get(bound, 0.0) for bound in LATENCY_BOUNDS)


def bucket_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[float]) -> float | None:
    """The q-quantile of a histogram as Prometheus' `histogram_quantile` estimates it (linear within the
    bucket the rank falls in); None without observations. Beyond the last finite bound it can only say
    "at least that bound", so that bound is the answer."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class Snapshot:
    """The cumulative figures `GET /live` compares over time (t: a monotonic clock, seconds)."""

    t: float
    events: dict[str, float]  # events consumed per topic
    query: tuple[float, ...]  # the agent's query path per micro-batch (stage "total"), cumulative buckets
    recommend: tuple[float, ...]  # POST /recommend answered, end to end, cumulative buckets

    @classmethod
    def of(cls, metrics: Metrics, t: float) -> Snapshot:
        return cls(
            t=t,
            events=counter_totals(metrics.events_in),
            query=cumulative_buckets(metrics.stage_seconds, stage="total"),
            recommend=cumulative_buckets(metrics.recommend_seconds, outcome="ok"),
        )


@dataclass
class LiveWindow:
    """Snapshots of the last `window_s` seconds; `figures(now)` is what happened between the oldest and `now`."""

    window_s: float = 60.0
    _snapshots: deque[Snapshot] = field(default_factory=deque)

    def add(self, snapshot: Snapshot) -> None:
        self._snapshots.append(snapshot)
        while self._snapshots[0].t < snapshot.t - self.window_s:
            self._snapshots.popleft()

    def figures(self, now: Snapshot) -> dict:
        """Events/s per topic and latency p50/p99 in ms over the window; None where it cannot tell yet (no
        earlier snapshot, or nothing observed in the window)."""
        base = next((s for s in self._snapshots if s.t < now.t), None)
        if base is None:
            return {"window_s": None, "events_per_s": None, "query_ms": None, "recommend_ms": None}
        elapsed = now.t - base.t
        return {
            "window_s": round(elapsed, 1),
            "events_per_s": {
                topic: (total - base.events.get(topic, 0.0)) / elapsed for topic, total in now.events.items()
            },
            "query_ms": latency_ms(base.query, now.query),
            "recommend_ms": latency_ms(base.recommend, now.recommend),
        }


def latency_ms(before: Sequence[float], after: Sequence[float]) -> dict | None:
    """p50/p99 (ms) and count of what a histogram observed between two cumulative snapshots."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    if delta[-1] <= 0:
        return None
    p50, p99 = (bucket_quantile(q, LATENCY_BOUNDS, delta) for q in (0.5, 0.99))
    return {"p50": p50 * 1000, "p99": p99 * 1000, "count": int(delta[-1])}
