"""Soak: the stream at a steady rate for `--minutes` while the fine-tune worker cycles. Does anything grow
without bound: memory, file descriptors, consumer lag, latency?

    python benchmarks/soak.py [--json PATH] [--minutes 10] [--rate R] [--root DIR] [--interval S] [--users N]

1. Set-up as benchmarks/loop.py (harness.py): the initial pipeline trained on the first 70% of time of the
   first `--users` users (cached under `--root`; /work/runs/loop-quick holds one for 120 users, the default,
   so that the split time is the one it was trained with); its own broker (noida-db) and tritonserver (the
   initial reranker as version 1, exported calibrated as deployed: `details.calibration`), Qdrant storage
   with every item (embedded: it lives in the stream worker's process); one stream worker (RocksDB tables)
   and the fine-tune worker as child processes. The fine-tune worker runs small cycles (every `--every` new
   examples, `--budget` minutes of training), so that it trains, gates and, when a candidate passes,
   hot-swaps several times during the soak.
2. Warm-up, not measured: the early clicks (contexts and histories) as fast as the broker takes them, until
   both workers' groups have consumed them.
3. Load: the later events at `--rate` events per second for `--minutes`, as users act (`send_live`: a click
   on a served list waits for its answer): queries before every `--query-every`-th interaction, a share
   `--text-rate` of them with a request text. When the later events run out they start again, with fresh
   event and request ids (a repeated id would be dropped as a duplicate) and timestamps moved on by the span
   of the events (event time goes forward); the same users come back.
4. Sampled every `--interval` s: resident memory (VmRSS) and open file descriptors (/proc/<pid>/fd) of the
   stream worker, tritonserver with its Python backend stubs (its child processes), the broker and the
   fine-tune worker, each with its descendants; the stream group's lag on its input topics (items, clicks,
   queries) and the fine-tune group's (clicks, feedback): end offsets less committed offsets (committed
   every second, so a worker that keeps up shows up to about a second's worth); query latency, send to the
   answer read back from the recommendations topic, p50/p99 of the answers that arrived in the interval;
   answers, degraded answers, dead letters (records on the dead-letter topic); the fine-tune store's
   examples and cycles (`peek`) and the reranker versions Triton has ready. After the load, up to `--drain`
   seconds until every query is answered and both lags are 0 (sampled too, as phase "drain"). Verdicts: the
   store's cycles and the `model-updates` topic.
5. Growth: the least-squares slope, per minute, of each process's RSS and FDs and of both lags over the
   second half of the load (the first half is warm-up: tables fill, the allocator and the first cycles reach
   their working set). The bar: a slope that would not double the series' mean level in `--horizon-hours`
   (24: a process that doubles its memory or descriptors within a day needs a daily restart, whatever its
   limit), and for lag, less than one second's worth of events (`--rate`) per minute: a worker that keeps up
   has a flat lag, one that falls behind by a second every minute never catches up. The verdict is "no
   unbounded growth" only if every slope is below its bar — but the local broker's memory, reported and not
   judged: noida-db keeps every record in memory without retention, so it grows with the data by design. A
   process's descriptors are judged without the RocksDB table files (`.sst`) the stream worker's tables hold
   open: those come and go in steps as data is flushed and compacted, and the bar on them is a ceiling, the
   cap the configuration puts on them (`STREAM__TABLE_MAX_OPEN_FILES` per partition of each table; series
   `worker.table_fds`). A short run's slope also holds steps (a connection opened once, a cycle's model
   loaded): a failed bar says where to look, not that it leaks.
   A process that exits during the soak fails the verdict too (its series stop there).
6. Clean-up: every process a sample saw must be gone after the stop (`left_running`); the workers' exit
   codes (0: a clean stop on SIGTERM).

Times are seconds since the load began on the wall clock, which the fine-tune store and Kafka's record
timestamps use too; `paused_s` is how long the machine (a VM) stood still meanwhile (wall clock minus
monotonic clock): a pause shows up as latency and as a gap between samples.

JSON keys: samples [{t_s, phase, processes {worker, triton, broker, finetune: {rss_mb, fds, table_fds, threads,
anon_mb, shmem_mb, parts [[name, pid, rss_mb]], processes} | null}, lag {stream, finetune}, events_sent, queries_sent, answered, degraded, dead_letters,
p50_ms, p99_ms, examples, cycles, cycle_running, triton_versions, paused_s, sample_s}], slopes
{"<process>.rss_mb" | "<process>.fds" | "worker.table_fds" | "lag.<group>": {per_min, se, mean, threshold, ok,
judged, bound (the threshold is a ceiling on the level)}}, unanswered,
verdict, plus minutes (the table's rows), exited, cycles, model_updates, lag_end, left_running, exit_codes,
removed_shm and details.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import sqlite3
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from harness import (  # the benchmarks' shared library module
    RERANKER,
    arguments,
    finish,
    in_folder,
    initial_pipeline,
    later_events,
    pipeline_services,
    small_cycles,
)
from rich.console import Console, Group
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
DATASET = "ml-latest-small"
NO_GROWTH = "no unbounded growth"
PROCESSES = {
    "worker": "stream worker",
    "triton": "tritonserver + stubs",
    "broker": "broker",
    "finetune": "fine-tune worker",
}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the steady load runs")
    parser.add_argument("--rate", type=float, default=20.0, help="events per second (clicks and queries)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--drain", type=float, default=60.0, help="most seconds to wait for the last answers")
    parser.add_argument(
        "--horizon-hours", type=float, default=24.0, help="the growth bar: no doubling within"
    )
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--root", type=Path, default=None, help="work folder (kept; its trained pipeline is reused)"
    )
    parser.add_argument(
        "--users", type=int, default=120, help="the first N users (0: all); as the pipeline was trained"
    )
    parser.add_argument("--train-minutes", type=float, default=2.0, help="initial reranker's budget")
    parser.add_argument("--budget", type=float, default=1.0, help="a cycle's training budget, minutes")
    parser.add_argument("--every", type=int, default=300, help="new examples per cycle")
    parser.add_argument("--holdout", type=int, default=200, help="the newest examples each gate judges on")
    parser.add_argument("--query-every", type=int, default=5)
    parser.add_argument("--text-rate", type=float, default=0.3, help="share of queries with a request text")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    result = in_folder(args.root, "instructrec-soak-", lambda root: run(root, args, console))
    return finish(console, report(result), result, args.json_path)


# ----------------------------------------------------------------------------------------------------- run


def run(root: Path, args, console: Console) -> dict:
    from instructrec.data import load
    from instructrec.infra import FinetuneProcess, free_port
    from instructrec.infra.worker import WorkerProcess

    users = args.users or None
    dataset = load(DATASET, root=args.data_root)
    early, cut, timings = initial_pipeline(root, dataset, users, args.train_minutes, console)
    finetune = None
    exit_codes: dict[str, int | None] = {}
    cycles = small_cycles(args.every, args.holdout, args.budget, cut)
    # Version 1 exported calibrated, as deployed (`instructrec export --calibrate`) and as the loop serves it.
    with pipeline_services(root, dataset, args.data_root, cycles, console, calibrate_on=early) as (
        settings,
        state,
    ):
        try:
            before, after = later_events(dataset, cut, users, args.query_every, args.text_rate)
            events = steady_events(after, math.ceil(args.rate * args.minutes * 60))
            worker = WorkerProcess(settings, web_port=free_port(), log=root / "worker.log")
            with worker:
                with console.status("starting the stream worker…"):
                    worker.wait_healthy(300)
                finetune = FinetuneProcess(settings, log=root / "finetune.log").start()
                roots = {
                    "worker": worker.process.pid,
                    "triton": state.triton.pid,
                    "broker": state.kafka.pid,
                    "finetune": finetune.process.pid,
                }
                monitor = Monitor(settings, roots, f"http://{state.triton.http_url}")
                result = asyncio.run(soak(settings, monitor, before, events, args, console))
                exit_codes["worker"] = worker.stop()
        finally:
            if finetune is not None:
                exit_codes["finetune"] = finetune.stop()
    # Everything this run started is stopped by now: any process seen in a sample that still runs is a leak.
    result["left_running"] = monitor.still_running()
    result["exit_codes"] = exit_codes  # 0: a clean stop; < 0: killed by that signal (-9: after the timeout)
    result["removed_shm"] = monitor.remove_stub_regions(state.triton)
    result["cycles"] = read_cycles(settings, monitor.wall_t0)
    result["details"].update(
        {
            "split_ts": cut,
            "users": users,
            "early_clicks": len(before),
            "later_events": len(after),
            "passes": math.ceil(len(events) / len(after)),
            "pids": monitor.roots,
            "load_average": os.getloadavg(),
            "calibration": json.loads((root / "models" / "calibration.json").read_text()),
            **timings,
        }
    )
    if result["left_running"]:
        problems = [] if result["verdict"] == NO_GROWTH else [result["verdict"]]
        result["verdict"] = "; ".join([*problems, f"left running after the stop: {result['left_running']}"])
    return result


def steady_events(after: list, n: int) -> list:
    """`n` events: the later events in order, again and again. Each pass after the first gets fresh event and
    request ids (the stream and the fine-tune worker drop a repeated id as a duplicate) and timestamps moved
    on by the span of the events, so that event time keeps going forward."""
    span = after[-1].ts - after[0].ts + 1.0
    out: list = []
    for n_pass in itertools.count():
        for event in after:
            if len(out) == n:
                return out
            if n_pass == 0:
                out.append(event)
                continue
            update = {"event_id": f"{event.event_id}-{n_pass}", "ts": event.ts + n_pass * span}
            if event.request_id:
                update["request_id"] = f"{event.request_id}-{n_pass}"
            out.append(event.model_copy(update=update))
    return out


# ------------------------------------------------------------------------------------------------ sampling


class Monitor:
    """What a sample reads: the processes (/proc), the broker's offsets (one admin client and one group-less
    consumer, kept open: a client per sample would churn connections and descriptors of its own), the
    fine-tune store and Triton's repository index."""

    def __init__(self, settings, roots: dict[str, int], triton_http: str) -> None:
        self.settings = settings
        self.roots = roots
        self.triton_http = triton_http
        self.seen: dict[int, int] = {}  # every pid sampled -> its start time: all must be gone at the end
        self.regions: set[str] = set()  # shared-memory regions Triton's stubs named
        self.wall_t0, self.monotonic_t0 = time.time(), time.monotonic()
        kafka = settings.kafka
        topics = kafka.topics
        self.groups = {
            "stream": (settings.stream.app_id, [topics.items, topics.clicks, topics.queries]),
            "finetune": (settings.finetune.group_id, [topics.clicks, topics.feedback]),
        }

    async def __aenter__(self) -> Monitor:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        kafka = self.settings.kafka
        self.admin = AIOKafkaAdminClient(**kafka.aiokafka_kwargs())
        self.consumer = AIOKafkaConsumer(**kafka.aiokafka_kwargs(), group_id=None, enable_auto_commit=False)
        await self.admin.start()
        await self.consumer.start()
        self.dead_letters_before = 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.consumer.stop()
        with contextlib.suppress(Exception):
            await self.admin.close()

    def now(self) -> float:
        """Seconds since the soak began, on the wall clock: the store's cycles and Kafka's record timestamps
        are on it too (this machine is a VM that may be paused, and then its monotonic clock stops)."""
        return time.time() - self.wall_t0

    def paused(self) -> float:
        """Seconds the machine stood still since the soak began: the wall clock ran on, the monotonic did not."""
        return self.now() - (time.monotonic() - self.monotonic_t0)

    async def start_soak(self) -> None:
        """The soak's clock starts now, and its dead letters are those from now on."""
        self.dead_letters_before = await self.records(self.settings.kafka.topics.dead_letter) or 0
        self.wall_t0, self.monotonic_t0 = time.time(), time.monotonic()

    # -- the broker

    async def _ends(self, topics: list[str]) -> dict:
        from aiokafka import TopicPartition

        partitions = [TopicPartition(t, p) for t in topics for p in range(self.settings.kafka.partitions)]
        return await self.consumer.end_offsets(partitions)

    async def records(self, topic: str) -> int | None:
        try:
            async with asyncio.timeout(10):
                return sum((await self._ends([topic])).values())
        except Exception:
            return None

    async def lag(self, group: str) -> int | None:
        """Records on the group's topics that it has not committed yet (None: the broker did not answer)."""
        group_id, topics = self.groups[group]
        try:
            async with asyncio.timeout(10):  # a stalled broker must not stall the sampling
                committed = await self.admin.list_consumer_group_offsets(group_id)
                ends = await self._ends(topics)
                starts = await self.consumer.beginning_offsets(list(ends))
        except Exception:
            return None
        return sum(
            max(
                0,
                end - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else starts[tp]),
            )
            for tp, end in ends.items()
        )

    # -- the rest

    def processes(self) -> dict[str, dict | None]:
        from instructrec.infra.triton import stub_regions

        self.regions |= stub_regions(self.roots["triton"])
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _stat(int(entry.name))):
                parents[int(entry.name)] = int(stat[1])
        out: dict[str, dict | None] = {}
        for name, pid in self.roots.items():
            tree = [pid, *_descendants(pid, parents)] if pid in parents else []
            usage = [u for p in tree if (u := self._usage(p))]
            out[name] = (
                {
                    "rss_mb": round(sum(u.rss_kb for u in usage) / 1024, 1),
                    # Which kind of memory, in which process: a growing total says nothing about where.
                    "anon_mb": round(sum(u.anon_kb for u in usage) / 1024, 1),
                    "shmem_mb": round(sum(u.shmem_kb for u in usage) / 1024, 1),
                    "parts": [[u.name, u.pid, round(u.rss_kb / 1024, 1)] for u in usage],
                    "fds": sum(u.fds for u in usage),
                    "table_fds": sum(u.table_fds for u in usage),
                    "threads": sum(u.threads for u in usage),
                    "processes": len(usage),
                }
                if usage
                else None
            )
        return out

    def _usage(self, pid: int) -> Usage | None:
        """Resident memory, open descriptors, threads; None once the process is gone (or a zombie: no VmRSS)."""
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            targets = _fd_targets(pid)
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmRSS" not in fields:
            return None
        if pid not in self.seen and (stat := _stat(pid)):
            self.seen[pid] = int(stat[19])
        kb = {
            key: int(fields[key].split()[0]) if key in fields else 0
            for key in ("VmRSS", "RssAnon", "RssShmem")
        }
        name = fields.get("Name", "").strip()
        fds, table_fds = len(targets), sum(t.endswith(".sst") for t in targets)
        return Usage(
            pid, name, kb["VmRSS"], kb["RssAnon"], kb["RssShmem"], fds, table_fds, int(fields["Threads"])
        )

    def store(self) -> dict:
        from workers.finetune.store import peek
        from workers.finetune.worker import store_path

        try:
            return peek(store_path(self.settings))
        except sqlite3.Error:  # the worker holds a write lock longer than peek waits
            return {}

    def triton_versions(self) -> list[str] | None:
        request = urllib.request.Request(
            f"{self.triton_http}/v2/repository/index", data=b'{"ready": true}', method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                index = json.loads(response.read())
        except (OSError, ValueError):
            return None
        return sorted((m.get("version", "") for m in index if m.get("name") == RERANKER), key=_numeric)

    def still_running(self) -> list[int]:
        from instructrec.infra.processes import is_running

        return sorted(pid for pid, ticks in self.seen.items() if is_running(pid, ticks))

    def remove_stub_regions(self, triton) -> list[str]:
        """After `down`: the shared memory our stubs named and nobody maps. `down` removes it itself unless
        the server died first (its stubs, which name the regions, are gone by then) while another
        tritonserver runs on the machine (then it cannot tell whose the unnamed regions are)."""
        from instructrec.infra.triton import mapped_shm_files, remove_path, triton_leftovers

        leftovers = triton_leftovers(triton, self.regions, others_running=True, in_use=mapped_shm_files())
        for path in leftovers:
            remove_path(path)
        return [path.name for path in leftovers]


@dataclass(frozen=True)
class Usage:
    """One process at one sample (memory in kB, as /proc/<pid>/status gives it)."""

    pid: int
    name: str
    rss_kb: int
    anon_kb: int
    shmem_kb: int  # shared memory it has touched (Triton: the Python backend's regions), in each mapper's RSS
    fds: int
    table_fds: int  # of them, RocksDB's table files (.sst): the stream worker's tables
    threads: int


def _fd_targets(pid: int) -> list[str]:
    """What each of the process's open descriptors points at (one that closes meanwhile is skipped)."""
    folder = f"/proc/{pid}/fd"
    targets = []
    for fd in os.listdir(folder):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"{folder}/{fd}"))
    return targets


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 on (state, ppid, ...): field 2, the name, may hold spaces."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _descendants(pid: int, parents: dict[int, int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _numeric(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (sys.maxsize, version)


