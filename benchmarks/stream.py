"""Streaming benchmark: end-to-end latency of the query path and throughput of the clicks path, on this machine.

    python benchmarks/stream.py [--json PATH] [--reranker DIR] [--items N] [--duration S] [--triton-timeout S]
                                [--placements SPEC [SPEC ...] [--repeats R]] [--quick]

Starts its own broker (noida-db) and tritonserver (the infra API) under a temporary state folder, serves the
trained reranker (`artifacts/<dataset>/reranker/best`, or `--reranker DIR`; else the offline default model,
which has the same architecture and cost), builds the Qdrant catalogue of ml-latest-small in-process (text
vectors cached under .state/cache; collaborative vectors when `artifacts/<dataset>/` holds the trained
retriever), and runs ONE worker process with production settings (RocksDB tables).

Measured:
- clicks path: every user's first interactions replayed as click events as fast as the producer goes; the
  rate at which the worker applies them (its `instructrec_events_in_total{topic="clicks"}` counter);
- query path at 1, 5 and 10 queries/s (Poisson arrivals, half of them with an intention text): latency from
  the query's send to its recommendation's arrival at a consumer, p50/p99; the non-model overhead, i.e.
  that latency minus the recommendation's `rerank_ms` (the Triton call: model, queueing and gRPC); and
  what Triton itself reports per request (mean queueing and execution), so the rest of `rerank_ms` is the
  transport and the client;
- Triton alone, in the same run and on the same server before any query is sent (the worker idle): the
  served p50 of one 20-candidate request sent after another, and the throughput at 16 concurrent requests
  (benchmarks/serving.py's workload and method: requests shaped as the stream sends them);
- the query path at a quarter of that throughput, and the highest sustainable rate: rates go up, as shares
  of that throughput, until a step leaves a query unanswered (ten seconds after its end) or its p99 exceeds
  one second; `max_qps` is the last rate that kept up, `max_qps_within_slo` the last with p99 ≤ 250 ms.
- ratios that hold on any machine, each of two figures from this run: max_qps / serving throughput at 16;
  quarter-rate p50 and p99 / served p50;
- where the cores went at each step: CPU time of the worker, Triton (server and backend stubs), the broker,
  this load generator and everything else, as cores kept busy and as CPU ms per answered query; and the
  worker's own CPU per query by thread (its /metrics), native threads (BLAS, gRPC, RocksDB) included, and
  its garbage-collection pauses per generation (count, mean, ms per query).

`--placements triton=-5 worker=-5 triton@1,worker@0,broker@0` measures instead what separates the processes
that share the cores: after Triton alone, the quarter rate is offered `--repeats` times under each placement
(and under none: every process at nice 0 on every CPU), interleaved in a rotating order so that drift
falls on all alike. A placement sets, for every thread of a process's session (worker, triton, broker), a
nice value (`name=N`) or the CPUs it may run on (`name@0`, `name@0-1`). JSON: `placements` → {spec:
{p50_ms, p99_ms, overhead_p99_ms: [per repeat], answered, sent, cores, cpu_ms_per_query}}.
JSON keys: rates {"1","5","10": {p50_ms, p99_ms, ...}}, max_qps, max_qps_within_slo, overhead_p99_ms,
serving_throughput_16, served_p50_ms, quarter_rate {qps, p50_ms, p99_ms}, ratios {max_over_serving,
quarter_p50_over_served_p50, quarter_p99_over_served_p50}, steps {rate: {..., cores, cpu_ms_per_query,
worker_threads_cpu_ms_per_query, gc}}, clicks_eps, and details (load average, model, catalogue size, degraded
answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from harness import (  # the benchmarks' shared library module
    CpuBySession,
    arguments,
    build_catalog,
    finish,
    in_folder,
    place_session,
)
from rich.console import Console
from rich.table import Table

from instructrec.adapters.triton.statistics import mean_batch_size, model_stats, per_request_ms
from instructrec.artifacts import Artifacts

REPO = Path(__file__).resolve().parent.parent
DATASET = "ml-latest-small"
MODEL = "instructrec_reranker"
SLO_P99_MS = 250.0
INTENTION_RATE = 0.5  # share of queries with a text


def intentions(dataset, n: int = 5000, seed: int = 0) -> list[str]:
    """Request texts as users would type them: synthesised from random items (the training synthesis), so
    they repeat about as often as real needs do ("something funny") and vary like them otherwise."""
    from instructrec.instructions import specific_intention, vague_intention

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        write = vague_intention if rng.random() < 0.5 else specific_intention
        wish = write(rng.choice(dataset.items), rng, pool="heldout", nouns=dataset.nouns)
        if wish:
            out.append(wish.text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--reranker", type=Path, default=None, help="a saved reranker folder")
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts", help="trained artefacts root")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--items", type=int, default=None, help="catalogue size (default: the whole 5-core set)"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per measured rate")
    parser.add_argument("--clicks-per-user", type=int, default=40)
    parser.add_argument(
        "--triton-timeout",
        type=float,
        default=None,
        help="the reranker call's timeout, s (default: the configured one, 2 s); a busy machine "
        "needs more for answers to be reranked rather than degraded",
    )
    parser.add_argument(
        "--placements",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="compare placements at the quarter rate instead of the rate steps (docstring)",
    )
    parser.add_argument("--repeats", type=int, default=4, help="trials per placement (with --placements)")
    parser.add_argument("--quick", action="store_true", help="shorter steps, smaller catalogue")
    args = parser.parse_args(argv)
    if args.placements:
        args.placements = {spec: Placement.parse(spec) for spec in ("none", *args.placements)}
    if args.quick:
        args.duration, args.items, args.clicks_per_user = 10.0, args.items or 1000, 20
    console = Console()
    result = in_folder(None, "stream-bench-", lambda root: run(root, args, console))
    rendered = report_placements(result) if "placements" in result else report(result)
    return finish(console, rendered, result, args.json_path)


# ------------------------------------------------------------------------------------------------ set-up


def run(root: Path, args, console: Console) -> dict:
    from instructrec.adapters.triton.repository import copy_repository, default_repository, export_version
    from instructrec.config import InfraSettings, QdrantSettings, Settings
    from instructrec.data import load
    from instructrec.infra import Infrastructure, free_port, run_sync
    from instructrec.infra.worker import WorkerProcess
    from streams.kafka.admin import ensure_topics

    dataset = load(DATASET, root=args.data_root)
    reranker_dir, model_name = reranker_folder(args, root)
    repository = copy_repository(default_repository(), root / "repository")
    export_version(reranker_dir, repository, 1, link=True, overwrite=True)
    base = Settings(
        state_dir=root / "state",
        data_root=args.data_root,
        qdrant=QdrantSettings(path=root / "qdrant"),
        infra=InfraSettings(model_repository=repository, models=[MODEL], start_timeout_s=300),
    )
    infrastructure = Infrastructure(base)
    with console.status("starting the broker and tritonserver (loading the reranker)…"):
        state = infrastructure.up(components=["kafka", "triton"])
    try:
        settings = state.settings(base)
        triton = settings.triton
        if args.triton_timeout:
            triton = triton.model_copy(update={"timeout_s": args.triton_timeout})
        settings = settings.model_copy(
            update={
                "triton": triton,
                "model": settings.model.model_copy(update={"artifacts": args.artifacts}),
                "stream": settings.stream.model_copy(update={"store": "rocksdb", "dataset": DATASET}),
            }
        )
        run_sync(ensure_topics(settings.kafka))
        with console.status("building the Qdrant catalogue…"):
            started = time.perf_counter()
            n_items, collaborative = build_catalog(settings, dataset, args.items, REPO / ".state" / "cache")
        console.print(
            f"catalogue: {n_items} items in {time.perf_counter() - started:.0f} s "
            f"(collaborative vectors: {collaborative})"
        )
        worker = WorkerProcess(settings, web_port=free_port(), log=root / "worker.log")
        with worker:
            with console.status("starting the worker…"):
                worker.wait_healthy(300)
            leaders = {"worker": worker.process.pid, "triton": state.triton.pid, "broker": state.kafka.pid}
            cpu = CpuBySession(leaders | {"load": os.getpid()})
            meters = Meters(cpu, worker)
            if args.placements:
                result = asyncio.run(
                    compare_placements(settings, worker, dataset, args, console, leaders, meters)
                )
            else:
                result = asyncio.run(
                    measure(settings, worker, dataset, args, console, state.triton.http_url, meters)
                )
        result["details"].update(
            {
                "reranker": model_name,
                "catalogue_items": n_items,
                "collaborative_vectors": collaborative,
                "triton_timeout_s": settings.triton.timeout_s,
            }
        )
        return result
    finally:
        report_ = infrastructure.down()
        if not report_.ok:
            console.print(f"[red]the infrastructure did not stop cleanly: {report_.problems}")


def reranker_folder(args, root: Path) -> tuple[Path, str]:
    trained = args.reranker or Artifacts.of(args.artifacts, DATASET).best_reranker
    if (trained / "reranker.json").is_file():
        return trained, str(trained)
    from instructrec.model.reranker import default_model

    default_model().save_pretrained(root / "default-reranker")
    return root / "default-reranker", "offline default (untrained; same architecture and cost)"


# ------------------------------------------------------------------------------------------------ measuring


@contextlib.asynccontextmanager
async def prepared(settings, worker, dataset, args, console: Console):
    """What every measurement starts from: the clicks replayed (users with histories; their rate), Triton
    alone measured, request texts, and a listener on the answers, warmed up. Yields (clicks/s, users, texts,
    Triton alone, listener)."""
    clicks_eps, users = await measure_clicks(settings, worker, dataset, args.clicks_per_user, console)
    with console.status("Triton alone: sequential requests, then 16 concurrent…"):
        alone = await served_alone(settings, args.data_root)
    console.print(f"Triton alone: {alone}")
    texts = intentions(dataset)
    listener = Answers(settings)
    await listener.start()
    try:
        await offered(settings, listener, users, texts, rate=2.0, duration=5.0)  # warm-up, not reported
        yield clicks_eps, users, texts, alone, listener
    finally:
        await listener.stop()


async def measure(settings, worker, dataset, args, console: Console, triton_url: str, meters: Meters) -> dict:
    async with prepared(settings, worker, dataset, args, console) as (
        clicks_eps,
        users,
        texts,
        alone,
        listener,
    ):
        rates: dict[str, dict] = {}
        overhead: list[float] = []
        degraded = 0
        for rate in (1.0, 5.0, 10.0):
            before = await model_stats(triton_url, MODEL)
            step = await offered(settings, listener, users, texts, rate, args.duration, meters=meters)
            rates[f"{rate:g}"] = {
                **step.summary(),
                "triton": inside_triton(before, await model_stats(triton_url, MODEL)),
            }
            overhead += step.overheads
            degraded += step.degraded
            console.print(f"{rate:g} q/s: {rates[f'{rate:g}']}")
        quarter = round(alone["throughput_16"] / 4, 1)
        step = await offered(settings, listener, users, texts, quarter, args.duration, meters=meters)
        rates[f"{quarter:g}"] = quarter_step = step.summary()
        overhead += step.overheads
        degraded += step.degraded
        console.print(f"{quarter:g} q/s (a quarter of Triton alone): {quarter_step}")
        max_qps, within_slo = await find_max_rate(
            settings,
            listener,
            users,
            texts,
            args.duration / 2,
            rates,
            alone["throughput_16"],
            console,
            meters,
        )
    served_p50 = alone["p50_ms"]
    return {
        "rates": {key: rates[key] for key in ("1", "5", "10")},
        "max_qps": max_qps,
        "max_qps_within_slo": within_slo,
        "serving_throughput_16": alone["throughput_16"],
        "served_p50_ms": served_p50,
        "quarter_rate": {"qps": quarter, "p50_ms": quarter_step["p50_ms"], "p99_ms": quarter_step["p99_ms"]},
        "ratios": {
            "max_over_serving": round(max_qps / alone["throughput_16"], 3),
            "quarter_p50_over_served_p50": round(quarter_step["p50_ms"] / served_p50, 2),
            "quarter_p99_over_served_p50": round(quarter_step["p99_ms"] / served_p50, 2),
        },
        "overhead_p50_ms": _pct(overhead, 50),
        "overhead_p99_ms": _pct(overhead, 99),
        "clicks_eps": round(clicks_eps, 1),
        "steps": rates,
        "details": {"load_average": os.getloadavg(), "degraded_answers": degraded, "cores": os.cpu_count()},
    }


async def measure_clicks(
    settings, worker, dataset, per_user: int, console: Console
) -> tuple[float, list[str]]:
    from workers.replay import ReplayConfig, replay, replay_events

    events = replay_events(dataset, ReplayConfig(max_per_user=per_user, query_every=0))
    before = clicks_in(worker)
    started = time.perf_counter()
    sender = asyncio.create_task(replay(settings.kafka, events, progress=False))
    with console.status(f"clicks path: {len(events)} click events…"):
        while clicks_in(worker) - before < len(events):
            await asyncio.sleep(0.1)
    elapsed = time.perf_counter() - started
    await sender
    eps = len(events) / elapsed
    console.print(f"clicks: {len(events)} events applied in {elapsed:.1f} s = {eps:.0f} events/s")
    return eps, sorted({e.user_id for e in events})


async def served_alone(settings, data_root: Path, requests: int = 100, concurrent: int = 16) -> dict:
    """The stream's own Triton without the stream: p50 of requests sent one after another, and requests per
    second with `concurrent` always in flight (serving.py's `throughput`, on its workload)."""
    from harness import Workload
    from serving import throughput

    from instructrec.adapters.triton.client import TritonReranker

    workload = Workload.build(str(data_root), max(requests, 12 * concurrent))
    direct = settings.triton.model_copy(update={"timeout_s": 60, "retries": 0})
    async with TritonReranker(direct) as reranker:
        await reranker.score(workload.requests[:4])  # connection set-up, not part of any figure
        latencies = []
        for request in workload.requests[:requests]:
            started = time.perf_counter()
            await reranker.score_one(request)
            latencies.append((time.perf_counter() - started) * 1000)
        rate = await throughput(reranker, workload.requests, concurrent, 12 * concurrent)
    return {"p50_ms": _pct(latencies, 50), "throughput_16": rate}


@dataclass(frozen=True)
class Placement:
    """Nice values and CPU sets per process session (`--placements`): `triton=-5`, `worker@0,broker@0-1`."""

    nice: dict[str, int]
    cpus: dict[str, set[int]]

    NAMES = ("worker", "triton", "broker")

    @classmethod
    def parse(cls, spec: str) -> Placement:
        nice: dict[str, int] = {}
        cpus: dict[str, set[int]] = {}
        for part in spec.split(",") if spec != "none" else ():
            found = re.fullmatch(r"(\w+)([=@])(-?\d+(?:-\d+)?)", part)
            name, sep, value = found.groups() if found else ("", "", "")
            if name not in cls.NAMES:
                raise SystemExit(
                    f"placement {spec!r}: expected NAME=NICE or NAME@CPUS, NAME one of {cls.NAMES}"
                )
            if sep == "=":
                nice[name] = int(value)
            else:
                low, _, high = value.partition("-")
                cpus[name] = set(range(int(low), int(high or low) + 1))
        return cls(nice, cpus)

    def apply(self, leaders: dict[str, int]) -> None:
        """This placement for the named sessions, the default (nice 0, every CPU) for the others."""
        for name in self.NAMES:
            place_session(leaders[name], self.nice.get(name, 0), self.cpus.get(name))


async def compare_placements(
    settings, worker, dataset, args, console: Console, leaders: dict, meters
) -> dict:
    """The quarter rate under each placement, `args.repeats` rounds, each round in a rotated order."""
    specs = list(args.placements)
    trials: dict[str, list[dict]] = {spec: [] for spec in specs}
    async with prepared(settings, worker, dataset, args, console) as (_, users, texts, alone, listener):
        quarter = round(alone["throughput_16"] / 4, 1)
        try:
            for repeat in range(args.repeats):
                for spec in specs[repeat % len(specs) :] + specs[: repeat % len(specs)]:
                    args.placements[spec].apply(leaders)
                    await asyncio.sleep(2.0)  # the previous trial's backlog drains under its own placement
                    step = await offered(
                        settings, listener, users, texts, quarter, args.duration, seed=repeat, meters=meters
                    )
                    trials[spec].append(step.summary())
                    console.print(f"{spec}, round {repeat + 1}: {trials[spec][-1]}")
        finally:
            Placement.parse("none").apply(leaders)
    return {
        "serving_throughput_16": alone["throughput_16"],
        "served_p50_ms": alone["p50_ms"],
        "quarter_rate": quarter,
        "placements": {spec: _trials(runs) for spec, runs in trials.items()},
        "details": {"load_average": os.getloadavg(), "cores": os.cpu_count(), "repeats": args.repeats},
    }


def _trials(runs: list[dict]) -> dict:
    cpu = [r.get("cpu_ms_per_query", {}) for r in runs]
    return {
        "p50_ms": [r["p50_ms"] for r in runs],
        "p99_ms": [r["p99_ms"] for r in runs],
        "overhead_p99_ms": [r["overhead_p99_ms"] for r in runs],
        "answered": sum(r["answered"] for r in runs),
        "sent": sum(r["sent"] for r in runs),
        "cores": round(float(np.mean([r["cores"]["machine"] for r in runs if r.get("cores")])), 2),
        "cpu_ms_per_query": {k: round(float(np.mean([c.get(k, 0.0) for c in cpu])), 1) for k in cpu[0]}
        if cpu and cpu[0]
        else {},
    }


class Meters:
    """What a step measures besides latency: CPU per process (`CpuBySession`), and from the worker's /metrics
    its CPU per thread (`instructrec_thread_cpu_seconds_total`, which sees native threads a profiler does
    not) and its garbage-collection pauses (`instructrec_gc_pause_seconds`)."""

    def __init__(self, cpu: CpuBySession, worker) -> None:
        self.cpu, self.worker = cpu, worker

    def read(self) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
        """(CPU seconds per process, the worker's CPU seconds per thread, its GC [seconds, pauses] per
        generation), so far."""
        with urllib.request.urlopen(self.worker.url("/metrics"), timeout=5) as response:
            text = response.read().decode()
        threads = re.findall(r'instructrec_thread_cpu_seconds_total\{thread="([^"]*)"\} ([0-9.e+]+)', text)
        gc: dict[str, list[float]] = {}
        for kind, generation, value in re.findall(
            r'instructrec_gc_pause_seconds_(sum|count)\{generation="(\d)"\} ([0-9.e+-]+)', text
        ):
            gc.setdefault(generation, [0.0, 0.0])[kind == "count"] = float(value)
        return self.cpu.read(), {name: float(value) for name, value in threads}, gc

    def since(self, before: tuple) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
        """The same, between `before` (a `read`) and now."""
        cpu, threads, gc = self.read()
        return (
            CpuBySession.seconds(before[0], cpu),
            {k: v - before[1].get(k, 0.0) for k, v in threads.items()},
            {
                g: [now - then for now, then in zip(v, before[2].get(g, (0.0, 0.0)), strict=True)]
                for g, v in gc.items()
            },
        )


def clicks_in(worker) -> float:
    with urllib.request.urlopen(worker.url("/metrics"), timeout=5) as response:
        text = response.read().decode()
    match = re.search(r'instructrec_events_in_total\{topic="clicks"\} ([0-9.e+]+)', text)
    return float(match.group(1)) if match else 0.0


class Answers:
    """Every recommendation, with its arrival time (one consumer reading all partitions from the end)."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.arrived: dict[str, tuple[float, object]] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        from instructrec.events import Recommendation, decode
        from streams.kafka.reader import TopicReader

        self._reader = TopicReader(self.settings.kafka, self.settings.kafka.topics.recommendations)
        await asyncio.wait_for(self._reader.__aenter__(), 60)

        async def run() -> None:
            async for record in self._reader:
                now = time.perf_counter()
                answer = decode(Recommendation, record.value)
                self.arrived.setdefault(answer.request_id, (now, answer))

        self._task = asyncio.create_task(run())

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._reader.__aexit__()


class Step:
    def __init__(
        self,
        rate: float,
        sent: dict[str, float],
        listener: Answers,
        duration: float,
        cpu_s: dict[str, float],
        threads_s: dict[str, float],
        gc_s: dict[str, list[float]],
    ) -> None:
        self.rate = rate
        self.cpu_s = cpu_s  # CPU seconds per process from the first send to the last answer's wait
        self.threads_s = threads_s  # the worker's CPU seconds per thread, over the same span
        self.gc_s = gc_s  # the worker's garbage collections: generation -> [seconds, pauses], the same span
        self.latencies, self.overheads, self.degraded = [], [], 0
        self.stages: dict[str, list[float]] = {}
        self.reasons: dict[str, int] = {}
        for request_id, at in sent.items():
            if request_id in listener.arrived:
                arrived, answer = listener.arrived[request_id]
                latency = (arrived - at) * 1000
                self.latencies.append(latency)
                self.overheads.append(max(0.0, latency - answer.timings.get("rerank_ms", 0.0)))
                self.degraded += answer.degraded
                for stage, ms in answer.timings.items():
                    self.stages.setdefault(stage, []).append(ms)
                if answer.reason:
                    reason = re.sub(r"[0-9.]+ s\b|\d+", "N", answer.reason)[:120]  # group alike reasons
                    self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.sent = len(sent)
        self.duration = duration

    @property
    def kept_up(self) -> bool:
        return len(self.latencies) == self.sent and _pct(self.latencies, 99) <= 1000.0

    def summary(self) -> dict:
        return {
            "p50_ms": _pct(self.latencies, 50),
            "p99_ms": _pct(self.latencies, 99),
            "sent": self.sent,
            "answered": len(self.latencies),
            "achieved_qps": round(len(self.latencies) / self.duration, 2),
            "degraded": self.degraded,
            "degraded_reasons": self.reasons,
            "overhead_p50_ms": _pct(self.overheads, 50),
            "overhead_p99_ms": _pct(self.overheads, 99),
            # where the worker's time went (its own clock): stage -> [p50, p99] ms
            "stages_ms": {stage: [_pct(v, 50), _pct(v, 99)] for stage, v in self.stages.items()},
            # cores each process kept busy while the step's queries were sent and answered, and CPU ms per
            # answered query: which process the machine's two cores went to
            "cores": CpuBySession.cores(self.cpu_s) if self.cpu_s else {},
            "cpu_ms_per_query": {
                k: round(v * 1000 / max(1, len(self.latencies)), 1)
                for k, v in self.cpu_s.items()
                if k not in ("machine", "wall")
            },
            "worker_threads_cpu_ms_per_query": {
                k: round(v * 1000 / max(1, len(self.latencies)), 1)
                for k, v in sorted(self.threads_s.items(), key=lambda kv: -kv[1])
                if v > 0
            },
            # the worker's garbage-collection pauses per generation: every thread waits through them
            "gc": {
                generation: {
                    "pauses": int(pauses),
                    "ms_per_query": round(seconds * 1000 / max(1, len(self.latencies)), 2),
                    "mean_ms": round(seconds * 1000 / max(1, pauses), 2),
                }
                for generation, (seconds, pauses) in sorted(self.gc_s.items())
            },
        }


async def offered(
    settings,
    listener: Answers,
    users: list[str],
    texts: list[str],
    rate: float,
    duration: float,
    seed: int = 0,
    meters: Meters | None = None,
) -> Step:
    """Send Poisson arrivals at `rate` for `duration` s; wait up to a second (more for slow answers) after."""
    from instructrec.events import QueryEvent
    from streams.kafka.producer import EventProducer

    rng = random.Random(f"{seed}:{rate}")
    sent: dict[str, float] = {}
    before = meters.read() if meters is not None else None
    async with EventProducer(settings.kafka, linger_ms=0) as producer:
        start = time.perf_counter()
        next_at = start
        while next_at - start < duration:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            text = rng.choice(texts) if rng.random() < INTENTION_RATE else None
            query = QueryEvent(user_id=rng.choice(users), text=text, k=10)
            sent[query.request_id] = time.perf_counter()
            await producer.send(query)
            next_at += rng.expovariate(rate)
    grace = time.perf_counter() + 1.0
    while time.perf_counter() < grace + 9.0 and not set(sent) <= set(listener.arrived):
        await asyncio.sleep(0.05)
    cpu_s, threads_s, gc_s = meters.since(before) if meters is not None else ({}, {}, {})
    return Step(rate, sent, listener, duration, cpu_s, threads_s, gc_s)


# Shares of Triton's own throughput tried after the fixed steps, in order, until one does not keep up.
SHARES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


async def find_max_rate(
    settings,
    listener,
    users,
    texts,
    duration: float,
    done: dict,
    serving: float,
    console: Console,
    meters: Meters,
) -> tuple[float, float]:
    max_qps = within = 0.0
    for key, summary in done.items():
        if summary["answered"] == summary["sent"] and summary["p99_ms"] <= 1000:
            max_qps = max(max_qps, float(key))
            if summary["p99_ms"] <= SLO_P99_MS:
                within = max(within, float(key))
    for rate in sorted({round(share * serving, 1) for share in SHARES} - {float(k) for k in done}):
        if rate <= max_qps:
            continue
        step = await offered(settings, listener, users, texts, rate, duration, meters=meters)
        done[f"{rate:g}"] = step.summary()
        console.print(f"{rate:g} q/s: {done[f'{rate:g}']}")
        if not step.kept_up:
            break
        max_qps = rate
        if _pct(step.latencies, 99) <= SLO_P99_MS:
            within = rate
        await asyncio.sleep(2.0)  # let any backlog drain before the next step
    return max_qps, within


def inside_triton(before: dict, after: dict) -> dict:
    """Mean time per request inside Triton between two statistics snapshots: waiting for an instance, and the
    backend's execution (decode, collate, forward, output); the rest of `rerank_ms` is gRPC and the client."""
    ms = per_request_ms(after, before)
    return {
        "queue_ms": round(ms["queue"], 1),
        "compute_ms": round(sum(v for k, v in ms.items() if k != "queue"), 1),
        "mean_batch": mean_batch_size(before, after),
    }


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


def report_placements(result: dict) -> Table:
    table = Table(
        title=f"placements at {result['quarter_rate']:g} q/s, a quarter of Triton alone "
        f"({result['details']['repeats']} trials each, mean ± standard deviation)"
    )
    for column in (
        "placement",
        "p50 ms",
        "p99 ms",
        "overhead p99 ms",
        "answered/sent",
        "cores busy",
        "CPU ms/query: worker · Triton · broker · load",
    ):
        table.add_column(column, justify="right")

    def spread(values: list[float]) -> str:
        return f"{np.mean(values):.0f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.0f}"

    for spec, trials in result["placements"].items():
        cpu = trials["cpu_ms_per_query"]
        table.add_row(
            spec,
            spread(trials["p50_ms"]),
            spread(trials["p99_ms"]),
            spread(trials["overhead_p99_ms"]),
            f"{trials['answered']}/{trials['sent']}",
            f"{trials['cores']:.2f}",
            " · ".join(f"{cpu.get(k, float('nan')):.0f}" for k in ("worker", "triton", "broker", "load")),
        )
    table.caption = f"Triton alone: p50 {result['served_p50_ms']} ms, {result['serving_throughput_16']} req/s at 16 concurrent"
    return table


def report(result: dict) -> Table:
    table = Table(title=f"stream benchmark ({result['details'].get('reranker')})")
    columns = (
        "rate q/s",
        "p50 ms",
        "p99 ms",
        "overhead p99 ms",
        "rerank p50",
        "in Triton ms",
        "answered/sent",
        "degraded",
        "CPU ms/query: worker · Triton · broker · load · other",
        "cores busy",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for rate, step in result["steps"].items():
        inside = step.get("triton")
        table.add_row(
            rate,
            f"{step['p50_ms']:.1f}",
            f"{step['p99_ms']:.1f}",
            f"{step['overhead_p99_ms']:.1f}",
            f"{step['stages_ms'].get('rerank_ms', [float('nan')])[0]:.1f}",
            f"{inside['queue_ms']} + {inside['compute_ms']}" if inside else "—",
            f"{step['answered']}/{step['sent']}",
            str(step["degraded"]),
            " · ".join(
                f"{cpu.get(k, float('nan')):.0f}" for k in ("worker", "triton", "broker", "load", "other")
            )
            if (cpu := step.get("cpu_ms_per_query"))
            else "—",
            f"{step['cores']['machine']:.2f}" if step.get("cores") else "—",
        )
    ratios = result["ratios"]
    table.caption = (
        f"Triton alone: p50 {result['served_p50_ms']} ms, {result['serving_throughput_16']} req/s at 16 concurrent"
        f" · max / Triton alone {ratios['max_over_serving']:.0%}"
        f" · at a quarter ({result['quarter_rate']['qps']:g} q/s): p50 {ratios['quarter_p50_over_served_p50']}×"
        f" and p99 {ratios['quarter_p99_over_served_p50']}× the served p50\n"
        f"max sustainable {result['max_qps']:g} q/s (p99 ≤ {SLO_P99_MS:g} ms up to {result['max_qps_within_slo']:g} q/s)"
        f" · overhead p99 {result['overhead_p99_ms']} ms at 1, 5, 10 q/s and the quarter · clicks {result['clicks_eps']:.0f} events/s"
        f" · load {', '.join(f'{x:.2f}' for x in result['details']['load_average'])}"
    )
    return table


if __name__ == "__main__":
    sys.exit(main())
