"""The fine-tune loop against the real broker and a real tritonserver: a whole cycle (small N) that ends in a
hot swap the stream can use, rollback, and SIGKILLs mid-training and mid-publish.

A small catalogue with categories and years is trained offline first (seconds), exported as version 1 into
this module's own model repository, served by this module's own tritonserver (other modules export versions
of the same model name into the session's). Clicks are replayed into the session's broker.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from instructrec.adapters.triton import repository as repo
from instructrec.adapters.triton.client import TritonReranker
from instructrec.artifacts import Artifacts
from instructrec.config import FinetuneSettings, InfraSettings, Settings, TopicNames
from instructrec.data.dataset import CATALOGUES, Dataset, Interaction, Item
from instructrec.events import ModelUpdate, decode
from instructrec.infra import Infrastructure, run_sync, settings_env
from instructrec.serving.calibration import calibrate, read_calibration
from instructrec.serving.scorer import warmup_request
from streams.kafka.admin import ensure_topics
from streams.kafka.producer import EventProducer
from streams.kafka.reader import TopicReader
from workers.commands import validation_requests
from workers.finetune.publish import PublishError, publish, rollback
from workers.finetune.worker import FinetuneWorker, store_path
from workers.replay import ReplayConfig, replay_events

TIMEOUT_S = 240.0
MODEL = repo.MODEL_NAME


def catalogue_dataset() -> Dataset:
    kinds = ("Comedy", "Drama", "Horror", "Sci-Fi", "Crime")
    items = [
        Item(f"m{i}", f"Picture number {i}", 1970 + (i * 7) % 50, (kinds[i % 5], kinds[(i * 3 + 1) % 5]))
        for i in range(80)
    ]
    rng = random.Random(0)
    histories = []
    for u in range(30):
        taste = u % 5
        seq = [i for i in range(80) if i % 5 == taste] + rng.sample(range(80), 10)
        rng.shuffle(seq)
        histories.append(
            [Interaction(item, 1_000_000 + 60 * t, 4.0) for t, item in enumerate(dict.fromkeys(seq))]
        )
    return Dataset("pictures", items, [f"user{u}" for u in range(30)], histories, nouns=CATALOGUES["movie"])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return catalogue_dataset()


@pytest.fixture(scope="module")
def artifacts(root: Path, dataset: Dataset) -> Path:
    from instructrec import experiment
    from instructrec.retrieval.sasrec import SASRecConfig

    config = experiment.PipelineConfig(
        sasrec=SASRecConfig(epochs=3, eval_every=1, patience=2, d=16, max_len=30),
        encoder_layers=1,
        decoder_layers=1,
        k=10,
    )
    config.train.epochs, config.train.candidates, config.train.positions_per_user = 1, 10, 2
    experiment.fit(dataset, Artifacts.of(root / "artifacts", dataset.name), config, verbose=False)
    return root / "artifacts"


@pytest.fixture(scope="module")
def triton(root: Path, artifacts: Path, dataset: Dataset):
    """This module's own tritonserver over its own repository, serving the trained model as version 1."""
    repository = repo.copy_repository(repo.default_repository(), root / "repository")
    layout = Artifacts.of(artifacts, dataset.name)
    # Version 1 calibrated as `instructrec export --calibrate` does: Triton serves its choice, and the
    # versions the worker publishes carry it.
    requests, targets = validation_requests(layout, dataset)
    instances = repo.instance_count(repository / MODEL / "config.pbtxt")
    chosen = calibrate(layout.best_reranker, requests, targets, instances=instances, latency_requests=5)
    repo.export_version(layout.best_reranker, repository, 1, calibration=chosen.to_json())
    settings = Settings(state_dir=root / "infra", infra=InfraSettings(model_repository=repository))
    infrastructure = Infrastructure(settings)
    state = infrastructure.up(components=["triton"], models=["health", MODEL])
    yield state.triton, repository
    report = infrastructure.down()
    assert report.ok, report.problems


