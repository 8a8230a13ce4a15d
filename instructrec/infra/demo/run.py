"""The demo's walk, start to clean stop. Everything it starts lives under `<state_dir>/demo/run/` (cleared at
the start: each demo begins from an empty broker, store and repository) and stops in `finally`: at the end,
on an error and on Ctrl-C or SIGTERM. The trained model is cached in `<state_dir>/demo/models/`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from instructrec.config import FinetuneSettings, InfraSettings, QdrantSettings, Settings
from instructrec.events import ClickEvent, Event, ModelUpdate, Recommendation, decode
from instructrec.infra.demo.dashboard import Dashboard
from instructrec.infra.demo.model import DATASET, data_root, trained_pipeline
from instructrec.infra.demo.presets import DemoPreset
from instructrec.infra.infrastructure import Infrastructure
from instructrec.infra.ports import free_port
from instructrec.infra.worker import FinetuneProcess, WorkerProcess

MODEL = "instructrec_reranker"
LOG_EVERY_S = 10.0  # without a terminal to redraw, a status line this often


def run_demo(settings: Settings, preset: DemoPreset, *, data: Path | None, console: Console) -> int:
    started = time.monotonic()
    home = Path(settings.state_dir).resolve() / "demo"
    run = home / "run"
    base = settings.model_copy(
        update={
            "state_dir": run,
            "qdrant": QdrantSettings(path=run / "qdrant"),
            "infra": InfraSettings(
                **{
                    **settings.infra.model_dump(),
                    "model_repository": run / "repository",
                    "models": ["health", MODEL],
                    "start_timeout_s": max(300.0, settings.infra.start_timeout_s),
                }
            ),
        }
    )
    infrastructure = Infrastructure(base)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it like Ctrl-C
    finetune: FinetuneProcess | None = None
    worker: WorkerProcess | None = None
    try:
        infrastructure.down()  # what an interrupted demo may have left running
        shutil.rmtree(run, ignore_errors=True)
        root = data_root(data, settings.data_root, console)
        with console.status(f"loading {DATASET}…"):
            from instructrec.data import load

            dataset = load(DATASET, root=root)
        trained = trained_pipeline(dataset, preset, home / "models", console)
        if trained.cached:
            console.print(
                f"[green]✓[/] reusing the {preset.name} model trained before ({trained.artifacts.root})"
            )
        settings = _start_services(base, trained, infrastructure, preset, console)
        worker = WorkerProcess(settings, web_port=free_port(), log=run / "logs" / "worker.log")
        with console.status("starting a stream worker (Faust agents, web view)…"):
            worker.start().wait_healthy(300)
        console.print(f"[green]✓[/] stream worker at {worker.base_url} (try-it page: {worker.url('/')})")
        _index_catalogue(settings, dataset, worker, console)
        finetune = FinetuneProcess(settings, log=run / "logs" / "finetune.log").start()
        console.print("[green]✓[/] fine-tune worker started (learns from what happens after the split)")
        dashboard = Dashboard()
        events = _events(dataset, preset, trained.cut)
        asyncio.run(_live(settings, worker, events, preset, dashboard, console))
        _ask(worker, dataset, preset, console)
        console.print(dashboard.render(time.monotonic()))
        console.print(
            f"[bold green]demo finished[/] in {_minutes(time.monotonic() - started)}: logs in {run / 'logs'}, "
            f"the model cached in {trained.artifacts.root}"
        )
        return 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping everything…[/]")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        try:
            _stop(finetune, worker, infrastructure, console)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _start_services(
    base: Settings, trained, infrastructure: Infrastructure, preset: DemoPreset, console
) -> Settings:
    from instructrec.adapters.triton.repository import copy_repository, default_repository, export_version

    repository = copy_repository(default_repository(), base.infra.model_repository)
    export_version(trained.artifacts.best_reranker, repository, 1, link=True)
    with console.status("starting the broker and Triton (loading the reranker, version 1)…"):
        state = infrastructure.up(components=["kafka", "triton", "qdrant"])
    console.print(
        f"[green]✓[/] broker {state.kafka.broker} · Triton {state.triton.grpc_url} · Qdrant {state.qdrant.path}"
    )
    settings = state.settings(base)
    return settings.model_copy(
        update={
            "model": settings.model.model_copy(update={"artifacts": trained.artifacts.root.parent}),
            "stream": settings.stream.model_copy(update={"dataset": DATASET}),
            "finetune": FinetuneSettings(
                every_examples=preset.every_examples,
                min_examples=preset.every_examples // 2,
                holdout=preset.holdout,
                budget_minutes=preset.budget_minutes,
                epochs=1,
                since_ts=trained.cut,
                poll_s=0.5,
            ),
        }
    )


def _index_catalogue(settings: Settings, dataset, worker: WorkerProcess, console: Console) -> None:
    """The catalogue as item events, the product's way in: the catalog agent embeds and writes them to Qdrant."""
    from instructrec.infra.processes import run_sync
    from workers.index import index_dataset

    run_sync(index_dataset(settings.kafka, dataset, progress=False))
    with console.status(f"the catalog agent is indexing {dataset.n_items:,} items into Qdrant…"):
        deadline = time.monotonic() + 600
        while _indexed(worker) < dataset.n_items:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the catalogue was not indexed within 10 minutes; see {worker.log}")
            time.sleep(1)
    console.print(f"[green]✓[/] {dataset.n_items:,} items indexed (text and collaborative vectors)")