class Traffic:
    """The queries sent and their answers, on the soak's clock."""

    def __init__(self) -> None:
        self.events = 0
        self.sent: dict[str, float] = {}
        self.arrived: dict[str, tuple[float, bool, str]] = {}  # request id -> (arrival, degraded, version)

    def latencies(self, since: float, until: float) -> list[float]:
        """Latency (ms) of the answers that arrived in [since, until)."""
        return [(at - self.sent[r]) * 1000 for r, (at, _, _) in self.arrived.items() if since <= at < until]


async def soak(settings, monitor: Monitor, before, events, args, console: Console) -> dict:
    from instructrec.events import QueryEvent, Recommendation, decode
    from streams.kafka.producer import EventProducer
    from streams.kafka.reader import TopicReader
    from workers.replay import Answers, send_live

    kafka = settings.kafka
    traffic = Traffic()
    answers = Answers()
    samples: list[dict] = []

    async def listen(reader) -> None:
        async for record in reader:
            answer = decode(Recommendation, record.value)
            answers.add(answer.request_id)
            if answer.request_id in traffic.sent and answer.request_id not in traffic.arrived:
                traffic.arrived[answer.request_id] = (monitor.now(), answer.degraded, answer.model_version)

    def on_sent(event) -> None:
        traffic.events += 1
        if isinstance(event, QueryEvent):
            traffic.sent[event.request_id] = monitor.now()

    async def sample(phase: str, since: float) -> dict:
        now, started = monitor.now(), time.monotonic()
        window = traffic.latencies(since, now)
        store = await asyncio.to_thread(monitor.store)
        row = {
            "t_s": round(now, 1),
            "phase": phase,
            "processes": monitor.processes(),
            "lag": {group: await monitor.lag(group) for group in monitor.groups},
            "events_sent": traffic.events,
            "queries_sent": len(traffic.sent),
            "answered": len(traffic.arrived),
            "degraded": sum(d for _, d, _ in traffic.arrived.values()),
            "dead_letters": _minus(
                await monitor.records(kafka.topics.dead_letter), monitor.dead_letters_before
            ),
            "p50_ms": _pct(window, 50),
            "p99_ms": _pct(window, 99),
            "examples": store.get("examples"),
            "cycles": store.get("cycles"),
            "cycle_running": store.get("running"),
            "triton_versions": await asyncio.to_thread(monitor.triton_versions),
            "paused_s": round(monitor.paused(), 1),
        }
        row["sample_s"] = round(time.monotonic() - started, 2)  # long: the broker or the store was slow
        samples.append(row)
        return row

    async def sampling(phase: list[str], status) -> None:
        since, next_at = 0.0, time.monotonic()
        while True:
            next_at += args.interval
            while next_at < time.monotonic():  # a sample took longer than the interval: skip, not catch up
                next_at += args.interval
            await asyncio.sleep(next_at - time.monotonic())
            row = await sample(phase[0], since)
            since = row["t_s"]
            status.update(
                f"{phase[0]}: {row['t_s'] / 60:.1f} of {args.minutes:g} min · lag {row['lag']['stream']} · "
                f"p99 {row['p99_ms']} ms · answered {row['answered']}/{row['queries_sent']} · "
                f"cycles {row['cycles']}{' (training)' if row['cycle_running'] else ''}"
            )

    async with (
        monitor,
        TopicReader(kafka, kafka.topics.recommendations) as reader,
        EventProducer(kafka) as producer,
    ):
        listener = asyncio.create_task(listen(reader))
        with console.status(f"warm-up: {len(before)} early clicks (contexts and histories)…"):
            await producer.send_all(before)
            await producer.flush()
            warm_up_s = await caught_up(monitor, timeout_s=600)
        console.print(
            f"warm-up: {len(before)} early clicks consumed in {warm_up_s:.0f} s"
            if warm_up_s is not None
            else f"[red]warm-up: {len(before)} early clicks not consumed within 600 s; soaking anyway"
        )
        await monitor.start_soak()
        phase = ["soak"]
        with console.status("soak: starting…") as status:
            sampler = asyncio.create_task(sampling(phase, status))
            clicks_unanswered = await send_live(
                producer, events, rate=args.rate, answers=answers, on_sent=on_sent
            )
            soak_s = monitor.now()
            phase[0] = "drain"
            # Until every query is answered and both groups have committed everything (or `--drain` s).
            while monitor.now() < soak_s + args.drain:
                if len(traffic.arrived) == len(traffic.sent) and await caught_up(monitor, timeout_s=0):
                    break
                await asyncio.sleep(1.0)
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        end = await sample("end", samples[-1]["t_s"] if samples else 0.0)
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        updates = await model_updates(kafka, monitor.wall_t0)
    soaked = [s for s in samples if s["phase"] == "soak"]
    exited = {
        name: next(s["t_s"] for s in samples if s["processes"][name] is None)
        for name in PROCESSES
        if any(s["processes"][name] is None for s in samples)
    }
    slopes = growth(soaked, soak_s, args, table_files_cap(settings))
    grows = [name for name, s in slopes.items() if not s["ok"] and s["judged"]]
    problems = [f"growth above the bar: {', '.join(grows)}"] if grows else []
    if exited:  # its slopes stop where it died: nothing can be said about its growth
        problems.append("exited: " + ", ".join(f"{PROCESSES[n]} at {t:.0f} s" for n, t in exited.items()))
    return {
        "samples": samples,
        "slopes": slopes,
        "unanswered": len(traffic.sent) - len(traffic.arrived),
        "verdict": "; ".join(problems) or NO_GROWTH,
        "exited": exited,
        "minutes": minute_rows(samples, traffic, soak_s),
        "lag_end": {"soak": soaked[-1]["lag"] if soaked else None, "after_drain": end["lag"]},
        "model_updates": updates,
        "details": {
            "soak_started": monitor.wall_t0,  # epoch seconds: t_s = 0 (to align the logs)
            "paused_s": round(monitor.paused(), 1),
            "soak_s": round(soak_s, 1),
            "warm_up_s": None if warm_up_s is None else round(warm_up_s, 1),
            "rate": args.rate,
            "events_scheduled": len(events),
            "events_sent": traffic.events,
            "queries_sent": len(traffic.sent),
            "degraded": sum(d for _, d, _ in traffic.arrived.values()),
            "clicks_sent_before_their_answer": clicks_unanswered,
            "p50_ms": _pct(traffic.latencies(0, soak_s + args.drain + 1), 50),
            "p99_ms": _pct(traffic.latencies(0, soak_s + args.drain + 1), 99),
            "interval_s": args.interval,
            "horizon_hours": args.horizon_hours,
            "finetune": {"every": args.every, "holdout": args.holdout, "budget_minutes": args.budget},
        },
    }


