"""Time and peak memory as the catalogue grows: synthetic catalogues of 10k users × 5k items and 100k × 50k
(with --max also 1M × 200k), so that growth with users, items and interactions is visible.

    python benchmarks/scale.py [--json PATH] [--sizes 10k,100k] [--max] [--epochs N] [--negatives N]

Catalogue: item popularity follows a power law (the item of popularity rank r drawn ∝ 1/r), history lengths
are log-normal (median 12, σ 1.1: most users short, a long tail cut at 2,000), and 60% of a history walks
the catalogue in small steps, so that item-to-item and sequential models have something to learn.

Each stage runs in its own child process (a fresh interpreter reading the catalogue from disk) and reports
that process's peak RSS (VmHWM), so no stage's peak hides another's:
- data: importing the pipeline and building the catalogue's `Dataset` and split, which every other stage
  also does (its floor);
- fit: `experiment.fit_retrievers` without the text retriever: popularity, co-occurrence, item-kNN, SASRec
  and the blend's weight tuning, the item-item retrievers capped at `NEIGHBOURS` per item. SASRec runs
  `--epochs` epochs (1 by default) of its full-softmax loss (with `--negatives N`, a sampled softmax over N
  negatives per batch) over windows of at most 50 items, one validation pass per epoch: a time bound, not
  a tuned model. The text retriever (MiniLM embeddings of item texts) is left out: it grows with items
  only, at ~272 texts/s;
- evaluate: `experiment.evaluate_retrievers` of every fitted retriever and the blend (full ranking with and
  without the history masked, and the sampled protocol) over all test users;
- catalogue: `Catalogue.from_dataset` and its save, the pure-python indexing step (the Qdrant index of item
  vectors is the stream's, and needs the text model);
- request: loading the blend, then one request's scoring: the blend's catalogue scores for one history and
  its top 20 with the history masked (median over 50 users).
Threads are 1 everywhere (a shared CPU). JSON: {"sizes": [{"size", "users", "items", "interactions",
"median_length", "<stage>_s", "<stage>_peak_rss_gb" for data, fit, evaluate, catalogue, "request_ms",
"request_load_s", "request_peak_rss_gb", "fit_seconds": {retriever: s}, "test_ndcg10": {retriever: NDCG@10},
"sasrec_epochs", "sasrec_negatives", "sasrec_log": {epochs_run, best_epoch, curve}}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from harness import arguments, finish  # the benchmarks' shared library module
from rich.console import Console
from rich.table import Table

SIZES = {"10k": (10_000, 5_000), "100k": (100_000, 50_000), "1m": (1_000_000, 200_000)}
DEFAULT_SIZES = "10k,100k"
STAGES = ("data", "fit", "evaluate", "catalogue", "request")
MEDIAN_LENGTH, LENGTH_SIGMA, MIN_LENGTH, MAX_LENGTH = 12, 1.1, 3, 2000
WALK_SHARE = 0.6  # of a history's items that step along the catalogue from the previous walk item
GENRES = tuple(f"genre {g}" for g in range(20))
REQUESTS = 50
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


class Training(NamedTuple):
    """SASRec's budget in the fit: epochs, and negatives per batch (0: the full softmax)."""

    epochs: int
    negatives: int


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--max", action="store_true", help="add 1M users × 200k items")
    parser.add_argument("--epochs", type=int, default=1, help="SASRec epochs in the fit")
    parser.add_argument(
        "--negatives",
        type=int,
        default=0,
        help="SASRec's sampled softmax: negatives per batch (0: every item)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # one stage (child process)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.work, Training(args.epochs, args.negatives))))
        return 0
    names = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    if args.max and "1m" not in names:
        names.append("1m")
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {sorted(SIZES)}")
    console = Console(width=None if sys.stdout.isatty() else 200)  # logs get the whole table
    rows = [measure(name, args, console) for name in names]
    return finish(console, report(rows), {"sizes": rows}, args.json_path)


# -- the parent: one catalogue per size, one child per stage -------------------------------------------------


def measure(name: str, args, console: Console) -> dict:
    users, items = SIZES[name]
    with tempfile.TemporaryDirectory(prefix=f"scale-{name}-") as tmp:
        work = Path(tmp)
        lengths, history = synthetic(users, items, args.seed)
        np.savez(work / "catalogue.npz", lengths=lengths, history=history, items=items)
        row = {
            "size": name,
            "users": users,
            "items": items,
            "interactions": int(lengths.sum()),
            "median_length": float(np.median(lengths)),
            "sasrec_epochs": args.epochs,
            "sasrec_negatives": args.negatives,
        }
        del lengths, history  # the parent stays small: children measure themselves
        for stage in STAGES:
            console.print(f"{name}: {stage} …")
            row.update(child(stage, work, Training(args.epochs, args.negatives)))
    return row


def child(stage: str, work: Path, training: Training) -> dict:
    command = [sys.executable, __file__, "--stage", stage, "--work", str(work)]
    command += ["--epochs", str(training.epochs), "--negatives", str(training.negatives)]
    done = subprocess.run(command, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic(users: int, items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(history length per user, every history's items back to back), seeded."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(np.log(MEDIAN_LENGTH), LENGTH_SIGMA, users)
    lengths = np.clip(np.rint(lengths), MIN_LENGTH, MAX_LENGTH).astype(np.int64)
    n = int(lengths.sum())
    # popularity: the item of rank r is drawn ∝ 1/r; ranks map to item ids at random
    cdf = np.cumsum(1.0 / np.arange(1, items + 1))
    popular = rng.permutation(items)[np.searchsorted(cdf / cdf[-1], rng.random(n), side="right")]
    # the walk: a start per user, then steps of 1, 2, 3, … (geometric), restarting at each user
    steps = np.cumsum(rng.geometric(0.3, n))
    first = np.cumsum(lengths) - lengths
    walk = np.repeat(rng.integers(0, items, users), lengths) + steps - np.repeat(steps[first], lengths)
    history = np.where(rng.random(n) < WALK_SHARE, walk % items, popular)
    return lengths, history.astype(np.int32)


def report(rows: list[dict]) -> Table:
    table = Table(title="scale: synthetic catalogues (power-law popularity), one child process per stage")
    for column in ("size", "users", "items", "interactions", "median len"):
        table.add_column(column, justify="right")
    for stage in ("data", "fit", "evaluate", "catalogue"):
        table.add_column(f"{stage} s", justify="right")
        table.add_column(f"{stage} GB", justify="right")
    table.add_column("request ms", justify="right")
    table.add_column("request GB", justify="right")
    table.add_column("SASRec epochs run · negatives", justify="right")
    table.add_column("test NDCG@10 SASRec · blend", justify="right")
    for r in rows:
        stages = [
            f"{r[f'{s}_{key}']:{form}}"
            for s in ("data", "fit", "evaluate", "catalogue")
            for key, form in (("s", ".1f"), ("peak_rss_gb", ".2f"))
        ]
        table.add_row(
            r["size"],
            f"{r['users']:,}",
            f"{r['items']:,}",
            f"{r['interactions']:,}",
            f"{r['median_length']:g}",
            *stages,
            f"{r['request_ms']:.1f}",
            f"{r['request_peak_rss_gb']:.2f}",
            f"{r['sasrec_log']['epochs_run']} of {r['sasrec_epochs']} · {r['sasrec_negatives'] or 'all'}",
            f"{r['test_ndcg10']['sasrec']:.4f} · {r['test_ndcg10']['blend']:.4f}",
        )
    return table


# -- a child: one stage ----------------------------------------------------------------------------------


def run_stage(stage: str, work: Path, training: Training) -> dict:
    import torch

    from instructrec import experiment  # noqa: F401  (every stage imports the pipeline: part of the floor)

    torch.set_num_threads(1)  # on a shared CPU threads spin-wait against other processes
    started = time.perf_counter()
    dataset = load_dataset(work / "catalogue.npz")
    loaded = time.perf_counter()
    result = STAGE_RUNNERS[stage](dataset, work, training)
    seconds = loaded - started if stage == "data" else time.perf_counter() - loaded
    return {
        **result,
        f"{stage}_s": round(seconds, 2),
        f"{stage}_peak_rss_gb": round(peak_rss_bytes() / 2**30, 3),
    }


def load_dataset(path: Path):
    from instructrec.data.dataset import Dataset, Interaction, Item

    arrays = np.load(path)
    n_items = int(arrays["items"])
    items = [Item(str(i), f"item {i}", None, (GENRES[i % len(GENRES)],)) for i in range(n_items)]
    flat, histories, start = arrays["history"].tolist(), [], 0
    for length in arrays["lengths"].tolist():
        histories.append([Interaction(item, t) for t, item in enumerate(flat[start : start + length])])
        start += length
    return Dataset("scale", items, [str(u) for u in range(len(histories))], histories)


def stage_data(dataset, work: Path, training: Training) -> dict:
    """Nothing past what every stage does (the pipeline imported, the `Dataset` built): the floor."""
    return {}


def stage_fit(dataset, work: Path, training: Training) -> dict:
    from instructrec import experiment
    from instructrec.artifacts import Artifacts
    from instructrec.data.split import LeaveOneOut
    from instructrec.retrieval.base import read_config
    from instructrec.retrieval.cooccurrence import NEIGHBOURS
    from instructrec.retrieval.sasrec import SASRecConfig

    sasrec = SASRecConfig(
        epochs=training.epochs,
        eval_every=1,
        patience=1,
        max_len=50,
        warmup_epochs=0,
        negatives=training.negatives,
    )
    names = ("popularity", "cooccurrence", "itemknn", "sasrec")
    layout = Artifacts(work / "artifacts")
    seconds = experiment.fit_retrievers(
        LeaveOneOut(dataset), layout, sasrec, False, names, neighbours=NEIGHBOURS
    )
    log = read_config(layout.retriever("sasrec"))["log"]  # epochs run, the best one, the validation curve
    return {
        "fit_seconds": {name: round(s, 2) for name, s in seconds.items()},
        "sasrec_log": {key: log[key] for key in ("epochs_run", "best_epoch", "curve")},
    }


def stage_evaluate(dataset, work: Path, training: Training) -> dict:
    from instructrec import experiment
    from instructrec.artifacts import Artifacts

    names = ("popularity", "cooccurrence", "itemknn", "sasrec", "blend")
    results = experiment.evaluate_retrievers(dataset, Artifacts(work / "artifacts"), names)
    return {"test_ndcg10": {name: round(m["NDCG@10"], 4) for name, m in results["full"].items()}}


def stage_catalogue(dataset, work: Path, training: Training) -> dict:
    from instructrec.catalogue import Catalogue

    Catalogue.from_dataset(dataset).save(work / "catalogue.json")
    return {}


def stage_request(dataset, work: Path, training: Training) -> dict:
    from instructrec.artifacts import Artifacts
    from instructrec.data.split import LeaveOneOut
    from instructrec.evaluation.protocols import top_k
    from instructrec.retrieval.base import load_retriever

    started = time.perf_counter()
    blend = load_retriever(Artifacts(work / "artifacts").retriever("blend"))
    load_s = time.perf_counter() - started
    split = LeaveOneOut(dataset)
    users = np.random.default_rng(0).choice(
        dataset.n_users, size=min(REQUESTS, dataset.n_users), replace=False
    )
    times = []
    for user in users.tolist():
        history = [x.item for x in split.history(int(user), "test")]
        started = time.perf_counter()
        top_k(blend.score([history]), 20, [history])
        times.append(time.perf_counter() - started)
    return {"request_ms": round(statistics.median(times) * 1000, 2), "request_load_s": round(load_s, 2)}


STAGE_RUNNERS = {
    "data": stage_data,
    "fit": stage_fit,
    "evaluate": stage_evaluate,
    "catalogue": stage_catalogue,
    "request": stage_request,
}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not carried over from the forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    sys.exit(main())