@pytest.fixture(scope="module")
def settings(local_infra, kafka, triton, artifacts, dataset, root) -> Settings:
    state, repository = triton
    base = local_infra.settings
    run = uuid.uuid4().hex[:8]
    topics = TopicNames(**{role: f"{name}-ft-{run}" for role, name in TopicNames().model_dump().items()})
    settings = base.model_copy(
        update={
            "state_dir": root / "state",
            "kafka": base.kafka.model_copy(update={"topics": topics}),
            "triton": base.triton.model_copy(
                update={"url": state.grpc_url, "repository": repository, "timeout_s": 30.0}
            ),
            "model": base.model.model_copy(update={"artifacts": artifacts}),
            "stream": base.stream.model_copy(update={"dataset": dataset.name}),
            "finetune": FinetuneSettings(
                group_id=f"finetune-{run}",
                every_examples=80,
                holdout=40,
                min_examples=20,
                budget_minutes=0.5,
                epochs=1,
                threads=1,
                nice=0,
                min_margin=-1.0,  # the gate is tested on its own: here every candidate goes through
                confidence=0.0,
                keep_versions=3,
                poll_s=0.2,
            ),
        }
    )
    run_sync(ensure_topics(settings.kafka))
    return settings


async def replay_clicks(settings: Settings, dataset: Dataset, users: int, per_user: int) -> int:
    events = replay_events(dataset, ReplayConfig(users=users, max_per_user=per_user, query_every=0))
    async with EventProducer(settings.kafka) as producer:
        await producer.send_all(events)
    return len(events)


async def served(settings: Settings) -> str:
    async with TritonReranker(settings.triton) as client:
        return await client.refresh_model_version()


async def test_a_cycle_gates_and_hot_swaps_a_new_version_and_rollback_restores_the_old(
    settings, dataset
) -> None:
    await replay_clicks(settings, dataset, users=30, per_user=8)
    worker = FinetuneWorker(settings)
    outcomes = []

    def done(outcome) -> None:
        outcomes.append(outcome)
        worker.stop.set()

    async with TopicReader(settings.kafka, settings.kafka.topics.model_updates) as updates:
        await asyncio.wait_for(worker.run(done), TIMEOUT_S)
        [outcome] = outcomes
        assert outcome.accepted and outcome.version == "2" and outcome.incumbent == "1", outcome
        assert outcome.metrics["examples"] > 0 and outcome.metrics["judged"] > 0
        records = [r async for r in updates.records(idle_timeout_s=5)]
    [update] = [decode(ModelUpdate, r.value) for r in records]
    assert update.kind == "verdict" and update.accepted and update.version == "2" and update.incumbent == "1"

    assert await served(settings) == "2"
    first, carried = (read_calibration(settings.triton.repository / MODEL / v) for v in ("1", "2"))
    assert carried is not None and carried.inherited_from == 1
    assert (carried.quantize, carried.dtype, carried.threads) == (first.quantize, first.dtype, first.threads)
    async with TritonReranker(settings.triton) as client:  # the swapped version answers
        scores, version = (await client.score_with_versions([warmup_request()]))[0]
        assert version == "2" and len(scores) == 20
        assert await rollback(settings.triton.repository, client) == 1
    assert await served(settings) == "1" and repo.versions(settings.triton.repository) == [1]


async def test_a_version_that_does_not_load_is_retired_and_the_old_one_serves_on(
    settings, artifacts, dataset, root
):
    """A candidate whose weights are unreadable: Triton's load fails, its folder leaves the repository, and
    version 1 answers throughout."""
    broken = root / "broken"
    shutil.copytree(Artifacts.of(artifacts, dataset.name).best_reranker, broken)
    corrupted = list(broken.rglob("*.safetensors"))
    assert corrupted
    for weights in corrupted:
        weights.write_bytes(b"not safetensors")
    async with TritonReranker(settings.triton) as client:
        with pytest.raises(PublishError, match="did not come up"):
            await publish(broken, settings.triton.repository, client, keep=3)
        assert await client.refresh_model_version() == "1"
        (scores, version), *_ = await client.score_with_versions([warmup_request()])
        assert version == "1" and len(scores) == 20
    assert repo.versions(settings.triton.repository) == [1]
    assert sorted(p.name for p in (settings.triton.repository / MODEL).iterdir()) == [
        "1",
        "config.pbtxt",
        "configs",
    ]