async def caught_up(monitor: Monitor, timeout_s: float) -> float | None:
    """Seconds until both groups have committed everything on their topics; None if not within `timeout_s`
    (0: look once)."""
    started = time.monotonic()
    while True:
        if all([await monitor.lag(group) == 0 for group in monitor.groups]):
            return time.monotonic() - started
        if time.monotonic() - started >= timeout_s:
            return None
        await asyncio.sleep(1.0)


async def model_updates(kafka, since_wall: float) -> list[dict]:
    """The verdicts on `model-updates` since the soak began (the stream's prequential updates are counted)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from instructrec.events import ModelUpdate, decode

    consumer = AIOKafkaConsumer(**kafka.aiokafka_kwargs(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    out: list[dict] = []
    prequential = 0
    try:
        partitions = [TopicPartition(kafka.topics.model_updates, p) for p in range(kafka.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in partitions]
            if all(at >= ends[tp] for at, tp in zip(positions, partitions, strict=True)):
                break
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    update = decode(ModelUpdate, record.value)
                    if update.kind == "prequential":
                        prequential += 1
                    elif record.timestamp / 1000 >= since_wall:
                        out.append(
                            {
                                "t_s": round(record.timestamp / 1000 - since_wall, 1),
                                "kind": update.kind,
                                "version": update.version,
                                "accepted": update.accepted,
                                "reason": update.reason,
                            }
                        )
    finally:
        await consumer.stop()
    return [*out, {"kind": "prequential", "count": prequential}]


def read_cycles(settings, since_wall: float) -> list[dict]:
    """Every cycle in the fine-tune store (read once its worker has stopped), on the soak's clock."""
    from workers.finetune.worker import store_path

    path = store_path(settings)
    if not path.is_file():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        rows = db.execute("SELECT id, started, finished, verdict FROM cycles ORDER BY id").fetchall()
    out = []
    for cycle, started, finished, verdict in rows:
        v = json.loads(verdict or "{}")
        out.append(
            {
                "cycle": cycle,
                "started_s": round(started - since_wall, 1),
                "seconds": round(finished - started, 1) if finished else None,  # None: stopped mid-cycle
                "accepted": bool(v.get("accepted")),
                "version": v.get("published_version") or v.get("version"),
                "examples": v.get("examples"),
                "reason": v.get("reason"),
            }
        )
    return out


