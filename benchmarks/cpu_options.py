"""CPU serving options of the trained reranker, in process: the measurements behind the CPU Triton config.

    python benchmarks/cpu_options.py [--json PATH] [--artifacts artifacts/ml-latest-small] [--quick]

1. Ranking quality per precision (float32, int8, bfloat16): the ranking the product serves, i.e. the
   reranker's scores fused with the retriever's (pipeline.json's fusion weight) over the retriever's top-K,
   for every user of the dataset, on validation and test (history masked): NDCG@10, Recall@10, and the share
   of users whose top answer is float32's.
2. Latency of one request (a real instruction of 20 candidates) after an idle gap of 0, 0.2 and 1 s, per
   setting (threads × precision × OpenMP waiting). Each setting runs in a fresh process, because OpenMP
   reads its environment when torch loads.
Needs the trained artefacts (`python benchmarks/quality.py` writes them). JSON keys: quality
{stage: {precision: {ndcg10, recall10, top1_agreement, seconds}}}, latency [{setting, ms_after_gap}].
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import arguments, finish  # the benchmarks' shared library module
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
PRECISIONS = {"float32": {}, "int8": {"quantize": "int8"}, "bfloat16": {"dtype": "bfloat16"}}
GAPS_S = (0.0, 0.2, 1.0)
# (label, ServingOptions fields, environment): the CPU config's choice is "1 thread, int8"
SETTINGS = [
    ("2 threads, float32, PASSIVE", {"threads": 2}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("2 threads, float32, spin 300k", {"threads": 2}, {"GOMP_SPINCOUNT": "300000"}),
    ("1 thread, float32", {"threads": 1}, {}),
    ("1 thread, bfloat16", {"threads": 1, "dtype": "bfloat16"}, {}),
    ("1 thread, int8", {"threads": 1, "quantize": "int8"}, {}),
]


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "ml-latest-small")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--quick", action="store_true", help="test split only, fewer latency samples")
    parser.add_argument(
        "--probe", default=None, help=argparse.SUPPRESS
    )  # one latency setting (child process)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args, json.loads(args.probe), 5 if args.quick else 15)))
        return 0
    console = Console()
    result = {"quality": quality(args, console), "latency": latency(args, console)}
    return finish(console, report(result), result, args.json_path)


def quality(args, console: Console) -> dict:
    import numpy as np
    import torch

    from instructrec.artifacts import Artifacts
    from instructrec.data import load
    from instructrec.data.split import LeaveOneOut
    from instructrec.evaluation import ranking_metrics, reranked_ranks
    from instructrec.experiment import PipelineConfig, rerank_top_k
    from instructrec.model.reranker import Reranker
    from instructrec.model.scoring import fuse
    from instructrec.retrieval.base import load_retriever
    from instructrec.serving.options import ServingOptions
    from instructrec.serving.scorer import prepare

    layout = Artifacts(args.artifacts)
    config = PipelineConfig.load(layout.pipeline)
    dataset = load(args.artifacts.name, root=args.data_root)
    split = LeaveOneOut(dataset)
    retriever = load_retriever(layout.retriever(config.retriever))
    out: dict = {}
    for stage in ("test",) if args.quick else ("valid", "test"):
        histories, targets = split.histories(stage), split.targets(stage)
        first = retriever.score(histories)
        out[stage], reference = {}, None
        for name, fields in PRECISIONS.items():
            with console.status(f"{stage}: scoring every user in {name}…"):
                reranker = prepare(Reranker.from_pretrained(layout.best_reranker), ServingOptions(**fields))
                started = time.perf_counter()
                with torch.inference_mode():
                    candidates, scores, base = rerank_top_k(reranker, dataset, split, stage, first, config.k)
                seconds = time.perf_counter() - started
            fused = fuse(scores, base, config.fusion_weight)
            metrics = ranking_metrics(reranked_ranks(first, candidates, fused, targets, histories))
            reference = fused if reference is None else reference
            out[stage][name] = {
                "ndcg10": round(metrics["NDCG@10"], 4),
                "recall10": round(metrics["Recall@10"], 4),
                "top1_agreement": round(float(np.mean(fused.argmax(1) == reference.argmax(1))), 4),
                "seconds": round(seconds, 1),
            }
    return out


def latency(args, console: Console) -> list[dict]:
    rows = []
    for label, fields, env in SETTINGS:
        with console.status(f"latency after idle gaps: {label}…"):
            command = [
                sys.executable,
                __file__,
                "--probe",
                json.dumps(fields),
                "--artifacts",
                str(args.artifacts),
                "--data-root",
                str(args.data_root),
                *(["--quick"] if args.quick else []),
            ]
            clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
            done = subprocess.run(command, env={**clean, **env}, capture_output=True, text=True, check=True)
        rows.append({"setting": label, **json.loads(done.stdout.strip().splitlines()[-1])})
    return rows


def probe(args, fields: dict, samples: int) -> dict:
    """Median latency of one request after each idle gap, in this (fresh) process."""
    from harness import Workload  # the benchmarks' shared library module

    from instructrec.artifacts import Artifacts
    from instructrec.serving.options import ServingOptions
    from instructrec.serving.scorer import load_scorer

    workload = Workload.build(str(args.data_root), 40)
    scorer = load_scorer(
        Artifacts(args.artifacts).best_reranker, ServingOptions(omp_wait_policy="", **fields)
    )

    def one(i: int) -> float:
        started = time.perf_counter()
        scorer.score([workload.requests[i % len(workload.requests)]])
        return (time.perf_counter() - started) * 1000

    for i in range(5):
        one(i)
    after = {}
    for gap in GAPS_S:
        times = []
        for i in range(samples):
            time.sleep(gap)
            times.append(one(i))
        after[str(gap)] = round(statistics.median(times), 1)
    return {"ms_after_gap": after}


def report(result: dict) -> Table:
    table = Table(title="CPU serving options (trained reranker, in process)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for stage, by_precision in result["quality"].items():
        for name, m in by_precision.items():
            table.add_row(
                f"{stage}, {name}: fused NDCG@10 · Recall@10 · top-1 = float32's",
                f"{m['ndcg10']:.4f} · {m['recall10']:.4f} · {m['top1_agreement']:.3f}",
            )
    gaps = " / ".join(f"{g:g}" for g in GAPS_S)
    for row in result["latency"]:
        values = " / ".join(f"{v:.1f}" for v in row["ms_after_gap"].values())
        table.add_row(f"{row['setting']}: ms after an idle gap of {gaps} s", values)
    return table


if __name__ == "__main__":
    sys.exit(main())
