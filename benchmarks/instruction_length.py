"""What the instruction's length costs and buys: how many of the user's interactions a request renders.

    python benchmarks/instruction_length.py --root LOOP_ROOT [--version V] [--history 1 3 5 10 20]
                                            [--judge N] [--json PATH]

Every request the stream sends renders the user's most recent `max_history` interactions (`ModelSettings.
max_history`, 10 by default, as the reranker trained) beside its 20 candidates. This measures, per history
length, on the same examples:
- encoder tokens per request (mean) and GFLOP per request (torch's FLOP counter, one request at a time);
- the in-process forward of one request, ms (median, this process's threads);
- NDCG@10 and HR@10 of the chosen item, the reranker fused with the retriever at the served weight (the
  gate's computation, `workers.finetune.cycle.judgeable`), and the paired NDCG@10 difference against the
  served length with its bootstrap P(gain > 0); and NDCG@10 of the reranker alone (fusion weight 0), where
  what the history adds is not diluted by the retriever's scores, which do not depend on the rendering.

The examples are a finished `benchmarks/loop.py --root ROOT` run's: the replay's real next-item examples
(clicks, and feedback on served lists, half of the queries with a request text) from its example store,
those whose chosen item was among the candidates, spread evenly over the replay. The model is the version
`--version` of its model repository (default 1, the initial pipeline, which never trained on them), as
Triton serves it (its calibrated precision). Nothing else may run meanwhile: the timings share the cores.

JSON keys: served_history, examples, lengths → list of {max_history, encoder_tokens, gflops_per_request,
forward_ms, ndcg10, hr10, gain_vs_served, p_better (null for the served length), ndcg10_reranker_alone}.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from harness import arguments, finish  # the benchmarks' shared library module
from rich.console import Console
from rich.table import Table

DATASET = "ml-latest-small"
MODEL = "instructrec_reranker"
TIMED = 40  # requests timed and FLOP-counted per length


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--root", type=Path, required=True, help="a finished benchmarks/loop.py --root")
    parser.add_argument("--version", type=int, default=1, help="the model version to measure")
    parser.add_argument("--history", type=int, nargs="+", default=[1, 3, 5, 10, 20])
    parser.add_argument("--judge", type=int, default=2000, help="most examples judged")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    result = run(args, console)
    return finish(console, report(result), result, args.json_path)


def run(args, console: Console) -> dict:
    import numpy as np
    from serving import flop_count, median_seconds

    from instructrec.artifacts import Artifacts
    from instructrec.config import ModelSettings
    from instructrec.experiment import PipelineConfig
    from instructrec.model.reranker import Reranker
    from instructrec.planner import OfflinePlanner
    from instructrec.serving.options import ServingOptions
    from workers.finetune import cycle
    from workers.finetune.gate import judge, ndcg_hr
    from workers.finetune.store import ExampleStore

    layout = Artifacts.of(args.root / "artifacts", DATASET)
    pipeline = PipelineConfig.load(layout.pipeline)
    planner = OfflinePlanner.load(layout, retriever=pipeline.retriever, config=pipeline.plan)
    weights = args.root / "models" / "repository" / MODEL / str(args.version) / "reranker"
    options = ServingOptions(calibrated=True).for_version(weights.parent)
    model = cycle.as_served(Reranker.from_pretrained(weights), options)
    served = ModelSettings().max_history
    examples = [e for _, e in ExampleStore(args.root / "state" / "finetune" / "examples.db").examples()]
    lengths = sorted(set(args.history) | {served})

    with console.status("finding the examples a reranker can be judged on…"):
        found = cycle.judgeable(examples, planner, max_history=served)
    chosen = [examples[found.examples[i]] for i in _evenly(len(found.examples), args.judge)]
    tokenizer = model.text_tokenizer()
    title_of, row_of, text_of = cycle.catalogue_lookups(model, planner.catalogue)
    rows, ranks = [], {}
    for h in lengths:
        held = cycle.judgeable(chosen, planner, max_history=h)
        if len(held.targets) != len(chosen):  # judgeable or not whatever the history shows: a bug if not
            raise RuntimeError(f"max_history {h} renders {len(held.targets)} of {len(chosen)} examples")
        with console.status(f"max_history {h}: ranking {len(chosen)} examples…"):
            ranks[h] = held.ranks_under(model, planner.catalogue, pipeline.weight_for)
            alone = held.ranks_under(model, planner.catalogue, lambda _: 0.0)  # weight 0: the reranker alone
        batches = [
            tokenizer.collate([held.instructions[i]], title_of, row_of, text_of)
            for i in _evenly(len(chosen), TIMED)
        ]
        with console.status(f"max_history {h}: FLOPs and the forward of one request…"):
            flops = [flop_count(model, b) for b in batches]
            forward = [median_seconds(lambda b=b: _forward(model, b), repeat=3) for b in batches]
        ndcg, hr = ndcg_hr(ranks[h])
        rows.append(
            {
                "max_history": h,
                "encoder_tokens": round(float(np.mean([b.enc_ids.shape[1] for b in batches])), 1),
                "gflops_per_request": round(float(np.mean(flops)) / 1e9, 3),
                "forward_ms": round(statistics.median(forward) * 1000, 1),
                "ndcg10": round(float(ndcg.mean()), 4),
                "hr10": round(float(hr.mean()), 4),
                "ndcg10_reranker_alone": round(float(ndcg_hr(alone)[0].mean()), 4),
            }
        )
    for row in rows:
        if row["max_history"] == served:
            row["gain_vs_served"], row["p_better"] = 0.0, None
            continue
        paired = judge(ranks[row["max_history"]], ranks[served], min_margin=0.0, confidence=0.5)
        row["gain_vs_served"] = round(paired.metrics["gain_ndcg@10"], 4)
        row["p_better"] = round(paired.metrics["p_better"], 3)
    return {
        "root": str(args.root),
        "version": args.version,
        "precision": options.dtype if options.quantize == "none" else options.quantize,
        "served_history": served,
        "examples": len(chosen),
        "judgeable": len(found.examples),
        "stored": len(examples),
        "lengths": rows,
    }


def _evenly(count: int, most: int) -> list[int]:
    step = max(1.0, count / most)
    return sorted({int(i * step) for i in range(min(count, most))})


def _forward(model, batch) -> None:
    import torch

    with torch.inference_mode():
        model(batch)


def report(result: dict) -> Table:
    table = Table(
        title=(
            f"the instruction's length: version {result['version']} ({result['precision']}), "
            f"{result['examples']} of the loop's examples, the served length {result['served_history']}"
        )
    )
    for name in (
        "max history",
        "encoder tokens",
        "GFLOP / request",
        "forward ms",
        "NDCG@10",
        "HR@10",
        "NDCG@10 vs served",
        "P(gain > 0)",
        "NDCG@10 reranker alone",
    ):
        table.add_column(name, justify="right")
    for row in result["lengths"]:
        table.add_row(
            str(row["max_history"]),
            f"{row['encoder_tokens']:.0f}",
            f"{row['gflops_per_request']:.2f}",
            f"{row['forward_ms']:.1f}",
            f"{row['ndcg10']:.4f}",
            f"{row['hr10']:.4f}",
            f"{row['gain_vs_served']:+.4f}",
            "—" if row["p_better"] is None else f"{row['p_better']:.2f}",
            f"{row['ndcg10_reranker_alone']:.4f}",
        )
    return table


if __name__ == "__main__":
    raise SystemExit(main())
