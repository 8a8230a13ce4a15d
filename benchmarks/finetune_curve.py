"""How much fresh feedback a fine-tune needs before the gate can see its gain: a learning curve.

    python benchmarks/finetune_curve.py --root LOOP_ROOT [--holdout 2500] [--chunks 1000 1000 2000 5000]
                                        [--threads 2] [--epochs 1] [--json PATH]

A cycle of the feedback loop trains a few hundred examples on one thread beside the stream, and its gains
are within the gate's noise (README, "Feedback loop"). This asks what more would buy, with nothing else
running: version 1 of a finished `benchmarks/loop.py --root ROOT` run (the initial pipeline, which never saw
the replay) trains on the replay's own examples from its example store, chunk by chunk in time order, up to
the holdout, as a challenger carried over cycles trains (`workers.finetune.cycle.prepare` and
`train_candidate` with the worker's settings, an unbounded budget, `--threads` torch threads). After each
chunk the gate judges it against version 1 on the same holdout (the newest `--holdout` examples, never
trained on), both as Triton serves them: NDCG@10 and HR@10 fused at the served weight, the paired gain with
its bootstrap P(gain > 0), and NDCG@10 of the reranker alone (fusion weight 0), where what it learned is not
diluted by the retriever. Only examples whose chosen item the plan retrieves become training instances (a
fifth or so of the clicks examples, `workers.finetune.cycle.prepare`): "examples" counts stored examples,
"instances" what trained, and "examples/s" is instances per second (as the loop benchmark reports it).

The chunks end where the holdout starts: the first is the oldest of the examples trained on, the last the
newest (the examples the loop's cycles train on are the newest too). Nothing else may run meanwhile.

JSON keys: holdout, judged, incumbent → {ndcg10, hr10, ndcg10_reranker_alone}, points → list of
{examples, instances, train_s, examples_per_s, loss_first, loss_last, ndcg10, hr10, gain_ndcg10,
gain_se, p_better, ndcg10_reranker_alone}.
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness import arguments, finish  # the benchmarks' shared library module
from rich.console import Console
from rich.table import Table

DATASET = "ml-latest-small"
MODEL = "instructrec_reranker"
UNBOUNDED_S = 1e9  # no wall-clock budget: every chunk trains to its end


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--root", type=Path, required=True, help="a finished benchmarks/loop.py --root")
    parser.add_argument("--holdout", type=int, default=2500, help="the newest examples, judged on")
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[1000, 1000, 2000, 5000], help="oldest first"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: both cores)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over each chunk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    result = run(args, console)
    return finish(console, report(result), result, args.json_path)


def run(args, console: Console) -> dict:
    import numpy as np
    import torch

    from instructrec.artifacts import Artifacts
    from instructrec.config import FinetuneSettings
    from instructrec.experiment import PipelineConfig
    from instructrec.model.reranker import Reranker
    from instructrec.planner import OfflinePlanner
    from instructrec.serving.options import ServingOptions
    from workers.finetune import cycle
    from workers.finetune.gate import judge, ndcg_hr, standard_error
    from workers.finetune.store import ExampleStore

    torch.set_num_threads(args.threads)
    layout = Artifacts.of(args.root / "artifacts", DATASET)
    pipeline = PipelineConfig.load(layout.pipeline)
    planner = OfflinePlanner.load(layout, retriever=pipeline.retriever, config=pipeline.plan)
    weights = args.root / "models" / "repository" / MODEL / "1" / "reranker"
    served = ServingOptions(calibrated=True).for_version(weights.parent)
    config = FinetuneSettings(epochs=args.epochs, min_margin=0.0, confidence=0.5)
    store = ExampleStore(args.root / "state" / "finetune" / "examples.db")
    try:
        examples = [e for _, e in store.examples()]
    finally:
        store.close()
    total = sum(args.chunks)
    if total + args.holdout > len(examples):
        raise SystemExit(f"{total} + {args.holdout} examples asked for, {len(examples)} stored")
    holdout = examples[-args.holdout :]
    pool = examples[-args.holdout - total : -args.holdout]

    with console.status(f"rendering the holdout ({len(holdout)} examples)…"):
        held = cycle.judgeable(holdout, planner)
    incumbent = cycle.as_served(Reranker.from_pretrained(weights), served)
    with console.status(f"version 1 on {len(held.targets)} judged examples…"):
        base = held.ranks_under(incumbent, planner.catalogue, pipeline.weight_for)
        base_alone = held.ranks_under(incumbent, planner.catalogue, lambda _: 0.0)
    candidate = Reranker.from_pretrained(weights)
    points, seen, start = [], 0, 0
    for n, size in enumerate(args.chunks):
        chunk = pool[start : start + size]
        start += size
        with console.status(f"chunk {n + 1}: preparing {len(chunk)} examples…"):
            prepared = cycle.prepare(
                chunk,
                planner,
                pipeline.k,
                feedback_weight=config.feedback_weight,
                seed=args.seed * 1_000 + n,
            )
        candidate.train()
        trained = cycle.train_candidate(candidate, prepared, planner.catalogue, config, UNBOUNDED_S)
        seen += len(chunk)
        with console.status(f"chunk {n + 1}: judging…"):
            judged = cycle.as_served(candidate, served)
            ranked = held.ranks_under(judged, planner.catalogue, pipeline.weight_for)
            alone = held.ranks_under(judged, planner.catalogue, lambda _: 0.0)
        verdict = judge(ranked, base, min_margin=0.0, confidence=0.5, seed=args.seed)
        ndcg, hr = ndcg_hr(ranked)
        point = {
            "examples": seen,
            "instances": len(prepared.instances),
            "train_s": round(trained.seconds, 1),
            "examples_per_s": round(trained.examples_per_s, 2),
            "loss_first": round(trained.loss_first, 4),
            "loss_last": round(trained.loss_last, 4),
            "ndcg10": round(float(ndcg.mean()), 4),
            "hr10": round(float(hr.mean()), 4),
            "gain_ndcg10": round(verdict.metrics["gain_ndcg@10"], 4),
            "gain_se": round(standard_error(ndcg_hr(ranked)[0] - ndcg_hr(base)[0]), 4),
            "p_better": round(verdict.metrics["p_better"], 3),
            "ndcg10_reranker_alone": round(float(ndcg_hr(alone)[0].mean()), 4),
        }
        console.print(point)
        points.append(point)
    ndcg, hr = ndcg_hr(base)
    return {
        "root": str(args.root),
        "precision": served.dtype if served.quantize == "none" else served.quantize,
        "threads": args.threads,
        "epochs": args.epochs,
        "holdout": len(holdout),
        "judged": len(held.targets),
        "incumbent": {
            "ndcg10": round(float(ndcg.mean()), 4),
            "hr10": round(float(hr.mean()), 4),
            "ndcg10_reranker_alone": round(float(ndcg_hr(base_alone)[0].mean()), 4),
        },
        "points": points,
        "mean_gain_ndcg10": round(float(np.mean([p["gain_ndcg10"] for p in points])), 4),
    }


def report(result: dict) -> Table:
    inc = result["incumbent"]
    table = Table(
        title=(
            f"fine-tuning version 1 on the replay's examples ({result['threads']} threads, "
            f"{result['epochs']} epoch per chunk), judged on {result['judged']} of the newest "
            f"{result['holdout']} as served ({result['precision']}); version 1: NDCG@10 {inc['ndcg10']:.4f}, "
            f"HR@10 {inc['hr10']:.4f}, reranker alone {inc['ndcg10_reranker_alone']:.4f}"
        )
    )
    for name in (
        "examples trained",
        "train s",
        "examples/s",
        "loss first → last",
        "NDCG@10",
        "HR@10",
        "gain ± se",
        "P(gain > 0)",
        "NDCG@10 reranker alone",
    ):
        table.add_column(name, justify="right")
    for p in result["points"]:
        table.add_row(
            f"{p['examples']:,}",
            f"{p['train_s']:.0f}",
            f"{p['examples_per_s']:.2f}",
            f"{p['loss_first']:.3f} → {p['loss_last']:.3f}",
            f"{p['ndcg10']:.4f}",
            f"{p['hr10']:.4f}",
            f"{p['gain_ndcg10']:+.4f} ± {p['gain_se']:.4f}",
            f"{p['p_better']:.2f}",
            f"{p['ndcg10_reranker_alone']:.4f}",
        )
    return table


if __name__ == "__main__":
    raise SystemExit(main())
