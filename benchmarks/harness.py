"""What the benchmark scripts share (a library module, not a script): the serving workload of real
instructions, how much of the machine other processes used while a phase ran, the Qdrant catalogue, and the
feedback loop's set-up (loop.py, soak.py): the initial pipeline trained on the first 70% of time, and its own
broker, tritonserver and catalogue for a stream worker and the fine-tune worker.

Scripts import it by name (`from harness import ...`): Python puts a script's own folder on the path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RERANKER = "instructrec_reranker"


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring as the help, and `--json PATH`. Models load offline (from
    local paths): nothing may wait on a hub that cannot be reached."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    return parser


def in_folder(root: Path | None, prefix: str, run: Callable[[Path], dict]) -> dict:
    """`run` in `root` (created, kept) or, without one, in a temporary folder removed afterwards."""
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        return run(root)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        return run(Path(tmp))


def finish(console, rendered, result: dict, json_path: str | None) -> int:
    """Print the tables; write the results as JSON when asked."""
    console.print(rendered)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_path}")
    return 0


class Workload:
    """Real instructions over ml-latest-small in the wire form the stream sends them (`streams/agents/queries.py`
    `render`): explicit preferences from the user's last 100 interactions and 10 of them shown,
    a request text on half of them, and 20 candidates described as the catalogue describes them (title,
    categories, tags). A request of titles alone costs the model about a quarter less than a served one
    (README, Stream): figures measured on it would flatter the server against the stream."""

    def __init__(self, dataset, instructions) -> None:
        from instructrec.catalogue import describe
        from instructrec.serving.wire import encode_request

        self.dataset = dataset
        self.instructions = instructions
        self.ids = [item.id for item in dataset.items]
        self.titles = [item.display_title for item in dataset.items]
        texts = [describe(item.display_title, item.genres, item.tags) for item in dataset.items]
        self.requests = [
            encode_request(ins, self.ids.__getitem__, self.titles.__getitem__, text_of=texts.__getitem__)
            for ins in instructions
        ]

    @classmethod
    def build(cls, data_root: str, n: int, seed: int = 0, text_rate: float = 0.5) -> Workload:
        from instructrec.data import load
        from instructrec.instructions import (
            SynthesisConfig,
            request_instruction,
            specific_intention,
            vague_intention,
        )

        dataset = load("ml-latest-small", root=data_root)
        rng = random.Random(seed)
        window = SynthesisConfig().explicit_window  # as in training, and as the stream keeps it
        instructions = []
        while len(instructions) < n:
            user = rng.randrange(dataset.n_users)
            history = dataset.histories[user]
            seen = {x.item for x in history}
            negatives = set()
            while len(negatives) < 19:
                item = rng.randrange(dataset.n_items)
                if item not in seen:
                    negatives.add(item)
            candidates = [history[-1].item, *sorted(negatives)]
            intention = None
            if rng.random() < text_rate:
                write = vague_intention if rng.random() < 0.5 else specific_intention
                wish = write(rng.choice(dataset.items), rng, pool="heldout", nouns=dataset.nouns)
                intention = wish.text if wish else None
            instructions.append(
                request_instruction(
                    history[-window - 1 : -1],
                    candidates,
                    intention=intention,
                    seed=len(instructions),
                    nouns=dataset.nouns,
                )
            )
        return cls(dataset, instructions)

    def title_of(self, item: int) -> str:
        return self.titles[item]


class ForeignCpu:
    """How many cores other processes kept busy while a phase ran: the machine is shared, so every figure
    says how shared it was. Ours: this process and the tritonserver session (server and backend stubs)."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.cores = 0.0

    def __enter__(self) -> ForeignCpu:
        self._start = (time.perf_counter(), _machine_busy_ticks(), self._own_ticks())
        return self

    def __exit__(self, *exc_info: object) -> None:
        elapsed = time.perf_counter() - self._start[0]
        busy = _machine_busy_ticks() - self._start[1]
        own = self._own_ticks() - self._start[2]
        self.cores = round(max(0.0, busy - own) / os.sysconf("SC_CLK_TCK") / elapsed, 2)

    def _own_ticks(self) -> int:
        return sum(
            ticks
            for pid, session, ticks in _process_ticks()
            if pid == os.getpid() or (self.server_pid is not None and session == self.server_pid)
        )


