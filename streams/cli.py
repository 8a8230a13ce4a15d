"""The streaming commands of the `instructrec` CLI: worker, index, replay, produce, subscribe.

`add_stream_commands(commands)` declares them on the CLI's subparsers; each binds a handler
`handler(args, settings) -> exit code`, as every command of `instructrec.cli` does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import orjson
from rich.console import Console

from instructrec.config import Settings
from instructrec.events import SCHEMAS, EventError, decode, validate
from workers.producer import ROLES, role_of

errors = Console(stderr=True, soft_wrap=True)
TOPIC_CHOICES = [role.replace("_", "-") for role in ROLES]


def add_stream_commands(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser("worker", help="run a stream worker (Faust agents and web views)")
    worker.add_argument("--web-port", type=int, default=None, help="default: INSTRUCTREC_WEB__PORT")
    worker.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(handler=run_worker)

    index = commands.add_parser("index", help="send a dataset's catalogue as item events")
    _dataset_arguments(index)
    index.add_argument("--limit", type=int, default=None, help="only the first N items")
    index.set_defaults(handler=run_index)

    replay = commands.add_parser("replay", help="send a dataset's interactions as click and query events")
    _dataset_arguments(replay)
    replay.add_argument("--users", type=int, default=None, help="only the first N users")
    replay.add_argument("--max-per-user", type=int, default=None, help="each user's first M interactions")
    replay.add_argument("--query-every", type=int, default=10, help="a query before every N-th interaction (0: none)")
    replay.add_argument("--text-rate", type=float, default=0.5, help="share of queries with an intention text")
    replay.add_argument("--speed", type=float, default=0.0, help="time compression factor; 0: as fast as possible")
    replay.add_argument("--max-gap", type=float, default=1.0, help="longest pause between two events, seconds")
    replay.add_argument("--seed", type=int, default=0)
    replay.set_defaults(handler=run_replay)

    produce = commands.add_parser("produce", help="send JSON lines (one event each) to a topic")
    produce.add_argument("topic", choices=TOPIC_CHOICES)
    produce.add_argument("--file", type=Path, default=None, help="default: standard input")
    produce.add_argument("--no-validate", action="store_true",
                         help="send each line as it is (e.g. to exercise the dead-letter path)")  # fmt: skip
    produce.add_argument("--key", default=None, help="message key for unvalidated lines")
    produce.set_defaults(handler=run_produce)

    subscribe = commands.add_parser("subscribe", help="print a topic's events as JSON lines")
    subscribe.add_argument("topic", choices=TOPIC_CHOICES)
    subscribe.add_argument("--from-beginning", action="store_true", help="default: only new events")
    subscribe.add_argument("--count", type=int, default=None, help="stop after N events")
    subscribe.add_argument("--timeout", type=float, default=None, help="stop after S seconds without an event")
    subscribe.add_argument("--key", default=None, help="only events with this message key (e.g. a user id)")
    subscribe.set_defaults(handler=run_subscribe)


def _dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-latest-small", help="ml-latest-small, ml-100k, or a path")
    parser.add_argument("--data-root", type=Path, default=None, help="folder of named datasets (default: settings)")
    parser.add_argument("--k-core", type=int, default=5, help="k-core filter, as the trained models saw it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _dataset(args: argparse.Namespace, settings: Settings):
    from instructrec.data import load

    return load(args.dataset, root=args.data_root or settings.data_root, k=args.k_core)


# ------------------------------------------------------------------------------------------------ handlers


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.worker import run_worker as run

    return run(settings, web_port=args.web_port, loglevel=args.loglevel)


def run_index(args: argparse.Namespace, settings: Settings) -> int:
    from workers.index import index_dataset

    dataset = _dataset(args, settings)
    sent = asyncio.run(index_dataset(settings.kafka, dataset, limit=args.limit, progress=not args.quiet))
    errors.print(f"sent {sent} item events to {settings.kafka.topics.items}")
    return 0


def run_replay(args: argparse.Namespace, settings: Settings) -> int:
    from workers.replay import ReplayConfig, replay, replay_events

    config = ReplayConfig(users=args.users, max_per_user=args.max_per_user, query_every=args.query_every,
                          text_rate=args.text_rate, seed=args.seed)  # fmt: skip
    events = replay_events(_dataset(args, settings), config)
    sent = asyncio.run(replay(settings.kafka, events, speed=args.speed, max_gap_s=args.max_gap,
                              progress=not args.quiet))  # fmt: skip
    errors.print(f"sent {sent} events")
    return 0


def run_produce(args: argparse.Namespace, settings: Settings) -> int:
    from workers.producer import EventProducer

    role = role_of(args.topic)
    schema = SCHEMAS[role]
    source = args.file.open("rb") if args.file else sys.stdin.buffer

    async def send() -> tuple[int, int]:
        sent = bad = 0
        async with EventProducer(settings.kafka) as producer:
            for number, line in enumerate(source, start=1):
                line = line.strip()
                if not line:
                    continue
                if args.no_validate:
                    await producer.send_raw(role, args.key.encode() if args.key else None, line)
                    sent += 1
                    continue
                try:
                    event = validate(schema, orjson.loads(line))
                except (orjson.JSONDecodeError, EventError) as error:
                    errors.print(f"line {number}: {error}", highlight=False)
                    bad += 1
                    continue
                await producer.send(event)
                sent += 1
        return sent, bad

    try:
        sent, bad = asyncio.run(send())
    finally:
        if args.file:
            source.close()
    errors.print(f"sent {sent} event(s) to {getattr(settings.kafka.topics, role)}; {bad} invalid line(s) skipped")
    return 1 if bad else 0


def run_subscribe(args: argparse.Namespace, settings: Settings) -> int:
    from workers.producer import consume

    role = role_of(args.topic)
    key = args.key.encode() if args.key else None

    async def read() -> int:
        n = 0
        async for _, _, message_key, value in consume(settings.kafka, role, from_beginning=args.from_beginning,
                                                      idle_timeout_s=args.timeout):  # fmt: skip
            if key is not None and message_key != key:
                continue
            try:  # events are printed as compact JSON lines; anything else as a JSON string
                line = orjson.dumps(decode(SCHEMAS[role], value).model_dump())
            except EventError:
                line = orjson.dumps({"invalid": (value or b"").decode("utf-8", errors="replace")})
            sys.stdout.buffer.write(line + b"\n")
            sys.stdout.buffer.flush()
            n += 1
            if args.count is not None and n >= args.count:
                break
        return n

    try:
        asyncio.run(read())
    except KeyboardInterrupt:
        return 130
    return 0
