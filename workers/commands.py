"""The workers' commands on the `instructrec` CLI: every batch and long-running job.

Each `add_*` declares a command's arguments and binds `handler(args, settings) -> exit code`. Handlers import
their job when they run, so `instructrec --help` does not load torch.

    fetch                a public MovieLens release into the data root (needs internet)
    train, evaluate      the offline pipeline on a dataset (retrievers, reranker; both protocols)
    export               a trained reranker as a new Triton model version
    finetune             the fine-tune worker (and `finetune rollback`, `finetune status`)
    index, replay        a dataset's catalogue / interactions as events
    produce, subscribe   JSON lines in and out of a topic
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import orjson
from rich.console import Console

from instructrec.artifacts import Artifacts
from instructrec.config import Settings
from instructrec.events import SCHEMAS, EventError, decode, validate
from streams.kafka.producer import ROLES, role_of, topic_of

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)
TOPIC_CHOICES = [role.replace("_", "-") for role in ROLES]


def add_commands(commands: argparse._SubParsersAction) -> None:
    for add in (
        add_fetch,
        add_train,
        add_evaluate,
        add_export,
        add_finetune,
        add_index,
        add_replay,
        add_produce,
        add_subscribe,
    ):
        add(commands)


# ------------------------------------------------------------------------------------------------ datasets


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The one set of dataset arguments every job takes (the models were trained on the same view of it)."""
    parser.add_argument("--dataset", default="ml-latest-small", help="ml-latest-small, ml-100k, or a path")
    parser.add_argument(
        "--data-root", type=Path, default=None, help="folder of named datasets (default: settings)"
    )
    parser.add_argument("--k-core", type=int, default=5, help="k-core filter, as the trained models saw it")
    parser.add_argument("--artifacts", type=Path, default=None, help="default: <model.artifacts>/<dataset>")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_dataset(args: argparse.Namespace, settings: Settings):
    from instructrec.data import load

    return load(args.dataset, root=args.data_root or settings.data_root, k=args.k_core)


def artifacts(args: argparse.Namespace, settings: Settings) -> Artifacts:
    return (
        Artifacts(args.artifacts)
        if args.artifacts
        else Artifacts.of(settings.model.artifacts, Path(args.dataset).name)
    )


# ------------------------------------------------------------------------------------------ the pipeline


def add_fetch(commands: argparse._SubParsersAction) -> None:
    fetch = commands.add_parser(
        "fetch", help="download a public MovieLens release (csv layout) into the data root"
    )
    fetch.add_argument("--dataset", default="ml-latest-small", help="a GroupLens csv release")
    fetch.add_argument("--data-root", type=Path, default=None, help="where to unpack it (default: settings)")
    fetch.set_defaults(handler=run_fetch)


def run_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from workers.fetch import fetch_movielens

    try:
        folder = fetch_movielens(args.dataset, args.data_root or settings.data_root)
    except (ValueError, RuntimeError) as error:
        errors.print(f"[red]error:[/] {error}", highlight=False)
        return 2
    console.print(f"{args.dataset} is in {folder}")
    return 0


def add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="fit the retrievers and instruction-tune the reranker on a dataset"
    )
    add_dataset_arguments(train)
    train.add_argument(
        "--checkpoint",
        default=None,
        help="a seq2seq checkpoint, path or hub name (Flan-T5 in production); default: offline MiniLM",
    )
    train.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    train.add_argument("--retriever", default="blend", help="the retriever that feeds the reranker")
    train.add_argument("--k", type=int, default=20, help="candidates reranked per request")
    train.add_argument("--minutes", type=float, default=None, help="reranker training budget (wall clock)")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument(
        "--fresh", action="store_true", help="start over instead of resuming an interrupted run"
    )
    train.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    from instructrec import experiment

    dataset = load_dataset(args, settings)
    config = experiment.PipelineConfig(
        retriever=args.retriever, k=args.k, checkpoint=args.checkpoint, lora=args.lora
    )
    if args.minutes is not None:
        config.train.max_minutes = args.minutes
    if args.epochs is not None:
        config.train.epochs = args.epochs
    config = experiment.fit(dataset, artifacts(args, settings), config, resume=not args.fresh)
    console.print(experiment.summary(config))
    return 0