class CpuBySession:
    """CPU time per named process session between two `read`s (every process of the session, every thread:
    Triton's server and its backend stubs, a worker and its threads), with the machine's busy time beside
    them, so a step can say which process its cores went to. A name may also stand for this process alone
    when it leads no session (a benchmark's own load generator)."""

    def __init__(self, sessions: dict[str, int]) -> None:
        self.sessions = sessions  # name -> the session leader's pid

    def read(self) -> dict[str, float]:
        """CPU seconds so far per name, "machine" (all CPUs' busy time) and "wall" (a monotonic clock)."""
        by_leader = {leader: name for name, leader in self.sessions.items()}
        ticks = dict.fromkeys(self.sessions, 0)
        for pid, session, used in _process_ticks():
            name = by_leader.get(session) or (by_leader.get(pid) if pid == os.getpid() else None)
            if name is not None:
                ticks[name] += used
        hz = os.sysconf("SC_CLK_TCK")
        return {
            **{name: t / hz for name, t in ticks.items()},
            "machine": _machine_busy_ticks() / hz,
            "wall": time.perf_counter(),
        }

    @staticmethod
    def seconds(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """CPU seconds each used between two reads, "other" (the machine's busy time that none of the named
        sessions used), "machine" and "wall" (seconds elapsed)."""
        used = {k: after[k] - before[k] for k in after}
        named = sum(v for k, v in used.items() if k not in ("machine", "wall"))
        return {**used, "other": max(0.0, used["machine"] - named)}

    @staticmethod
    def cores(seconds: dict[str, float]) -> dict[str, float]:
        """Cores each kept busy (CPU seconds over wall seconds), from `seconds`."""
        return {k: round(v / seconds["wall"], 2) for k, v in seconds.items() if k != "wall"}


def place_session(leader: int, niceness: int = 0, cpus: set[int] | None = None) -> int:
    """Every thread of every process in `leader`'s session to `niceness` and, given `cpus`, to those CPUs
    (all of them otherwise). Linux keeps both per thread, and threads started later inherit their creator's.
    Returns how many threads; a nice value below 0 needs CAP_SYS_NICE."""
    cpus = cpus or set(range(os.cpu_count() or 1))
    threads = 0
    for pid, session, _ in _process_ticks():
        if session != leader:
            continue
        with contextlib.suppress(OSError):  # a process or thread that exited meanwhile
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)
                    os.sched_setaffinity(int(task.name), cpus)
                    threads += 1
    return threads


def _process_ticks() -> Iterator[tuple[int, int, int]]:
    """(pid, session, utime + stime of all its threads in clock ticks) for every live process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        yield int(entry.name), int(fields[3]), int(fields[11]) + int(fields[12])


def _machine_busy_ticks() -> int:
    """All CPUs' busy time: /proc/stat's first line less idle and iowait."""
    fields = Path("/proc/stat").read_text().split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    return user + nice + system + irq + softirq + steal


def build_catalog(settings, dataset, limit: int | None, cache_dir: Path) -> tuple[int, bool]:
    """Item vectors straight into the worker's Qdrant storage (what the catalog agent would write)."""
    from instructrec.adapters.qdrant import IndexedItem, ItemIndex
    from instructrec.data.dataset import item_text
    from instructrec.retrieval.text import TextRetriever
    from streams.services import load_collaborative

    items = dataset.items[:limit] if limit else dataset.items
    texts = TextRetriever(cache_dir=cache_dir).fit_texts([item_text(i) for i in items], dataset.name)
    collaborative = load_collaborative(settings)
    cf_dim = collaborative.dim if collaborative else settings.qdrant.cf_dim
    with ItemIndex(settings.qdrant, cf_dim=cf_dim) as index:
        index.ensure_collection()
        index.upsert(
            [
                IndexedItem(
                    item.id,
                    item.display_title,
                    item.genres,
                    item.year,
                    texts.vectors[n],
                    collaborative.vector_of(item.id) if collaborative else None,
                )
                for n, item in enumerate(items)
            ]
        )
    return len(items), collaborative is not None


# ------------------------------------------------------------------- the feedback loop's pipeline (loop, soak)


def initial_pipeline(root: Path, dataset, users: int | None, minutes: float, console):
    """The pipeline trained on the first 70% of time only (interactions up to the 70th percentile of
    timestamps of the first `users` users, 5-core), cached in `root/artifacts`: nothing of the later 30% leaks
    into it. Returns the early dataset, the split time and how long training took (nothing when cached)."""
    from instructrec import experiment
    from instructrec.artifacts import Artifacts
    from workers.replay import time_split

    early, cut = time_split(dataset, 0.7, users)
    layout = Artifacts.of(root / "artifacts", dataset.name)
    timings: dict[str, float] = {}
    if not layout.trained:
        config = experiment.PipelineConfig()
        config.train.max_minutes = minutes
        started = time.perf_counter()
        with console.status(
            f"training the initial pipeline on {early.describe()['interactions']} early interactions…"
        ):
            experiment.fit(early, layout, config, verbose=False)
        timings["initial_training_s"] = round(time.perf_counter() - started, 1)
    return early, cut, timings


