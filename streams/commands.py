"""The stream's command: `instructrec worker` runs one Faust worker (agents and web views)."""

from __future__ import annotations

import argparse

from instructrec.config import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser("worker", help="run a stream worker (Faust agents and web views)")
    worker.add_argument("--web-port", type=int, default=None, help="default: INSTRUCTREC_WEB__PORT")
    worker.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.runner import run_worker as run  # faust and torch load only when the command runs

    return run(settings, web_port=args.web_port, loglevel=args.loglevel)