def add_evaluate(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="every method under the full-ranking and sampled protocols"
    )
    add_dataset_arguments(evaluate)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    evaluate.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from instructrec import experiment
    from instructrec.evaluation.report import tables

    dataset = load_dataset(args, settings)
    layout = artifacts(args, settings)
    config = experiment.PipelineConfig.load(layout.pipeline)
    results = experiment.evaluate(dataset, layout, seed=args.seed)
    for rendered in tables(args.dataset, results, experiment.method_seconds(config)):
        console.print(rendered)
    if args.json_path:
        Path(args.json_path).write_bytes(orjson.dumps({args.dataset: results}, option=orjson.OPT_INDENT_2))
    return 0


def add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="export a trained reranker as a new Triton model version")
    export.add_argument("reranker", type=Path, help="a saved reranker folder (Reranker.save_pretrained)")
    export.add_argument(
        "--repository", type=Path, default=None, help="Triton model repository (deploy/triton)"
    )
    export.add_argument("--version", type=int, default=None, help="version number (default: the next one)")
    export.add_argument("--link", action="store_true", help="hard-link the weights instead of copying them")
    export.add_argument("--overwrite", action="store_true", help="replace an existing version")
    export.add_argument(
        "--calibrate",
        action="store_true",
        help="measure precision and threads on this machine (run it on one like Triton's) on the trained "
        "pipeline's validation requests, and record the choice with the version",
    )
    export.add_argument(
        "--calibrate-requests", type=int, default=300, help="validation requests the quality is judged on"
    )
    export.add_argument(
        "--tolerance", type=float, default=0.005, help="most fused NDCG@10 a faster precision may lose"
    )
    add_dataset_arguments(export)
    export.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace, settings: Settings) -> int:
    from instructrec.adapters.triton.repository import (
        MODEL_NAME,
        ExportError,
        default_repository,
        export_version,
        instance_count,
    )

    repository = args.repository or settings.infra.model_repository or default_repository()
    calibration = None
    if args.calibrate:
        from instructrec.serving.calibration import calibrate

        config = Path(repository) / MODEL_NAME / "config.pbtxt"
        config = config if config.is_file() else default_repository() / MODEL_NAME / "config.pbtxt"
        with console.status("calibration: the validation requests…"):
            requests, targets = validation_requests(
                artifacts(args, settings), load_dataset(args, settings), args.calibrate_requests
            )
        with console.status("calibration: every precision and thread count…") as status:
            measured = calibrate(
                args.reranker,
                requests,
                targets,
                instances=instance_count(config),
                tolerance=args.tolerance,
                progress=lambda line: status.update(f"calibration: {line}"),
            )
        for trial in measured.trials:
            quality = (
                f"NDCG@10 {trial.ndcg10:.4f}, top-1 agreement {trial.top1_agreement:.3f}"
                if trial.ndcg10 is not None
                else "quality not measured: slower than float32"
            )
            console.print(f"  {trial.label}: {trial.ms_p50:.1f} ms per request; {quality}")
        console.print(f"calibration ({measured.seconds:.0f} s): {measured.reason}")
        calibration = measured.to_json()
    try:
        target = export_version(
            args.reranker,
            repository,
            args.version,
            link=args.link,
            overwrite=args.overwrite,
            calibration=calibration,
        )
    except ExportError as error:
        errors.print(f"[red]error:[/] {error}", highlight=False)
        return 2
    console.print(f"exported {target}")
    return 0


