"""Ranking quality of every method under both protocols of DESIGN §5, with training wall times.

    python benchmarks/quality.py --dataset ml-latest-small [--json results.json] [--reuse]

Trains the retrievers, SASRec and the InstructRec reranker on this machine (or reuses the artefacts of an
earlier run with --reuse), evaluates on the leave-one-out test items and prints one table per protocol.
JSON: {"<dataset>": {"full": {"<method>": {"NDCG@10": x, ...}}, "full_unmasked": {...}, "sampled": {...},
"seconds": {...}, "config": {...}}}; the reranked pipeline is "instructrec", its retriever alone "retriever".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from instructrec import experiment
    from instructrec.artifacts import Artifacts
    from instructrec.data import load
    from instructrec.evaluation.report import tables

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="ml-latest-small")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--artifacts", default=None, help="default: artifacts/<dataset>")
    parser.add_argument("--json", dest="json_path", default=None)
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
    for rendered in tables(args.dataset, results, seconds):
        console.print(rendered)
    console.print(experiment.summary(config))
    if args.json_path:
        payload = {args.dataset: {**results, "seconds": seconds, "config": asdict(config)}}
        Path(args.json_path).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