# ------------------------------------------------------------------------------------------------- growth


def growth(samples: list[dict], soak_s: float, args, table_files_cap: int) -> dict[str, dict]:
    """Least-squares slopes per minute over the second half of the load, each against its bar. A process's
    `fds` are its descriptors other than RocksDB's table files; those (`table_fds`) follow the tables' data
    and compaction in steps, and are judged against the cap the configuration puts on them."""
    half = [s for s in samples if s["t_s"] >= soak_s / 2]
    series: dict[str, list[tuple[float, float]]] = {}
    for name in PROCESSES:
        alive = [(s["t_s"], s["processes"][name]) for s in half if s["processes"].get(name)]
        series[f"{name}.rss_mb"] = [(t, p["rss_mb"]) for t, p in alive]
        series[f"{name}.fds"] = [(t, p["fds"] - p.get("table_fds", 0)) for t, p in alive]
    tables = [
        (s["t_s"], s["processes"]["worker"].get("table_fds", 0)) for s in half if s["processes"]["worker"]
    ]
    for group in ("stream", "finetune"):
        series[f"lag.{group}"] = [
            (s["t_s"], s["lag"][group]) for s in half if s["lag"].get(group) is not None
        ]
    out = {}
    for name, points in series.items():
        t, y = [p[0] / 60 for p in points], [float(p[1]) for p in points]
        per_min, se = _slope(t, y)
        mean = float(np.mean(y)) if y else float("nan")
        # Memory and descriptors: no doubling of the mean level within the horizon. Lag: under a second's
        # worth of events per minute (a worker that keeps up has a flat lag).
        threshold = args.rate if name.startswith("lag.") else mean / (args.horizon_hours * 60)
        out[name] = {
            "per_min": _round(per_min),
            "se": _round(se),
            "mean": _round(mean),
            "threshold": _round(threshold),
            "ok": bool(per_min == per_min and per_min < threshold),  # NaN (too few samples) fails
            "judged": name not in NOT_JUDGED,
        }
    y = [float(v) for _, v in tables]
    per_min, se = _slope([t / 60 for t, _ in tables], y)
    out["worker.table_fds"] = {
        "per_min": _round(per_min),
        "se": _round(se),
        "mean": _round(float(np.mean(y))) if y else float("nan"),
        "threshold": table_files_cap,
        "ok": bool(y) and max(y) <= table_files_cap,
        "judged": True,
        "bound": True,  # the bar is a ceiling on the level, not on the slope
    }
    return out