def validation_requests(artifacts: Artifacts, dataset, limit: int = 300) -> tuple[list[bytes], list[int]]:
    """The validation requests offline training judges on (`model.training.validation_set`: each user's
    held-out item, asked for with no text, a vague or a specific intention, over the plan's top-k) in wire
    form with the plan's scores and the pipeline's fusion weight, as the stream sends them, and each one's
    chosen candidate by position. Requests whose candidates miss the chosen item are left out: nothing to
    rank."""
    from instructrec.catalogue import describe
    from instructrec.data.split import LeaveOneOut
    from instructrec.experiment import PipelineConfig
    from instructrec.instructions import SynthesisConfig, Synthesizer
    from instructrec.model.training import validation_set
    from instructrec.planner import OfflinePlanner
    from instructrec.serving.wire import encode_request

    config = PipelineConfig.load(artifacts.pipeline)
    planner = OfflinePlanner.load(artifacts, dataset, config.retriever, config.plan)
    synthesizer = Synthesizer(dataset, SynthesisConfig(n_candidates=config.k))
    valid = validation_set(dataset, LeaveOneOut(dataset), planner, synthesizer, config.k, "valid")
    ids = [item.id for item in dataset.items]
    titles = [item.display_title for item in dataset.items]
    texts = [describe(item.display_title, item.genres, item.tags) for item in dataset.items]
    requests, targets = [], []
    for n, (instruction, target) in enumerate(zip(valid.instructions, valid.targets, strict=True)):
        if target not in instruction.candidates:
            continue
        prior = valid.priors[n] if valid.priors is not None else None
        kind = instruction.combination.intention.value  # the weight follows the intention kind, as served
        weight = config.fusion_weights.get(kind, config.fusion_weight)
        requests.append(
            encode_request(
                instruction,
                ids.__getitem__,
                titles.__getitem__,
                retrieval_scores=None if prior is None else [float(x) for x in prior],
                fusion_weight=None if prior is None else weight,
                text_of=texts.__getitem__,
            )
        )
        targets.append(instruction.candidates.index(target))
        if len(requests) == limit:
            break
    return requests, targets


def add_finetune(commands: argparse._SubParsersAction) -> None:
    finetune = commands.add_parser(
        "finetune", help="the fine-tune worker: learn from feedback and clicks, gate, hot-swap into Triton"
    )
    finetune.set_defaults(handler=run_finetune)
    actions = finetune.add_subparsers(dest="action", metavar="{run,rollback,status}")
    actions.add_parser("run", help="run the worker (the default)").set_defaults(handler=run_finetune)
    actions.add_parser("rollback", help="serve the previous model version again").set_defaults(
        handler=run_rollback
    )
    actions.add_parser("status", help="examples stored, the last cycle, the versions").set_defaults(
        handler=run_finetune_status
    )


def run_finetune(args: argparse.Namespace, settings: Settings) -> int:
    from workers.finetune.worker import run_finetune as run

    return run(settings)


def run_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from instructrec.adapters.triton.client import TritonReranker
    from instructrec.events import ModelUpdate
    from streams.kafka.producer import EventProducer
    from workers.finetune.publish import PublishError, rollback
    from workers.finetune.worker import repository_of

    async def go() -> int:
        async with TritonReranker(settings.triton) as triton:
            version = await rollback(repository_of(settings), triton)
        async with EventProducer(settings.kafka) as producer:
            await producer.send(ModelUpdate(version=str(version), accepted=True, kind="rollback"), wait=True)
        return version

    try:
        version = asyncio.run(go())
    except PublishError as error:
        errors.print(f"[red]error:[/] {error}", highlight=False)
        return 2
    console.print(f"version {version} serves again")
    return 0


def run_finetune_status(args: argparse.Namespace, settings: Settings) -> int:
    from instructrec.adapters.triton.repository import versions
    from workers.finetune.store import ExampleStore
    from workers.finetune.worker import repository_of, store_path

    store = ExampleStore(store_path(settings))
    try:
        last = store.last_cycle()
        console.print_json(
            data={
                "store": str(store_path(settings)),
                "examples": store.count(),
                "ingested": store.counter("ingested"),
                "last_cycle": last,
                "versions": versions(repository_of(settings)),
            }
        )
    finally:
        store.close()
    return 0


# ------------------------------------------------------------------------------------- events in and out


def add_index(commands: argparse._SubParsersAction) -> None:
    index = commands.add_parser("index", help="send a dataset's catalogue as item events")
    add_dataset_arguments(index)
    index.add_argument("--limit", type=int, default=None, help="only the first N items")
    index.set_defaults(handler=run_index)


