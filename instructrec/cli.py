"""The ``instructrec`` command line: the composition root, and the only module that sees every package.

Each package declares its own commands (``add_commands(subparsers)``, binding ``handler(args, settings)``);
``COMMANDS`` lists them, and that is the one place a new group is registered. Settings are built once here,
at the edge, and passed down.

    infra up|down|status, demo           instructrec.infra.commands   (local development infrastructure)
    worker                               streams.commands             (a stream worker)
    train, evaluate, export, index,      workers.commands             (batch and long-running jobs)
    replay, produce, subscribe
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError
from rich.console import Console

from instructrec.config import Settings
from instructrec.data.source import DataFormatError
from instructrec.infra import InfraError
from instructrec.infra import commands as infra_commands
from streams import commands as stream_commands
from streams.kafka.admin import TopicError
from workers import commands as worker_commands

errors = Console(stderr=True, soft_wrap=True)

COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    infra_commands.add_commands,
    stream_commands.add_commands,
    worker_commands.add_commands,
)


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
    except (InfraError, TopicError, DataFormatError, FileNotFoundError) as error:
        errors.print(f"[red]error:[/] {error}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