def table_files_cap(settings) -> int:
    """The most RocksDB table files the stream worker's tables may hold open: the per-partition cap
    (`STREAM__TABLE_MAX_OPEN_FILES`) for each partition of each table (context, served)."""
    return settings.stream.table_max_open_files * settings.kafka.partitions * 2


# The local broker (noida-db) keeps every record in memory and has no retention: its memory follows the data
# the soak writes, by design. Reported, not judged; a Kafka cluster bounds its log by retention.
NOT_JUDGED = {"broker.rss_mb"}


def _slope(t: list[float], y: list[float]) -> tuple[float, float]:
    """The least-squares slope and its standard error (NaN with fewer than three points)."""
    if len(t) < 3:
        return float("nan"), float("nan")
    x, v = np.asarray(t), np.asarray(y)
    slope, intercept = np.polyfit(x, v, 1)
    residual = v - (slope * x + intercept)
    spread = float(np.sum((x - x.mean()) ** 2))
    se = math.sqrt(float(np.sum(residual**2)) / (len(x) - 2) / spread) if spread else float("nan")
    return float(slope), se


def minute_rows(samples: list[dict], traffic: Traffic, soak_s: float) -> list[dict]:
    """One row per minute of the load: the processes and lag at the minute's last sample; latency, answers
    and degraded answers of the queries sent in it; then the state after the drain."""
    rows = []
    for minute in range(math.ceil(soak_s / 60)):
        lo, hi = minute * 60, min((minute + 1) * 60, soak_s)
        inside = [s for s in samples if s["phase"] == "soak" and lo <= s["t_s"] < hi + 1]
        if not inside:
            continue
        last = inside[-1]
        sent = [r for r, at in traffic.sent.items() if lo <= at < hi]
        answered = [r for r in sent if r in traffic.arrived]
        latency = [(traffic.arrived[r][0] - traffic.sent[r]) * 1000 for r in answered]
        rows.append(
            {
                "minute": f"{minute}–{hi / 60:.3g}",  # the last one may be partial
                **_state(last),
                "p50_ms": _pct(latency, 50),
                "p99_ms": _pct(latency, 99),
                "sent": len(sent),
                "answered": len(answered),
                "degraded": sum(traffic.arrived[r][1] for r in answered),
                "versions": sorted({traffic.arrived[r][2] for r in answered}, key=_numeric),
            }
        )
    end = samples[-1] if samples else None
    if end is not None:
        rows.append({"minute": "after drain", **_state(end), "sent": 0, "answered": 0, "degraded": 0})
    return rows


