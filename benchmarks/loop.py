"""The feedback loop end to end: the stream serving ml-latest-small in time order while the fine-tune worker
learns from it, gates what it learned and hot-swaps it into Triton.

    python benchmarks/loop.py [--json PATH] [--minutes M] [--budget M] [--every N] [--rate R] [--quick]

1. The initial pipeline is trained on the first 70% of time only (interactions up to the 70th percentile of
   timestamps, 5-core): nothing of the later 30% leaks into it.
2. Its own broker, tritonserver (the initial reranker as version 1, exported calibrated: precision and
   threads measured on this machine, `details.calibration`; later versions inherit the choice) and Qdrant
   (every item of the dataset, so items first seen later are findable by text); one stream worker; the
   fine-tune worker as its own process (`python -m workers.finetune`, `threads` 1 unless `--threads`, at
   `nice` 10; `--cycle-examples` and `--replay` as deployed unless given: `details.finetune`), told to learn
   only from interactions after the split (`since_ts`: the initial model has seen the rest).
3. The first 70% replayed as clicks (contexts and histories), then the last 30% in time order at `--rate`
   events per second, with a query before every `--query-every`-th interaction of a user (a share with an
   intention text) and the interaction naming it, as a click on a served list does.
4. Measured: every cycle's wall time, examples and verdict; for each accepted version, NDCG@10 and HR@10 of
   the new version and of the one before it on the same later window — the examples that arrived after the
   swap, ranked as serving ranks them (the gate's computation) — beside the stream's own live prequential
   figures per version (`/metrics`); the initial pipeline's figure on all later examples (the offline
   pipeline on the same users); query latency while a cycle trains against while none does (no query may go
   unanswered); LoRA against a full fine-tune on the same examples and budget (examples per second, and the
   gate's NDCG@10 gain over version 1 on the same holdout); and the gate's verdict on a deliberately
   corrupted candidate (trained on shuffled answers).

JSON keys: versions [{version, accepted, ndcg10_before, ndcg10_after, hr10_before, hr10_after, window}],
cycle_s_max, corrupted_rejected, serving_p99_ms_during_cycle, serving_p99_ms_idle, plus details.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from harness import (  # the benchmarks' shared library module
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
MODEL = "instructrec_reranker"


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--root", type=Path, default=None, help="work folder (kept); default: a temporary one"
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="initial reranker's training budget")
    parser.add_argument("--budget", type=float, default=6.0, help="a cycle's training budget, minutes")
    parser.add_argument("--every", type=int, default=3000, help="new examples per cycle")
    parser.add_argument("--holdout", type=int, default=1500, help="the newest examples each gate judges on")
    parser.add_argument("--rate", type=float, default=40.0, help="events per second of the later replay")
    parser.add_argument("--query-every", type=int, default=5)
    parser.add_argument("--text-rate", type=float, default=0.0, help="share of queries with a request text")
    parser.add_argument("--users", type=int, default=None, help="only the first N users")
    parser.add_argument("--judge", type=int, default=2000, help="most examples a version is judged on")
    parser.add_argument(
        "--method", choices=["auto", "lora", "full"], default="auto", help="the fine-tune worker's method"
    )
    # What a cycle trains on and with: FinetuneSettings' defaults unless given (benchmarks/finetune_curve.py
    # measures what more fresh examples per candidate buy).
    parser.add_argument("--cycle-examples", type=int, default=None, help="most examples a cycle prepares")
    parser.add_argument("--replay", type=float, default=None, help="share of a cycle's older examples")
    parser.add_argument("--threads", type=int, default=None, help="the fine-tune worker's torch threads")
    parser.add_argument("--quick", action="store_true", help="a short run: few users, small cycles")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.budget, args.every, args.holdout, args.users = 2.0, 1.0, 400, 300, 120
    console = Console(width=None if sys.stdout.isatty() else 200)
    result = in_folder(args.root, "instructrec-loop-", lambda root: run(root, args, console))
    return finish(console, report(result), result, args.json_path)


# ----------------------------------------------------------------------------------------------------- run


def run(root: Path, args, console: Console) -> dict:
    from instructrec.data import load
    from instructrec.infra import FinetuneProcess, free_port
    from instructrec.infra.worker import WorkerProcess

    dataset = load(DATASET, root=args.data_root)
    early, cut, timings = initial_pipeline(root, dataset, args.users, args.minutes, console)
    chosen = {"cycle_examples": args.cycle_examples, "replay": args.replay, "threads": args.threads}
    cycles_config = small_cycles(args.every, args.holdout, args.budget, cut).model_copy(
        update={"method": args.method, **{k: v for k, v in chosen.items() if v is not None}}
    )
    finetune = None
    with pipeline_services(root, dataset, args.data_root, cycles_config, console, calibrate_on=early) as (
        settings,
        _,
    ):
        try:
            before, after = later_events(dataset, cut, args.users, args.query_every, args.text_rate)
            worker = WorkerProcess(settings, web_port=free_port(), log=root / "worker.log")
            with worker:
                worker.wait_healthy(300)
                finetune = FinetuneProcess(settings, log=root / "finetune.log").start()
                measured = asyncio.run(replay(settings, worker, before, after, args, console))
                time.sleep(10)  # the worker ingests the last events; a cycle they make due starts
                cycles = finished_cycles(settings, wait_s=args.budget * 60 + 240)
                live = live_prequential(worker)
        finally:
            if finetune is not None:
                finetune.stop()
    result = judge_versions(settings, cycles, root, args.judge)
    result.update(measured)
    result["live_prequential"] = live
    result["cycles"] = cycles
    result["cycle_s_max"] = max((c["seconds"] for c in cycles), default=0.0)
    result.update(side_studies(settings, root))
    result["details"] = {
        "split_ts": cut,
        "method": args.method,
        "finetune": cycles_config.model_dump(
            include={
                "every_examples",
                "holdout",
                "budget_minutes",
                "cycle_examples",
                "replay",
                "threads",
                "nice",
            }
        ),
        "early": early.describe(),
        "later_events": len(after),
        "load_average": os.getloadavg(),
        # version 1's serving options, measured on this machine (the versions after it inherit them)
        "calibration": json.loads((root / "models" / "calibration.json").read_text()),
        **timings,
    }
    return result


async def replay(settings, worker, before, after, args, console: Console) -> dict:
    """Replay as users act (`send_live`: a click on a list waits for its answer); every query's latency,
    classified by whether a fine-tune cycle was training when it was sent."""
    from instructrec.events import QueryEvent, Recommendation, decode
    from streams.kafka.producer import EventProducer
    from streams.kafka.reader import TopicReader
    from workers.replay import Answers, send_live

    sent: dict[str, float] = {}
    latency: dict[str, float] = {}
    training_at: dict[str, bool] = {}
    answered = Answers()
    training = False

    async def listen(reader) -> None:
        async for record in reader:
            answer = decode(Recommendation, record.value)
            answered.add(answer.request_id)
            if answer.request_id in sent and answer.request_id not in latency:
                latency[answer.request_id] = (time.perf_counter() - sent[answer.request_id]) * 1000

    async def watch_cycles() -> None:
        nonlocal training
        while True:
            training = await asyncio.to_thread(cycle_running, settings)
            await asyncio.sleep(0.5)

    def on_sent(event) -> None:
        if isinstance(event, QueryEvent):
            sent[event.request_id] = time.perf_counter()
            training_at[event.request_id] = training

    async with TopicReader(settings.kafka, settings.kafka.topics.recommendations) as reader:
        tasks = [asyncio.create_task(listen(reader)), asyncio.create_task(watch_cycles())]
        async with EventProducer(settings.kafka) as producer:
            with console.status(f"replaying {len(before)} early clicks…"):
                await producer.send_all(before)
                await producer.flush()
            await asyncio.sleep(5)
            started = time.perf_counter()
            with console.status(
                f"replaying {len(after)} later events at {args.rate:g}/s while the worker learns…"
            ):
                unanswered = await send_live(
                    producer, after, rate=args.rate, answers=answered, on_sent=on_sent
                )
        deadline = time.monotonic() + 120
        while len(latency) < len(sent) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        for task in tasks:
            task.cancel()
    during = [latency[r] for r in latency if training_at.get(r)]
    idle = [latency[r] for r in latency if not training_at.get(r)]
    return {
        "queries": len(sent),
        "answered": len(latency),
        "clicks_sent_before_their_answer": unanswered,
        "serving_p50_ms_during_cycle": _pct(during, 50),
        "serving_p99_ms_during_cycle": _pct(during, 99),
        "serving_p50_ms_idle": _pct(idle, 50),
        "serving_p99_ms_idle": _pct(idle, 99),
        "queries_during_cycle": len(during),
        "replay_s": round(time.perf_counter() - started, 1),
    }


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


def _store(settings) -> Path:
    from workers.finetune.worker import store_path

    return store_path(settings)


def cycle_running(settings) -> bool:
    from workers.finetune.store import peek

    return bool(peek(_store(settings))["running"])


def _publishing(settings) -> bool:
    """Whether an accepted cycle's version has yet to go out (its final record names the example after
    which it served: `live_after`)."""
    with contextlib.closing(sqlite3.connect(f"file:{_store(settings)}?mode=ro", uri=True, timeout=5)) as db:
        waiting = db.execute(
            "SELECT COUNT(*) FROM cycles WHERE finished IS NOT NULL AND json_extract(verdict, '$.accepted')"
            " AND json_extract(verdict, '$.live_after') IS NULL"
        ).fetchone()[0]
    return bool(waiting)


def finished_cycles(settings, wait_s: float) -> list[dict]:
    """Every cycle's verdict, once none is running or publishing (or `wait_s` has passed). A cycle records
    its verdict before its version goes out: stopping the worker in between would report an accepted
    candidate under its candidate name, with no version and no window to judge it on."""
    deadline = time.monotonic() + wait_s
    while (cycle_running(settings) or _publishing(settings)) and time.monotonic() < deadline:
        time.sleep(2)
    with sqlite3.connect(_store(settings), timeout=5) as db:
        rows = db.execute("SELECT id, started, finished, verdict FROM cycles ORDER BY id").fetchall()
    out = []
    for cycle, started, finished, verdict in rows:
        if finished is None:
            continue
        v = json.loads(verdict or "{}")
        out.append(
            {
                "cycle": cycle,
                "accepted": bool(v.get("accepted")),
                "version": str(v.get("published_version") or v.get("version")),
                "incumbent": v.get("incumbent"),
                "reason": v.get("reason"),
                "seconds": round(finished - started, 1),  # wall: split, prepare, train, gate, publish
                "train_s": round(v.get("metrics", {}).get("train_s", 0.0), 1),
                "examples": v.get("examples"),
                "examples_per_s": round(v.get("examples_per_s") or 0.0, 2),
                "live_after": v.get("live_after"),
                "carried": v.get("carried", 1),  # cycles of examples the candidate trained on
                "metrics": v.get("metrics", {}),
            }
        )
    return out


def judge_versions(settings, cycles: list[dict], root: Path, most: int) -> dict:
    """Each accepted version against the one it replaced, on the examples that arrived while it served (after
    its swap, before the next): neither trained on them. And version 1 on all later examples."""
    from instructrec.artifacts import Artifacts
    from instructrec.experiment import PipelineConfig
    from instructrec.model.reranker import Reranker
    from instructrec.planner import OfflinePlanner
    from instructrec.serving.options import ServingOptions
    from workers.finetune import cycle as cycle_code
    from workers.finetune.store import ExampleStore

    layout = Artifacts.of(root / "artifacts", DATASET)
    pipeline = PipelineConfig.load(layout.pipeline)
    planner = OfflinePlanner.load(layout, retriever=pipeline.retriever, config=pipeline.plan)
    store = ExampleStore(_store(settings))
    repository = settings.triton.repository

    def weights(version) -> Path:
        return repository / MODEL / str(version) / "reranker"

    def loaded(version) -> Reranker:  # as Triton serves it: the version's own (inherited) calibration
        options = ServingOptions(calibrated=True).for_version(weights(version).parent)
        return cycle_code.as_served(Reranker.from_pretrained(weights(version)), options)

    def judge(new, old, examples):
        return cycle_code.gate(
            loaded(new),
            loaded(old),
            _evenly(examples, most),
            planner,
            pipeline.weight_for,
            settings.finetune,
        ).verdict.metrics

    accepted = [c for c in cycles if c["accepted"] and c["live_after"] is not None]
    versions = []
    try:
        later = _evenly([e for _, e in store.examples()], most)
        offline = judge(1, 1, later)
        for n, c in enumerate(accepted):
            upto = accepted[n + 1]["live_after"] if n + 1 < len(accepted) else None
            window = [e for _, e in store.examples(after=c["live_after"], upto=upto)]
            row = {"version": c["version"], "accepted": True, "previous": c["incumbent"], "window": 0}
            if window and weights(c["version"]).exists() and weights(c["incumbent"]).exists():
                m = judge(c["version"], c["incumbent"], window)
                row.update(
                    ndcg10_before=m.get("incumbent_ndcg@10"),
                    ndcg10_after=m.get("candidate_ndcg@10"),
                    hr10_before=m.get("incumbent_hr@10"),
                    hr10_after=m.get("candidate_hr@10"),
                    p_better=m.get("p_better"),
                    window=int(m.get("judged", 0)),
                )
            versions.append(row)
        versions += [
            {"version": c["version"], "accepted": False, "reason": c["reason"]}
            for c in cycles
            if not c["accepted"]
        ]
    finally:
        store.close()
    # The gate judges lists that hold the chosen item; the stream's live figures count every answer, so the
    # offline figure to set beside them counts a chosen item the plan missed as a miss too.
    share = offline.get("judged", 0) / max(1, len(later))
    return {
        "versions": versions,
        "offline_ndcg10": offline.get("incumbent_ndcg@10", 0.0) * share,
        "offline_hr10": offline.get("incumbent_hr@10", 0.0) * share,
        "offline_ndcg10_judged": offline.get("incumbent_ndcg@10"),
        "offline_examples": len(later),
        "offline_judged": int(offline.get("judged", 0)),
    }


def _evenly(examples: list, most: int) -> list:
    """At most `most` of them, spread evenly over the window (scoring every one would take longer than the
    replay)."""
    if len(examples) <= most:
        return examples
    step = len(examples) / most
    return [examples[int(i * step)] for i in range(most)]


def live_prequential(worker) -> dict:
    """The stream's rolling figures per model version, from its /metrics."""
    with urllib.request.urlopen(worker.url("/metrics"), timeout=10) as response:
        text = response.read().decode()
    out: dict[str, dict] = {}
    for line in text.splitlines():
        for name, key in (
            ("instructrec_prequential_ndcg10{", "ndcg@10"),
            ("instructrec_prequential_hr10{", "hr@10"),
        ):
            if line.startswith(name):
                version = line.split('version="')[1].split('"')[0]
                out.setdefault(version, {})[key] = round(float(line.split()[-1]), 4)
        if line.startswith("instructrec_prequential_answers_total{"):
            version = line.split('version="')[1].split('"')[0]
            out.setdefault(version, {})["answers"] = float(line.split()[-1])
    return out


