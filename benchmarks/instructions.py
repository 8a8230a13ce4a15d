"""Instruction following: the three settings of the InstructRec paper on the leave-one-out test users.

    python benchmarks/instructions.py --dataset ml-latest-small [--json PATH] [--seeds 0,1,2] [--minutes M]

Trains the pipeline (retrievers, candidate plan, reranker) unless its artefacts exist (`artifacts/<dataset>`
for seed 0, `artifacts/<dataset>-seed<s>` for the others; `--retrain` starts over), then for each setting —
sequential; product search (no history); personalised search with a vague intention, a specific one, or a
negative constraint; the hand-written requests of `benchmarks/requests.json` — ranks every test user's
request with every method and reports NDCG@10 and Recall@10 of the test item, and instruction compliance
(the share of the top-10 that satisfies what the request asks). Synthesised intentions use the held-out
phrasings (`instructrec.instructions.vocabulary.Phrasings.heldout`): no evaluated wording was trained on.

JSON: {"<dataset>": {"<setting>": {"<method>": {"NDCG@10": x, "Recall@10": y, "compliance": c, ...}}},
       "sequential_seeds": [{"seed": s, "retriever": x, "instructrec": y}, ...],
       "handwritten_requests": {"<text>": {"<method>": {"compliance": c, ...}}}}
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from harness import arguments, finish  # the benchmarks' shared library module
from rich.console import Console, Group
from rich.progress import Progress
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
HANDWRITTEN = Path(__file__).resolve().parent / "requests.json"


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--dataset", default="ml-latest-small")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts", help="artefacts root")
    parser.add_argument(
        "--seeds", default="0", help="comma-separated: the sequential setting on each seed's pipeline"
    )
    parser.add_argument("--minutes", type=float, default=None, help="reranker training budget per seed")
    parser.add_argument("--retrain", action="store_true", help="train even where artefacts exist")
    parser.add_argument(
        "--handwritten-users", type=int, default=200, help="test users per hand-written request"
    )
    args = parser.parse_args(argv)

    import torch

    from instructrec import experiment, following
    from instructrec.artifacts import Artifacts
    from instructrec.data import LeaveOneOut, load
    from instructrec.model.reranker import Reranker
    from instructrec.planner import OfflinePlanner

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    console = Console(width=None if sys.stdout.isatty() else 200)
    dataset = load(args.dataset, root=args.data_root)
    split = LeaveOneOut(dataset)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results: dict = {args.dataset: {}, "sequential_seeds": [], "handwritten_requests": {}, "seconds": {}}

    def pipeline(seed: int):
        name = args.dataset if seed == 0 else f"{args.dataset}-seed{seed}"
        layout = Artifacts.of(args.artifacts, name)
        if args.retrain or not layout.trained:
            config = experiment.PipelineConfig(seed=seed)
            if args.minutes is not None:
                config.train.max_minutes = args.minutes
            started = time.perf_counter()
            experiment.fit(dataset, layout, config, resume=not args.retrain)
            results["seconds"][f"train_seed{seed}"] = round(time.perf_counter() - started, 1)
        config = experiment.PipelineConfig.load(layout.pipeline)
        planner = OfflinePlanner.load(layout, dataset, config.retriever, config.plan)
        return config, planner, Reranker.from_pretrained(layout.best_reranker)

    def run(cases, planner, reranker, config, methods=following.METHODS, label=""):
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(label, total=len(cases))
            ranking = following.rank(
                cases,
                dataset,
                planner,
                reranker,
                config.weight_for,
                config.k,
                methods,
                lambda n: bar.advance(task, n),
            )
        return {m: following.metrics(cases, ranking.top[m], dataset) for m in methods}

    for seed in seeds:
        config, planner, reranker = pipeline(seed)
        sequential = following.cases(dataset, split, "sequential")
        found = run(
            sequential, planner, reranker, config, ("retriever", "plan", "instructrec"), f"seed {seed}"
        )
        results["sequential_seeds"].append(
            {
                "seed": seed,
                "retriever": found["retriever"]["NDCG@10"],
                "instructrec": found["instructrec"]["NDCG@10"],
            }
        )
        if seed != seeds[0]:
            continue
        started = time.perf_counter()
        for setting in following.SETTINGS:
            methods = [
                m
                for m in following.METHODS
                if not (setting == "sequential" and m in ("text", "filtered_retriever"))
            ]
            cases = following.cases(dataset, split, setting)
            results[args.dataset][setting] = run(cases, planner, reranker, config, methods, setting)
        written = [following.Written.parse(r) for r in json.loads(HANDWRITTEN.read_text())["requests"]]
        users = list(range(0, dataset.n_users, max(1, dataset.n_users // args.handwritten_users)))[
            : args.handwritten_users
        ]
        pooled: dict[str, list[float]] = {}
        for request in written:
            cases = following.written_cases(split, request, users)
            found = run(cases, planner, reranker, config, following.METHODS, request.text[:40])
            results["handwritten_requests"][request.text] = found
            for method, values in found.items():
                pooled.setdefault(method, []).append(values.get("compliance", float("nan")))
        results[args.dataset]["handwritten"] = {
            m: {"compliance": float(np.nanmean(v))} for m, v in pooled.items()
        }
        results["seconds"]["evaluate"] = round(time.perf_counter() - started, 1)
        results["config"] = {
            "fusion_weights": config.fusion_weights,
            "plan": asdict(config.plan),
            "k": config.k,
        }

    return finish(console, Group(*tables(args.dataset, results)), results, args.json_path)


def tables(dataset: str, results: dict) -> list[Table]:
    out = []
    for setting, rows in results[dataset].items():
        table = Table(title=f"{dataset} — {setting}")
        for column in ("method", "NDCG@10", "± se", "Recall@10", "compliance", "cases"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for method, m in rows.items():
            table.add_row(
                method,
                _f(m.get("NDCG@10")),
                _f(m.get("NDCG@10_se")),
                _f(m.get("Recall@10")),
                _f(m.get("compliance")),
                str(m.get("cases", "")),
            )
        out.append(table)
    if results["handwritten_requests"]:
        table = Table(title=f"{dataset} — hand-written requests: compliance of the top-10")
        methods = list(next(iter(results["handwritten_requests"].values())))
        table.add_column("request")
        for method in methods:
            table.add_column(method, justify="right")
        for text, rows in results["handwritten_requests"].items():
            table.add_row(text, *(_f(rows[m].get("compliance")) for m in methods))
        out.append(table)
    seeds = results["sequential_seeds"]
    if seeds:
        table = Table(title=f"{dataset} — sequential NDCG@10 per seed (the pipeline against its retriever)")
        for column in ("seed", "retriever", "instructrec", "lift"):
            table.add_column(column, justify="right")
        for row in seeds:
            table.add_row(str(row["seed"]), _f(row["retriever"]), _f(row["instructrec"]), _lift(row))
        if len(seeds) > 1:
            r = np.array([s["retriever"] for s in seeds])
            i = np.array([s["instructrec"] for s in seeds])
            lifts = i / r - 1
            table.add_row(
                "mean ± sd",
                f"{r.mean():.4f} ± {r.std(ddof=1):.4f}",
                f"{i.mean():.4f} ± {i.std(ddof=1):.4f}",
                f"{lifts.mean():+.1%} ± {lifts.std(ddof=1):.1%}",
            )
        out.append(table)
    return out


def _f(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.4f}"


def _lift(row: dict) -> str:
    return f"{row['instructrec'] / row['retriever'] - 1:+.1%}" if row["retriever"] else ""


if __name__ == "__main__":
    sys.exit(main())
