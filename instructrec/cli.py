"""The ``instructrec`` command line: the composition root, and the only module that sees every package.

Each package declares its own commands (``add_commands(subparsers)``, binding ``handler(args, settings)``);
``COMMANDS`` lists them, and that is the one place a new group is registered. Settings are built once here,
at the edge, and passed down.

    config                               here                         (every setting and its default)
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
from rich.table import Table

from instructrec.config import Settings, reference
from instructrec.data.source import DataFormatError
from instructrec.infra import InfraError
from instructrec.infra import commands as infra_commands
from streams import commands as stream_commands
from streams.kafka.admin import TopicError
from workers import commands as worker_commands

errors = Console(stderr=True, soft_wrap=True)


def add_config(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="every INSTRUCTREC_* setting: its default and what it does")
    config.add_argument("--markdown", action="store_true", help="as a Markdown table")
    config.set_defaults(handler=print_config)


def print_config(args: argparse.Namespace, settings: Settings) -> int:
    rows = reference()
    if args.markdown:
        print("| variable | default | |\n|---|---|---|")
        for variable, default, description in rows:
            print(f"| `{variable}` | `{default}` | {description} |")
        return 0
    table = Table("variable", "default", "", box=None, pad_edge=False)
    for row in rows:
        table.add_row(*row)
    Console(soft_wrap=True).print(table)
    return 0


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_config,
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