STUDY_BUDGET_S = 180.0  # each side study's training budget: the same for every candidate


def side_studies(settings, root: Path) -> dict:
    """On the stored examples, in this process, once the services are stopped (so on every core): LoRA
    against a full fine-tune — the same examples, the same budget, judged by the gate against the served
    version on the same holdout — and the gate's verdict on a candidate trained on shuffled answers."""
    from instructrec.artifacts import Artifacts
    from instructrec.experiment import PipelineConfig
    from instructrec.model.reranker import Reranker
    from instructrec.planner import OfflinePlanner
    from instructrec.serving.options import ServingOptions
    from workers.finetune import cycle as cycle_code
    from workers.finetune.store import ExampleStore

    layout = Artifacts.of(root / "artifacts", DATASET)
    pipeline = PipelineConfig.load(layout.pipeline)
    planner = OfflinePlanner.load(layout, retriever=pipeline.retriever, config=pipeline.plan)
    store = ExampleStore(_store(settings))
    try:
        split = cycle_code.split_examples(store, 0, settings.finetune, seed=7)
    finally:
        store.close()
    # Every study starts from the initial version, whatever the cycles published.
    weights = settings.triton.repository / MODEL / "1" / "reranker"
    # Judged as served (version 1's calibrated precision), as the worker judges.
    served = ServingOptions(calibrated=True).for_version(weights.parent)
    incumbent = cycle_code.as_served(Reranker.from_pretrained(weights), served)
    sample = split.train[-1500:]

    def study(method: str, corrupt: bool = False) -> tuple:
        config = settings.finetune.model_copy(update={"method": method})
        prepared = cycle_code.prepare(sample, planner, pipeline.k, seed=3, corrupt=corrupt)
        candidate = Reranker.from_pretrained(weights)
        trained = cycle_code.train_candidate(candidate, prepared, planner.catalogue, config, STUDY_BUDGET_S)
        judged = cycle_code.gate(
            cycle_code.as_served(candidate, served),
            incumbent,
            split.holdout,
            planner,
            pipeline.weight_for,
            settings.finetune,
        )
        return trained, judged.verdict

    out: dict = {"study_budget_s": STUDY_BUDGET_S, "study_examples": len(sample)}
    for method in ("lora", "full"):
        trained, verdict = study(method)
        out[f"{method}_examples_per_s"] = round(trained.examples_per_s, 2)
        out[f"{method}_gain_ndcg10"] = verdict.metrics.get("gain_ndcg@10")
        out[f"{method}_p_better"] = verdict.metrics.get("p_better")
        out[f"{method}_loss"] = [round(trained.loss_first, 3), round(trained.loss_last, 3)]
    _, verdict = study("auto", corrupt=True)
    out["corrupted_rejected"] = not verdict.accepted
    out["corrupted_verdict"] = {"reason": verdict.reason, **verdict.metrics}
    return out