def _indexed(worker: WorkerProcess) -> float:
    with (
        contextlib.suppress(OSError, ValueError),
        urllib.request.urlopen(worker.url("/metrics"), timeout=5) as response,
    ):
        found = re.search(rb"^instructrec_catalog_items_indexed_total (\S+)$", response.read(), re.M)
        return float(found.group(1)) if found else 0.0
    return 0.0


def _events(dataset, preset: DemoPreset, cut: float) -> tuple[list[ClickEvent], list[Event]]:
    from workers.replay import ReplayConfig, replay_events, split_at

    config = ReplayConfig(
        users=preset.users, query_every=preset.query_every, text_rate=preset.text_rate, min_history=3, k=10
    )
    before, after = split_at(replay_events(dataset, config), cut)
    return before, after[: int(preset.rate * preset.live_seconds)]


# ------------------------------------------------------------------------------------------------ live


async def _live(
    settings: Settings, worker: WorkerProcess, events, preset: DemoPreset, dashboard, console
) -> None:
    from streams.kafka.producer import EventProducer
    from streams.kafka.reader import TopicReader
    from workers.replay import Answers, send_live

    before, after = events
    topics = settings.kafka.topics
    answered = Answers()

    def on_answer(answer: Recommendation, now: float) -> None:
        answered.add(answer.request_id)
        dashboard.on_answer(answer, now)

    async with (
        TopicReader(settings.kafka, topics.recommendations) as answers,
        TopicReader(settings.kafka, topics.model_updates) as updates,
        EventProducer(settings.kafka) as producer,
    ):
        tasks = [
            asyncio.create_task(_read(answers, Recommendation, on_answer)),
            asyncio.create_task(_read(updates, ModelUpdate, lambda u, _: dashboard.on_update(u))),
            asyncio.create_task(_poll(settings, worker, dashboard)),
        ]
        terminal = console.is_terminal
        live = (
            Live(dashboard.render(time.monotonic()), console=console, refresh_per_second=2)
            if terminal
            else None
        )
        drawing = asyncio.create_task(_draw(dashboard, live, console))
        try:
            with live or contextlib.nullcontext():
                dashboard.phase = f"telling the stream the past: {len(before):,} earlier clicks"
                for event in before:
                    await producer.send(event)
                await producer.flush()
                dashboard.phase = f"live: {len(after):,} later events at {preset.rate:g}/s"
                await send_live(
                    producer,
                    after,
                    rate=preset.rate,
                    answers=answered,
                    on_sent=lambda event: dashboard.on_sent(event, time.monotonic()),
                )
                dashboard.phase = "waiting for the last answers and the fine-tune worker's verdict"
                await _settle(dashboard, preset)
                dashboard.phase = "done"
        finally:
            for task in (*tasks, drawing):
                task.cancel()
            await asyncio.gather(*tasks, drawing, return_exceptions=True)


