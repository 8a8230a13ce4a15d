"""Ranking quality of every method under both protocols of DESIGN §5, with training wall times.

    python benchmarks/quality.py --dataset ml-latest-small [--json results.json] [--reuse]

Trains the retrievers, SASRec and the InstructRec reranker on this machine (or reuses the artefacts of an
earlier run with --reuse), evaluates on the leave-one-out test items and prints one table per protocol.
JSON: {"<dataset>": {"full": {"<method>": {"NDCG@10": x, ...}}, "full_unmasked": {...}, "sampled": {...},
"seconds": {...}, "config": {...}}}; the reranked pipeline is "instructrec", its retriever alone "retriever".
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from harness import arguments, finish  # the benchmarks' shared library module
from rich.console import Console, Group

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from instructrec import experiment
    from instructrec.artifacts import Artifacts
    from instructrec.data import load
    from instructrec.evaluation.report import tables

    parser = arguments(__doc__)
    parser.add_argument("--dataset", default="ml-latest-small")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--artifacts", default=None, help="default: artifacts/<dataset>")
    parser.add_argument("--reuse", action="store_true", help="evaluate the artefacts of an earlier run")
    parser.add_argument("--minutes", type=float, default=None, help="reranker training budget")
    args = parser.parse_args(argv)

    dataset = load(args.dataset, root=args.data_root)
    out = (
        Artifacts(Path(args.artifacts)) if args.artifacts else Artifacts.of(REPO / "artifacts", args.dataset)
    )
    console = Console(width=None if sys.stdout.isatty() else 200)  # logs get the whole table, not 80 columns
    console.print(dataset.describe())
    if not (args.reuse and out.trained):
        config = experiment.PipelineConfig()
        if args.minutes is not None:
            config.train.max_minutes = args.minutes
        experiment.fit(dataset, out, config, resume=args.reuse)
    config = experiment.PipelineConfig.load(out.pipeline)
    results = experiment.evaluate(dataset, out)

    seconds = experiment.method_seconds(config)
    payload = {args.dataset: {**results, "seconds": seconds, "config": asdict(config)}}
    rendered = Group(*tables(args.dataset, results, seconds), experiment.summary(config))
    return finish(console, rendered, payload, args.json_path)


if __name__ == "__main__":
    sys.exit(main())
