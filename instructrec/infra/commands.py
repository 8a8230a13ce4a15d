"""`instructrec infra up|down|status`: the local infrastructure from the command line; `instructrec demo`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from instructrec.config import Settings
from instructrec.infra.infrastructure import Infrastructure
from instructrec.infra.state import COMPONENTS
from instructrec.infra.status import ComponentStatus

console = Console(soft_wrap=True)  # long paths and URLs stay on one line, copy-pasteable
errors = Console(stderr=True, soft_wrap=True)


def add_commands(commands: argparse._SubParsersAction) -> None:
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

    demo = commands.add_parser(
        "demo", help="the whole system live on ml-latest-small: train, serve, replay, fine-tune, then stop"
    )
    demo.add_argument(
        "--quick", action="store_true", help="a smaller model and fewer users (about 5 minutes)"
    )
    demo.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="the folder holding ml-latest-small/ (default: found or fetched)",
    )
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from instructrec.infra.demo import FULL, QUICK
    from instructrec.infra.demo import run_demo as run

    return run(settings, QUICK if args.quick else FULL, data=args.data_root, console=Console())


def infra_up(args: argparse.Namespace, settings: Settings) -> int:
    # The services outlive this command: a developer runs `infra up`, other commands, then `infra down`.
    infrastructure = Infrastructure(settings, detached=True)
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