# ------------------------------------------------------------------------------------------------- report


def report(result: dict) -> Group:
    versions = Table(title="the feedback loop on ml-latest-small: the later 30% of time, replayed live")
    for column in (
        "version",
        "verdict",
        "NDCG@10 before → after",
        "HR@10 before → after",
        "judged",
        "cycles trained",
        "cycle s",
    ):
        versions.add_column(column, justify="right")
    by_version = {c["version"]: c for c in result.get("cycles", [])}
    for v in result["versions"]:
        c = by_version.get(v["version"], {})
        versions.add_row(
            v["version"],
            _verdict(v),
            _arrow(v.get("ndcg10_before"), v.get("ndcg10_after")),
            _arrow(v.get("hr10_before"), v.get("hr10_after")),
            str(v.get("window", "")),
            str(c.get("carried", "")),
            str(c.get("seconds", "")),
        )
    online = Table(
        title="online (the stream's prequential figures) and offline (version 1 on the same examples)"
    )
    for column in ("", "NDCG@10", "HR@10", "answers / examples"):
        online.add_column(column, justify="right")
    for version, figures in sorted(result.get("live_prequential", {}).items()):
        online.add_row(
            f"live, version {version}",
            f"{figures.get('ndcg@10', float('nan')):.4f}",
            f"{figures.get('hr@10', float('nan')):.4f}",
            f"{figures.get('answers', 0):.0f}",
        )
    online.add_row(
        "offline pipeline",
        f"{result.get('offline_ndcg10', float('nan')):.4f}",
        f"{result.get('offline_hr10', float('nan')):.4f}",
        str(result.get("offline_examples", "")),
    )
    figures = Table(title="serving while learning, and the learning itself")
    figures.add_column("")
    figures.add_column("", justify="right")
    for label, value in (
        ("queries answered", f"{result.get('answered')} of {result.get('queries')}"),
        ("query p50 / p99 while a cycle trains, ms", _pair(result, "during_cycle")),
        ("query p50 / p99 while none does, ms", _pair(result, "idle")),
        ("longest cycle, s (≤ 600)", result.get("cycle_s_max")),
        (
            "examples trained per second: LoRA / full (same examples, every core)",
            f"{result.get('lora_examples_per_s')} / {result.get('full_examples_per_s')}",
        ),
        (
            "NDCG@10 gain over version 1 on the holdout: LoRA / full (same examples and budget)",
            f"{_signed(result.get('lora_gain_ndcg10'))} / {_signed(result.get('full_gain_ndcg10'))}",
        ),
        ("a candidate trained on shuffled answers: rejected", result.get("corrupted_rejected")),
    ):
        figures.add_row(label, str(value))
    return Group(versions, online, figures)


def _pair(result: dict, which: str) -> str:
    return f"{result.get(f'serving_p50_ms_{which}')} / {result.get(f'serving_p99_ms_{which}')}"


def _signed(value) -> str:
    return "" if value is None else f"{value:+.4f}"


def _verdict(v: dict) -> str:
    if not v["accepted"]:
        return f"rejected: {v.get('reason', '')[:60]}"
    return "accepted" if v.get("window") else "accepted (swapped in after the last example)"


def _arrow(before, after) -> str:
    if before is None or after is None:
        return ""
    return f"{before:.4f} → {after:.4f}"


if __name__ == "__main__":
    sys.exit(main())