def _state(sample: dict) -> dict:
    return {
        "t_s": sample["t_s"],
        "rss_mb": {n: (p or {}).get("rss_mb") for n, p in sample["processes"].items()},
        "fds": {n: (p or {}).get("fds") for n, p in sample["processes"].items()},
        "lag": sample["lag"],
        "dead_letters": sample["dead_letters"],
        "cycles": sample["cycles"],
        "cycle_running": sample["cycle_running"],
        "triton_versions": sample["triton_versions"],
    }


def _minus(a: int | None, b: int) -> int | None:
    return None if a is None else a - b


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


def _round(x: float) -> float:
    return round(x, 3) if x == x else x


# ------------------------------------------------------------------------------------------------- report


def report(result: dict) -> Group:
    d = result["details"]
    over_time = Table(
        title=f"soak: {d['soak_s'] / 60:.1f} min at {d['rate']:g} events/s while the fine-tune worker cycles"
    )
    over_time.add_column("minute")
    for label in PROCESSES.values():
        over_time.add_column(f"{label} MB", justify="right")
    for column in (
        "FDs w/t/b/f",
        "lag",
        "p50 ms",
        "p99 ms",
        "answered/sent",
        "degraded",
        "cycles",
        "Triton versions",
    ):
        over_time.add_column(column, justify="right")
    for row in result["minutes"]:
        over_time.add_row(
            row["minute"],
            *[_num(row["rss_mb"].get(name)) for name in PROCESSES],
            "/".join(_num(row["fds"].get(name)) for name in PROCESSES),
            _num(row["lag"].get("stream")),
            _num(row.get("p50_ms")),
            _num(row.get("p99_ms")),
            f"{row['answered']}/{row['sent']}",
            str(row["degraded"]),
            f"{row['cycles']}{' +1' if row['cycle_running'] else ''}",
            ",".join(row["triton_versions"] or []) or "—",
        )
    over_time.caption = (
        "RSS and FDs at the minute's last sample, each process with its children (Triton: its backend stubs); "
        "lag: the stream group's; latency and answers: the queries sent in the minute; cycles: finished "
        "(+1 training)"
    )
    slopes = Table(
        title=f"growth over the second half of the load, per minute (bar: no doubling within "
        f"{d['horizon_hours']:g} h; lag: under {d['rate']:g} events/min)"
    )
    for column in ("series", "mean", "slope/min", "± se", "bar", ""):
        slopes.add_column(column, justify="right")
    for name, s in result["slopes"].items():
        slopes.add_row(
            name,
            _num(s["mean"]),
            _num(s["per_min"], 3),
            _num(s["se"], 3),
            _num(s["threshold"], 0 if s.get("bound") else 3),
            _mark(s),
        )
    cycles = result.get("cycles", [])
    verdicts = [u for u in result.get("model_updates", []) if u.get("kind") != "prequential"]
    summary = Table(title="summary")
    summary.add_column("")
    summary.add_column("", justify="right")
    for label, value in (
        ("events sent / scheduled", f"{d['events_sent']} / {d['events_scheduled']}"),
        ("queries unanswered (after the drain)", f"{result['unanswered']} of {d['queries_sent']}"),
        ("query p50 / p99, ms", f"{d['p50_ms']} / {d['p99_ms']}"),
        (
            "degraded answers / dead letters",
            f"{d['degraded']} / {_num(result['samples'][-1]['dead_letters'])}",
        ),
        ("longest sample, s (the broker and the store answer within it)", _num(_longest(result), 1)),
        ("lag at the end of the load: stream / fine-tune", _lags(result["lag_end"]["soak"])),
        ("lag after the drain: stream / fine-tune", _lags(result["lag_end"]["after_drain"])),
        (
            "fine-tune cycles: finished (accepted) / stopped mid-cycle",
            f"{sum(c['seconds'] is not None for c in cycles)} ({sum(c['accepted'] for c in cycles)}) / "
            f"{sum(c['seconds'] is None for c in cycles)}",
        ),
        (
            "cycle seconds",
            ", ".join(f"{c['seconds']:.0f}" for c in cycles if c["seconds"] is not None) or "—",
        ),
        (
            "verdicts on model-updates",
            ", ".join(f"{u['version']}: {'accepted' if u['accepted'] else 'rejected'}" for u in verdicts)
            or "—",
        ),
        ("processes that exited during the soak", _exits(result.get("exited", {}))),
        ("processes left running after the stop", str(result.get("left_running", []) or "none")),
        (
            "exit codes at the stop: stream / fine-tune worker",
            " / ".join(str(result.get("exit_codes", {}).get(n)) for n in ("worker", "finetune")),
        ),
        ("Triton shared memory removed after the stop", ", ".join(result.get("removed_shm", [])) or "none"),
        ("machine paused (wall clock ran, monotonic did not), s", str(d.get("paused_s"))),
        ("load average", ", ".join(f"{x:.2f}" for x in d["load_average"])),
        ("verdict", result["verdict"]),
    ):
        summary.add_row(label, str(value))
    return Group(over_time, slopes, summary)


def _mark(s: dict) -> str:
    if not s["judged"]:
        return "not judged: the broker's log"
    if s.get("bound"):
        return "ok: within the cap" if s["ok"] else "[red]over the cap"
    return "ok" if s["ok"] else "[red]above"


def _longest(result: dict) -> float | None:
    return max((s["sample_s"] for s in result["samples"]), default=None)


def _exits(exited: dict[str, float]) -> str:
    return ", ".join(f"{PROCESSES[n]} at {t:.0f} s" for n, t in exited.items()) or "none"


def _lags(lags: dict | None) -> str:
    return " / ".join(_num(v) for v in (lags or {}).values()) or "—"


def _num(x, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


if __name__ == "__main__":
    sys.exit(main())