async def _settle(dashboard: Dashboard, preset: DemoPreset) -> None:
    """Until every query is answered (or 30 s) and, if none came yet, a fine-tune verdict (or its budget)."""
    deadline = time.monotonic() + 30
    while dashboard.unanswered and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    deadline = time.monotonic() + preset.budget_minutes * 60 + 120
    while not dashboard.verdicts and time.monotonic() < deadline:
        if not dashboard.store.get("running") and dashboard.store.get("examples", 0) < preset.every_examples:
            break  # no cycle is coming
        await asyncio.sleep(1)


async def _read(reader, kind, on) -> None:
    async for record in reader:
        with contextlib.suppress(
            Exception
        ):  # the dashboard shows valid events; the stream dead-letters others
            on(decode(kind, record.value), time.monotonic())


async def _poll(settings: Settings, worker: WorkerProcess, dashboard: Dashboard) -> None:
    from workers.finetune.store import peek
    from workers.finetune.worker import store_path

    while True:
        with contextlib.suppress(OSError, ValueError):
            dashboard.live = await asyncio.to_thread(_get_json, worker.url("/live"))
        with contextlib.suppress(Exception):  # the store is created by the worker when it starts
            dashboard.store = await asyncio.to_thread(peek, store_path(settings))
        await asyncio.sleep(2)


async def _draw(dashboard: Dashboard, live: Live | None, console: Console) -> None:
    while True:
        now = time.monotonic()
        if live is not None:
            live.update(dashboard.render(now))
            await asyncio.sleep(0.5)
        else:
            console.print(dashboard.line(now), highlight=False)
            await asyncio.sleep(LOG_EVERY_S)


def _get_json(url: str, body: dict | None = None, timeout_s: float = 5.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


# ------------------------------------------------------------------------------------ POST /recommend


def _ask(worker: WorkerProcess, dataset, preset: DemoPreset, console: Console) -> None:
    """A few free-text requests through `POST /recommend`, as an application would send them."""
    console.rule("POST /recommend")
    users = [dataset.users[0], "guest-demo"]  # a user the stream knows, and a cold start
    for n, text in enumerate(preset.requests):
        user = users[n % len(users)]
        body = {"user_id": user, "text": text, "k": 5}
        console.print(
            f"[bold]$ curl -X POST {worker.url('/recommend')} -d '{json.dumps(body)}'[/]", highlight=False
        )
        try:
            answer = _get_json(worker.url("/recommend"), body, timeout_s=30)
        except (OSError, ValueError) as error:
            detail = error.read().decode() if isinstance(error, urllib.error.HTTPError) else str(error)
            console.print(f"[red]{detail}[/]")
            continue
        console.print(_answer_table(answer))


def _answer_table(answer: dict) -> Table:
    table = Table(show_header=True, expand=True, box=None, pad_edge=False)
    table.add_column("#", justify="right", width=3)
    table.add_column("item")
    table.add_column("why", style="dim")
    for rank, item in enumerate(answer["items"], 1):
        table.add_row(str(rank), item.get("title") or item["item_id"], "; ".join(item.get("reasons", [])))
    timings = " · ".join(f"{k} {v:.0f}" for k, v in answer.get("timings", {}).items())
    caption = Text(f"model version {answer['model_version']}", style="dim")
    if answer.get("degraded"):
        caption.append(f" · degraded: {answer.get('reason')}", style="red")
    if answer.get("relaxed"):
        caption.append(f" · let go: {', '.join(answer['relaxed'])}")
    caption.append(f" · ms: {timings}\n")
    if answer.get("instruction"):
        caption.append(answer["instruction"], style="italic dim")
    table.caption = caption
    table.caption_justify = "left"
    return table


# ----------------------------------------------------------------------------------------------- stop


def _stop(finetune, worker, infrastructure: Infrastructure, console: Console) -> None:
    with console.status("stopping the workers and the local infrastructure…"):
        for process in (finetune, worker):
            if process is not None:
                process.stop()
        report = infrastructure.down()
    if report.ok:
        console.print("[green]✓[/] everything stopped; nothing left running")
    else:
        console.print(f"[red]the infrastructure did not stop cleanly: {report.problems}[/]")


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60} min {int(seconds) % 60:02d} s"