def start_worker(settings: Settings, log: Path, env: dict | None = None) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.finetune"],
            env={**settings_env(settings), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def cycles(settings: Settings) -> list[tuple]:
    with sqlite3.connect(store_path(settings)) as db:
        return db.execute("SELECT id, finished, verdict FROM cycles ORDER BY id").fetchall()


def wait_for(condition, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"the worker exited ({process.returncode}) before {what}:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


# A pause between the export (the new folder renamed into the repository) and the load, to kill in.
PAUSE_IN_PUBLISH = """
import asyncio, workers.finetune.publish as _publish

_export = _publish.export_version

def export_version(*args, **kwargs):
    folder = _export(*args, **kwargs)
    print("PAUSED AFTER EXPORT", folder, flush=True)
    import time
    time.sleep(600)
    return folder

_publish.export_version = export_version
"""


async def test_sigkill_mid_training_and_mid_publish_never_breaks_serving_and_resumes_exactly(
    settings, dataset, root
) -> None:
    assert await served(settings) == "1"
    ingested_before = _ingested(settings)
    produced = await replay_clicks(
        settings, dataset, users=30, per_user=14
    )  # the first 8 per user again, then 6 new
    log = root / "killed.log"

    # 1. killed while a cycle trains: nothing reaches the repository, the served version is untouched
    first = start_worker(settings, log)
    wait_for(
        lambda: any(finished is None for _, finished, _ in cycles(settings)),
        "a cycle in training",
        first,
        log,
    )
    kill(first)
    assert repo.versions(settings.triton.repository) == [1] and await served(settings) == "1"
    assert sorted(p.name for p in (settings.triton.repository / MODEL).iterdir()) == [
        "1",
        "config.pbtxt",
        "configs",
    ]

    # 2. killed mid-publish: the new folder is whole in the repository, the old version still serves
    fault = root / "fault"
    fault.mkdir(exist_ok=True)
    (fault / "sitecustomize.py").write_text(PAUSE_IN_PUBLISH)
    second = start_worker(settings, log, env={"PYTHONPATH": str(fault)})
    wait_for(lambda: "PAUSED AFTER EXPORT" in log.read_text(), "the publish pause", second, log)
    kill(second)
    newest = max(repo.versions(settings.triton.repository))
    assert (
        newest > 1
        and (settings.triton.repository / MODEL / str(newest) / "reranker" / "reranker.json").is_file()
    )
    assert await served(settings) == "1"

    # 3. restarted: it finishes the swap it was accepted for, and every click went into the store exactly once
    third = start_worker(settings, log)
    try:
        wait_for(lambda: run_sync(served(settings)) == str(newest), f"version {newest} serving", third, log)
        wait_for(
            lambda: _ingested(settings) >= ingested_before + produced, "every click ingested", third, log
        )
    finally:
        third.send_signal(signal.SIGTERM)
        third.wait(60)
    assert _ingested(settings) == ingested_before + produced  # no message counted twice across the kills
    with sqlite3.connect(store_path(settings)) as db:
        positions = dict(
            ((t, p), o) for t, p, o in db.execute("SELECT topic, partition, next_offset FROM positions")
        )
    ends = await _end_offsets(settings)
    assert {k: v for k, v in positions.items() if k[0] == settings.kafka.topics.clicks} == ends


def _ingested(settings: Settings) -> int:
    """Clicks records consumed (every record moves a position by one; examples are a subset of them)."""
    path = store_path(settings)
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT topic, next_offset FROM positions").fetchall()
    return sum(o for t, o in rows if t == settings.kafka.topics.clicks)


async def _end_offsets(settings: Settings) -> dict:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**settings.kafka.aiokafka_kwargs())
    await consumer.start()
    try:
        topic = settings.kafka.topics.clicks
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}