def run_index(args: argparse.Namespace, settings: Settings) -> int:
    from workers.index import index_dataset

    dataset = load_dataset(args, settings)
    sent = asyncio.run(index_dataset(settings.kafka, dataset, limit=args.limit, progress=not args.quiet))
    errors.print(f"sent {sent} item events to {settings.kafka.topics.items}")
    return 0


def add_replay(commands: argparse._SubParsersAction) -> None:
    replay = commands.add_parser("replay", help="send a dataset's interactions as click and query events")
    add_dataset_arguments(replay)
    replay.add_argument("--users", type=int, default=None, help="only the first N users")
    replay.add_argument("--max-per-user", type=int, default=None, help="each user's first M interactions")
    replay.add_argument(
        "--query-every", type=int, default=10, help="a query before every N-th interaction (0: none)"
    )
    replay.add_argument(
        "--text-rate", type=float, default=0.5, help="share of queries with an intention text"
    )
    replay.add_argument(
        "--speed", type=float, default=0.0, help="time compression factor; 0: as fast as possible"
    )
    replay.add_argument(
        "--max-gap", type=float, default=1.0, help="longest pause between two events, seconds"
    )
    replay.add_argument("--seed", type=int, default=0)
    replay.set_defaults(handler=run_replay)


def run_replay(args: argparse.Namespace, settings: Settings) -> int:
    from workers.replay import ReplayConfig, replay, replay_events

    config = ReplayConfig(
        users=args.users,
        max_per_user=args.max_per_user,
        query_every=args.query_every,
        text_rate=args.text_rate,
        seed=args.seed,
    )
    events = replay_events(load_dataset(args, settings), config)
    sent = asyncio.run(
        replay(settings.kafka, events, speed=args.speed, max_gap_s=args.max_gap, progress=not args.quiet)
    )
    errors.print(f"sent {sent} events")
    return 0


def add_produce(commands: argparse._SubParsersAction) -> None:
    produce = commands.add_parser("produce", help="send JSON lines (one event each) to a topic")
    produce.add_argument("topic", choices=TOPIC_CHOICES)
    produce.add_argument("--file", type=Path, default=None, help="default: standard input")
    produce.add_argument(
        "--no-validate",
        action="store_true",
        help="send each line as it is (e.g. to exercise the dead-letter path)",
    )
    produce.add_argument("--key", default=None, help="message key for unvalidated lines")
    produce.set_defaults(handler=run_produce)


def run_produce(args: argparse.Namespace, settings: Settings) -> int:
    from streams.kafka.producer import EventProducer

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
    errors.print(f"sent {sent} event(s) to {topic_of(settings.kafka, role)}; {bad} invalid line(s) skipped")
    return 1 if bad else 0


def add_subscribe(commands: argparse._SubParsersAction) -> None:
    subscribe = commands.add_parser("subscribe", help="print a topic's events as JSON lines")
    subscribe.add_argument("topic", choices=TOPIC_CHOICES)
    subscribe.add_argument("--from-beginning", action="store_true", help="default: only new events")
    subscribe.add_argument("--count", type=int, default=None, help="stop after N events")
    subscribe.add_argument(
        "--timeout", type=float, default=None, help="stop after S seconds without an event"
    )
    subscribe.add_argument("--key", default=None, help="only events with this message key (e.g. a user id)")
    subscribe.set_defaults(handler=run_subscribe)


def run_subscribe(args: argparse.Namespace, settings: Settings) -> int:
    from streams.kafka.reader import TopicReader

    role = role_of(args.topic)
    key = args.key.encode() if args.key else None

    async def read() -> int:
        n = 0
        reader = TopicReader(
            settings.kafka, topic_of(settings.kafka, role), from_beginning=args.from_beginning
        )
        async with reader:
            async for record in reader.records(idle_timeout_s=args.timeout):
                if key is not None and record.key != key:
                    continue
                try:  # events are printed as compact JSON lines; anything else as a JSON string
                    line = orjson.dumps(decode(SCHEMAS[role], record.value).model_dump())
                except EventError:
                    line = orjson.dumps({"invalid": (record.value or b"").decode("utf-8", errors="replace")})
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
