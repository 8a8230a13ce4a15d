"""The ``instructrec`` command line.

Each command group lives in one small ``add_*`` function that declares its arguments and binds a handler
``handler(args, settings) -> exit code``; ``COMMANDS`` lists them, and that is the one place a new command
is registered. Settings are built once here, at the edge, and passed down.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from instructrec.config import Settings
from instructrec.data.source import DataFormatError
from instructrec.infra import COMPONENTS, ComponentStatus, InfraError, Infrastructure
from instructrec.triton_repository import ExportError, add_export_arguments, export_from_args
from streams.cli import add_stream_commands

console = Console(soft_wrap=True)  # long paths and URLs stay on one line, copy-pasteable
errors = Console(stderr=True, soft_wrap=True)

Handler = Callable[[argparse.Namespace, Settings], int]


# ------------------------------------------------------------------------------------------------- infra


def add_infra(commands: argparse._SubParsersAction) -> None:
    infra = commands.add_parser("infra", help="start, stop and check the local broker, Triton and Qdrant")
    actions = infra.add_subparsers(dest="action", required=True, metavar="{up,down,status}")

    up = actions.add_parser("up", help="start what is not running yet (idempotent)")
    up.add_argument("--models", type=_csv, default=None, help="Triton models to load, comma-separated")
    _add_only(up)
    up.set_defaults(handler=infra_up)

    down = actions.add_parser("down", help="stop what `up` started and clean up after Triton")
    _add_only(down)
    down.set_defaults(handler=infra_down)

    status = actions.add_parser("status", help="check every service for real; non-zero exit if one is down")
    status.set_defaults(handler=infra_status)


def infra_up(args: argparse.Namespace, settings: Settings) -> int:
    infrastructure = Infrastructure(settings)
    with console.status("starting the local infrastructure…"):
        state = infrastructure.up(components=args.only, models=args.models)
    for name in args.only:
        process = getattr(state, name)
        if process is not None:
            console.print(f"[green]✓[/] {name:<7} {_describe(process)}")
    console.print(f"state: {infrastructure.state_path}")
    # Other processes (workers, the demo) reach the services through these variables.
    for key, value in state.env(settings).items():
        console.print(f"export {key}={value}", highlight=False)
    return 0


def infra_down(args: argparse.Namespace, settings: Settings) -> int:
    report = Infrastructure(settings).down(components=args.only)
    if not report.stopped:
        console.print("nothing was running")
    for name, outcome in report.stopped.items():
        console.print(f"{name:<7} {outcome}")
    for path in report.removed:
        console.print(f"removed {path}")
    for problem in report.problems:
        errors.print(f"[red]✗[/] {problem}")
    return 0 if report.ok else 1


def infra_status(args: argparse.Namespace, settings: Settings) -> int:
    statuses = Infrastructure(settings).status()
    console.print(status_table(statuses))
    return 0 if all(status.healthy for status in statuses) else 1


def status_table(statuses: Sequence[ComponentStatus]) -> Table:
    table = Table(title="InstructRec local infrastructure")
    for column in ("service", "state", "pid", "address", "detail"):
        table.add_column(column, overflow="fold")
    for status in statuses:
        colour = "green" if status.healthy else "red"
        pid = str(status.pid) if status.pid else "-"
        table.add_row(status.name, f"[{colour}]{status.state}[/]", pid, status.address, status.detail)
    return table


def _describe(process) -> str:
    if hasattr(process, "grpc_url"):
        return (
            f"pid {process.pid}  grpc {process.grpc_url}  http {process.http_url}  "
            f"models {', '.join(process.models)}  log {process.log}"
        )
    if hasattr(process, "broker"):
        return f"pid {process.pid}  {process.broker}  log {process.log}"
    return f"local storage {process.path}"


def _add_only(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        type=_csv,
        default=list(COMPONENTS),
        help=f"comma-separated subset of {','.join(COMPONENTS)}",
    )


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


# ------------------------------------------------------------------------------------------- the method


def add_method(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="fit the retrievers and instruction-tune the reranker on a dataset")
    _add_dataset(train)
    train.add_argument("--checkpoint", default=None,
                       help="a seq2seq checkpoint, path or hub name (Flan-T5 in production); default: offline MiniLM")
    train.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    train.add_argument("--retriever", default="sasrec", help="the retriever that feeds the reranker")
    train.add_argument("--k", type=int, default=20, help="candidates reranked per request")
    train.add_argument("--minutes", type=float, default=None, help="reranker training budget (wall clock)")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--fresh", action="store_true", help="start over instead of resuming an interrupted run")
    train.set_defaults(handler=method_train)

    evaluate = commands.add_parser("evaluate", help="every method under the full-ranking and sampled protocols")
    _add_dataset(evaluate)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    evaluate.set_defaults(handler=method_evaluate)


def method_train(args: argparse.Namespace, settings: Settings) -> int:
    from instructrec import experiment

    dataset = _load_dataset(args, settings)
    config = experiment.PipelineConfig(retriever=args.retriever, k=args.k, checkpoint=args.checkpoint, lora=args.lora)
    if args.minutes is not None:
        config.train.max_minutes = args.minutes
    if args.epochs is not None:
        config.train.epochs = args.epochs
    config = experiment.fit(dataset, _artifacts(args, settings), config, resume=not args.fresh)
    console.print(experiment.summary(config))
    return 0


def method_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    import orjson

    from instructrec import experiment
    from instructrec.evaluation.report import tables

    dataset = _load_dataset(args, settings)
    out = _artifacts(args, settings)
    config = experiment.PipelineConfig.load(out / "pipeline.json")
    results = experiment.evaluate(dataset, out, seed=args.seed)
    for rendered in tables(args.dataset, results, experiment.method_seconds(config)):
        console.print(rendered)
    if args.json_path:
        Path(args.json_path).write_bytes(orjson.dumps({args.dataset: results}, option=orjson.OPT_INDENT_2))
    return 0


def _add_dataset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-latest-small", help="ml-latest-small, ml-100k, or a path")
    parser.add_argument("--data-root", default=None, help="folder holding the named datasets (default: settings)")
    parser.add_argument("--artifacts", default=None, help="default: <model.artifacts>/<dataset>")


def _load_dataset(args: argparse.Namespace, settings: Settings):
    from instructrec.data import load

    return load(args.dataset, root=args.data_root or settings.data_root)


def _artifacts(args: argparse.Namespace, settings: Settings) -> Path:
    return Path(args.artifacts) if args.artifacts else settings.model.artifacts / Path(args.dataset).name


def add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="export a trained reranker as a new Triton model version")
    add_export_arguments(export)
    export.set_defaults(handler=method_export)


def method_export(args: argparse.Namespace, settings: Settings) -> int:
    try:
        console.print(f"exported {export_from_args(args)}")
    except ExportError as error:
        errors.print(f"[red]error:[/] {error}", highlight=False)
        return 2
    return 0


# ------------------------------------------------------------------------------------------ registration

COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_infra, add_method, add_export, add_stream_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructrec",
        description="InstructRec Stream: an event-driven recommender (settings: INSTRUCTREC_* variables).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args, Settings())
    except ValidationError as error:
        errors.print(f"[red]invalid configuration (INSTRUCTREC_* variables):[/] {error}", highlight=False)
        return 2
    except (InfraError, DataFormatError, FileNotFoundError) as error:
        errors.print(f"[red]error:[/] {error}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