def small_cycles(every: int, holdout: int, budget_minutes: float, since_ts: float):
    """Fine-tune settings for a benchmark: a cycle every `every` new examples (a third of that after ten
    minutes), trained for at most `budget_minutes`, learning only from interactions after `since_ts` (the
    initial pipeline has seen the rest); the rest as deployed."""
    from instructrec.config import FinetuneSettings

    return FinetuneSettings(
        every_examples=every,
        min_examples=every // 3,
        every_minutes=10.0,
        holdout=holdout,
        budget_minutes=budget_minutes,
        since_ts=since_ts,
        poll_s=0.5,
    )


@contextlib.contextmanager
def pipeline_services(
    root: Path, dataset, data_root: Path, finetune, console, calibrate_on=None
) -> Iterator[tuple]:
    """Its own broker and tritonserver (the initial reranker in `root/artifacts` as version 1) and Qdrant
    storage holding every item of the dataset (items first seen later are findable by text), all under
    `root`; yields the settings a stream worker and the fine-tune worker (`finetune`) run with, and the
    infrastructure's state (pids, ports). Leaving the block stops what it started. `calibrate_on`: the
    dataset the pipeline was trained on, to export version 1 calibrated as `instructrec export --calibrate`
    does (its choice in `root/models/calibration.json`).

    A kept `root` reuses only the trained pipeline: state, Qdrant storage and model repository start afresh."""
    from instructrec.adapters.triton.repository import copy_repository, default_repository, export_version
    from instructrec.artifacts import Artifacts
    from instructrec.config import InfraSettings, QdrantSettings, Settings
    from instructrec.infra import Infrastructure, run_sync
    from streams.kafka.admin import ensure_topics

    layout = Artifacts.of(root / "artifacts", dataset.name)
    for stale in ("state", "qdrant", "models"):
        shutil.rmtree(root / stale, ignore_errors=True)
    repository = copy_repository(default_repository(), root / "models" / "repository")
    if not any((repository / RERANKER).glob("[0-9]*/reranker")):
        calibration = None
        if calibrate_on is not None:
            calibration = calibrated(layout, calibrate_on, repository, console).to_json()
            (root / "models" / "calibration.json").write_text(calibration)
        export_version(layout.best_reranker, repository, 1, calibration=calibration)
    base = Settings(
        state_dir=root / "state",
        data_root=data_root,
        qdrant=QdrantSettings(path=root / "qdrant"),
        infra=InfraSettings(model_repository=repository, models=[RERANKER], start_timeout_s=300),
    )
    infrastructure = Infrastructure(base)
    with console.status("starting the broker and tritonserver…"):
        state = infrastructure.up(components=["kafka", "triton"])
    try:
        settings = state.settings(base)
        settings = settings.model_copy(
            update={
                "model": settings.model.model_copy(update={"artifacts": root / "artifacts"}),
                "stream": settings.stream.model_copy(update={"store": "rocksdb", "dataset": dataset.name}),
                "triton": settings.triton.model_copy(update={"timeout_s": 10.0}),
                "finetune": finetune,
            }
        )
        run_sync(ensure_topics(settings.kafka))
        with console.status("building the Qdrant catalogue…"):
            build_catalog(settings, dataset, None, REPO / ".state" / "cache")
        yield settings, state
    finally:
        report = infrastructure.down()
        if not report.ok:
            console.print(f"[red]the infrastructure did not stop cleanly: {report.problems}")


def calibrated(layout, dataset, repository: Path, console):
    """The initial reranker's serving options measured on this machine (instructrec.serving.calibration)."""
    from instructrec.adapters.triton.repository import instance_count
    from instructrec.serving.calibration import calibrate
    from workers.commands import validation_requests

    with console.status("calibrating precision and threads on this machine…"):
        requests, targets = validation_requests(layout, dataset)
        found = calibrate(
            layout.best_reranker,
            requests,
            targets,
            instances=instance_count(repository / RERANKER / "config.pbtxt"),
        )
    console.print(f"calibration ({found.seconds:.0f} s): {found.reason}")
    return found


def later_events(dataset, cut: float, users: int | None, query_every: int, text_rate: float, seed: int = 0):
    """Clicks up to `cut` (as fast as possible), then the rest with queries, each in time order. A replayed
    request text is synthesised from the item the user goes on to choose, so `text_rate` 0 (the default)
    keeps the live figures comparable with the offline pipeline's, which has no text."""
    from workers.replay import ReplayConfig, replay_events, split_at

    config = ReplayConfig(
        users=users, query_every=query_every, text_rate=text_rate, k=10, seed=seed, min_history=3
    )
    return split_at(replay_events(dataset, config), cut)
