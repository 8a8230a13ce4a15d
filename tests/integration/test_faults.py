"""Faults under load: a stream worker keeps answering every query, flags what it could not do, and comes back
to normal answers by itself when the fault ends — never restarted.

- Qdrant errors: the search is retried (the adapters' RetryPolicy), then the answer leaves the text search
  out and says so (`degraded`, "qdrant unavailable … after N attempt(s)"); with the collection back, answers
  are normal again. Embedded Qdrant serves searches from memory, so nothing done to its storage from outside
  the process reaches them (measured: with the storage folder removed under a client, searches still answer;
  only writes fail, "attempt to write a readonly database"). The fault is therefore the collection deleted
  through the worker's own client, triggered from the test (`QDRANT_FAULT`), and put back the same way.
- Triton SIGKILLed: answers come degraded ("reranker unavailable") within the reranker's configured bound,
  not when Triton returns; restarted by the project's Infrastructure on the same ports, it serves the worker's
  next queries.
- The broker restarted (noida-db, stopped and started on its port and data): the worker reconnects, and every
  query whose send the broker acknowledged, before, during or after, is answered exactly once — unless the
  broker itself lost what it had acknowledged, which the test checks before it blames the worker.

Broker restart, as it was: in 3 of 7 runs the worker never answered 9 to 35 of the queries the broker had
acknowledged during the outage: stored on the topic, never processed, while every later query was. The
backlog is fetched at the very moment the rejoin's recovery seeks the stream partitions to their committed
offsets, with Faust's flow already running: records fetched during the seek were put in the streams' queues,
counted as read, and then cleared with the queues, so their second fetch was dropped as already read (the
fix and its measured cause: `streams.kafka.compat.seek_with_flow_stopped`). noida-db itself also loses the
last record it acknowledged on a partition now and then when stopped (bare aiokafka clients: 0 to 2 of about
1,900 per run), and writes the next one at that offset: the test skips, saying so, when the broker lost
acknowledged queries.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError

from instructrec.config import Settings
from instructrec.events import QueryEvent, Recommendation, decode
from instructrec.infra import (
    Infrastructure,
    KafkaState,
    PortInUseError,
    TritonState,
    WorkerProcess,
    free_port,
)
from instructrec.infra.ports import ensure_port_free
from streams.kafka.producer import EventProducer
from streams.kafka.reader import TopicReader
from tests.conftest import LocalInfra
from tests.integration.own_infra import own_infra
from tests.integration.pipeline import TIMEOUT_S, http
from tests.integration.test_crash import AnswerLog, until
from workers.replay import ReplayConfig, replay, replay_events

pytestmark = pytest.mark.integration

USERS = 4
QPS = 3.0  # the load: queries per second, round the users
K = 5
TEXT = "a funny movie from the 90s"  # a query with text searches Qdrant
TRITON_TIMEOUT_S = 10.0  # the reranker's timeout here (no retries): what a degraded answer is bounded by
SLACK_S = 5.0  # the rest of the query path, on a busy machine
TRITON_DUE_S = 5.0  # of the Triton outage, at least this long is more than the bound before it returns
QDRANT_FAULT_S = 8.0
TRITON_BACK_S = 15.0  # from Triton's return to the first answer it ranked
RECOVER_S = 90.0  # from the end of a fault to the first normal answer
PORTS_WAIT_S = 90.0  # TIME_WAIT lasts 60 s on Linux
STEADY_S = 3.0  # normal load before each fault
AFTER_S = 5.0  # load after the broker is back


# ------------------------------------------------------------------------------------------------ fixtures

# The Qdrant fault, installed in the worker process as its sitecustomize: a thread that deletes every
# collection of the worker's own Qdrant client when the test creates `delete` in this folder, and creates them
# again with the same vectors and points on `restore`; each acknowledged by a file (`deleted`, `restored`).
QDRANT_FAULT = """
import pathlib
import threading
import time

import qdrant_client
from qdrant_client import models

FOLDER = pathlib.Path(__file__).parent
_clients = []
_open = qdrant_client.QdrantClient.__init__


def __init__(self, *args, **kwargs):
    _open(self, *args, **kwargs)
    _clients.append(self)


def delete(client):
    saved = []
    for collection in client.get_collections().collections:
        vectors = client.get_collection(collection.name).config.params.vectors
        points, _ = client.scroll(collection.name, limit=100_000, with_vectors=True, with_payload=True)
        client.delete_collection(collection.name)
        saved.append((collection.name, vectors, points))
    return saved


def restore(client, saved):
    for name, vectors, points in saved:
        client.create_collection(name, vectors_config=vectors)
        if points:
            client.upsert(name, [models.PointStruct(id=p.id, vector=p.vector, payload=p.payload) for p in points])


def serve():
    while not (FOLDER / "delete").exists():
        time.sleep(0.05)
    saved = [delete(client) for client in _clients]
    (FOLDER / "deleted").touch()
    while not (FOLDER / "restore").exists():
        time.sleep(0.05)
    for client, collections in zip(_clients, saved):
        restore(client, collections)
    (FOLDER / "restored").touch()


qdrant_client.QdrantClient.__init__ = __init__
threading.Thread(target=serve, name="qdrant-fault", daemon=True).start()
"""


@pytest.fixture(scope="module")
def local_infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInfra]:
    """This module's own broker and Triton: it kills and restarts them, which the session's later modules
    would see (another pid, other model versions)."""
    yield from own_infra(tmp_path_factory)


@pytest.fixture(scope="module")
def kafka(local_infra: LocalInfra) -> KafkaState:
    return local_infra.start_kafka()


@pytest.fixture(scope="module")
def triton(local_infra: LocalInfra) -> TritonState:
    return local_infra.start_triton()


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    """The pipeline's settings (the reranker served by Triton), with a reranker timeout short enough to
    bound a degraded answer by."""
    settings.triton.timeout_s = TRITON_TIMEOUT_S
    return settings


@pytest.fixture(scope="module")
def fault(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qdrant-fault")
    (folder / "sitecustomize.py").write_text(QDRANT_FAULT)
    return folder


@pytest.fixture(scope="module")
def worker(settings: Settings, fault: Path) -> WorkerProcess:
    """The module's one worker, with the Qdrant fault armed (inert until triggered)."""
    log = settings.state_dir / "worker.log"
    with WorkerProcess(settings, web_port=free_port(), log=log, env={"PYTHONPATH": str(fault)}) as process:
        process.wait_healthy(TIMEOUT_S)
        yield process


@pytest.fixture(scope="module")
async def users(worker: WorkerProcess, settings: Settings, dataset) -> list[str]:
    """Users whose history the worker holds (their answers are personalised, not cold starts)."""
    clicks = replay_events(dataset, ReplayConfig(users=USERS, max_per_user=15, query_every=0))
    await replay(settings.kafka, clicks, progress=False)
    wanted = {c.user_id for c in clicks}
    async with asyncio.timeout(TIMEOUT_S):
        for user in wanted:
            while len(http("GET", worker.url(f"/users/{user}/context"))[1].get("history", ())) < 15:
                await asyncio.sleep(0.5)
    return sorted(wanted)


# ------------------------------------------------------------------------------------------------ tests


async def test_qdrant_errors_are_retried_then_answers_degrade_until_it_is_back(
    worker: WorkerProcess, settings: Settings, users: list[str], fault: Path, reranker_version: str
) -> None:
    async with AnswerLog(settings) as log:
        async with Load(settings, users, text=TEXT) as load:
            await normal_answer(log, load, reranker_version, since=time.time())
            await asyncio.sleep(STEADY_S)
            fault_at = await trigger(fault, "delete", "deleted")
            await asyncio.sleep(QDRANT_FAULT_S)
            back_at = await trigger(fault, "restore", "restored")
            recovered_at = await normal_answer(log, load, reranker_version, since=back_at)
        await finish(log, load)

    during = answered_between(log, load, fault_at, back_at)
    retries = len(re.findall(r"qdrant: .* failed .*; retry \d", worker.log.read_text()))
    attempts = f"after {settings.qdrant.retries + 1} attempt(s)"
    print(
        f"\nqdrant collection deleted for {back_at - fault_at:.1f} s under {QPS:g} queries/s: "
        f"{len(during)} answers meanwhile, {sum(a.degraded for _, a in during)} degraded; {retries} retries "
        f"logged; first normal answer {recovered_at - back_at:.1f} s after it was back; "
        f"{_summary(log, load)}"
    )
    assert len(during) >= QDRANT_FAULT_S, "too few answers during the fault to judge it"
    assert all(a.degraded and "qdrant unavailable" in a.reason and attempts in a.reason for _, a in during)
    assert retries >= len(during) * settings.qdrant.retries
    assert_once_each(log, load)


async def test_triton_killed_under_load_degrades_answers_in_time_and_they_recover(
    worker: WorkerProcess, settings: Settings, users: list[str], local_infra, reranker_version: str
) -> None:
    triton = local_infra.state.triton
    pid = worker.process.pid
    bound_s = settings.triton.timeout_s * (settings.triton.retries + 1) + 1.0 + SLACK_S
    async with AnswerLog(settings) as log:
        async with Load(settings, users) as load:
            await normal_answer(log, load, reranker_version, since=time.time())
            await asyncio.sleep(STEADY_S)
            os.kill(triton.pid, signal.SIGKILL)
            killed_at = time.time()
            report = local_infra.infrastructure.down(components=["triton"])  # its stubs, shared memory
            assert report.ok, report.problems
            # Down for longer than the bound, however fast it restarts: queries sent early in the outage must
            # have been answered (degraded) before Triton was back for the bound to be tested.
            await asyncio.sleep(max(0.0, killed_at + bound_s + TRITON_DUE_S - time.time()))
            ports = {"triton_http_port": triton.http_port, "triton_grpc_port": triton.grpc_port}
            ports["triton_metrics_port"] = triton.metrics_port
            await restart(local_infra, "triton", ports, models=triton.models)
            back_at = time.time()
            recovered_at = await normal_answer(log, load, reranker_version, since=back_at)
        await finish(log, load)

    during = answered_between(log, load, killed_at, back_at)
    waited = {r: at - load.sent[r] for r, answers in log.got.items() if r in load.sent for at, _ in answers}
    due = sorted(waited[r] for r, at in load.sent.items() if killed_at <= at <= back_at - bound_s)
    print(
        f"\ntriton killed for {back_at - killed_at:.1f} s under {QPS:g} queries/s: {len(during)} answers "
        f"meanwhile, {sum(a.degraded for _, a in during)} degraded, in {due[len(due) // 2] * 1000:.0f} ms "
        f"(median) and {due[-1] * 1000:.0f} ms at most (bound {bound_s:.0f} s); first normal answer "
        f"{recovered_at - back_at:.1f} s after it was back; {_summary(log, load)}"
    )
    assert len(during) >= 10, "too few answers during the fault to judge it"
    assert all(a.degraded and "reranker unavailable" in a.reason for _, a in during)
    assert due[-1] <= bound_s, "a query waited for Triton's return"
    # the breaker's cool-down, then the channel's reconnect (capped: GrpcTransport's MAX_RECONNECT_BACKOFF_MS)
    assert recovered_at - back_at <= TRITON_BACK_S, "Triton was back, but the worker did not use it"
    assert worker.process.pid == pid and worker.running()
    assert_once_each(log, load)


async def test_a_broker_restart_under_load_loses_and_repeats_no_query(
    worker: WorkerProcess, settings: Settings, users: list[str], local_infra, reranker_version: str
) -> None:
    broker = local_infra.state.kafka
    pid = worker.process.pid
    async with AnswerLog(settings) as log:
        async with Load(settings, users) as load:
            await normal_answer(log, load, reranker_version, since=time.time())
            await asyncio.sleep(STEADY_S)
            stopped_at = time.time()
            report = local_infra.infrastructure.down(components=["kafka"])
            assert report.ok, report.problems
            await restart(local_infra, "kafka", {"kafka_port": broker.port})
            back_at = time.time()
            answering_at = await first_answer(log, load, since=back_at)
            await asyncio.sleep(AFTER_S)
        try:
            await finish(log, load, settings)
        except AssertionError as failure:
            stored = await _request_ids(settings, settings.kafka.topics.queries, QueryEvent)
            if lost := set(load.sent) - stored:
                pytest.skip(
                    f"the broker lost {len(lost)} queries it had acknowledged (see the module's docstring): {failure}"
                )
            raise

    phases = {
        "before": sum(at < stopped_at for at in load.sent.values()),
        "during": sum(stopped_at <= at < back_at for at in load.sent.values()),
        "after": sum(at >= back_at for at in load.sent.values()),
    }
    print(
        f"\nbroker down for {back_at - stopped_at:.1f} s under {QPS:g} queries/s: acknowledged queries "
        f"{phases}, {load.failed} sends refused (broker away past the producer's timeout); first answer "
        f"{answering_at - back_at:.1f} s after it was back; {_summary(log, load)}"
    )
    assert phases["during"] and phases["after"]
    assert worker.process.pid == pid and worker.running()
    assert_once_each(log, load)


# ------------------------------------------------------------------------------------------------ helpers


class Load:
    """Queries at a steady rate in the background, each one sent in a task of its own (so a broker outage
    does not stop the schedule). `sent`: request id → when its send started, for those the broker
    acknowledged; `failed`: sends it refused."""

    def __init__(self, settings: Settings, users: list[str], *, text: str | None = None) -> None:
        self.settings, self.users, self.text = settings, users, text
        self.sent: dict[str, float] = {}
        self.failed = 0
        self._sends: set[asyncio.Task] = set()

    async def __aenter__(self) -> Load:
        self._producer = EventProducer(self.settings.kafka)
        await self._producer.__aenter__()
        self._schedule = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        for n in itertools.count():
            query = QueryEvent(user_id=self.users[n % len(self.users)], k=K, text=self.text)
            task = asyncio.create_task(self._send(query))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
            await asyncio.sleep(1 / QPS)

    async def _send(self, query: QueryEvent) -> None:
        started = time.time()
        try:
            await self._producer.send(query, wait=True)
        except KafkaError:
            self.failed += 1
        else:
            self.sent[query.request_id] = started

    async def __aexit__(self, *exc) -> None:
        self._schedule.cancel()
        await asyncio.gather(self._schedule, *self._sends, return_exceptions=True)
        await self._producer.__aexit__(*exc)


async def normal_answer(log: AnswerLog, load: Load, version: str, *, since: float) -> float:
    """When the first answer that the reranker ordered, to a query sent after `since`, was produced."""
    return await _answer_produced(log, load, since, lambda a: not a.degraded and a.model_version == version)


async def first_answer(log: AnswerLog, load: Load, *, since: float) -> float:
    return await _answer_produced(log, load, since, lambda a: True)


async def _answer_produced(log: AnswerLog, load: Load, since: float, wanted) -> float:
    def found() -> list[float]:
        return [
            at
            for request_id, answers in log.got.items()
            if load.sent.get(request_id, 0.0) >= since
            for at, answer in answers
            if wanted(answer)
        ]

    await until(found, RECOVER_S)
    return min(found())


async def trigger(fault: Path, action: str, done: str) -> float:
    """Ask the worker's Qdrant fault to act; when it says it did."""
    (fault / action).touch()
    await until((fault / done).exists, TIMEOUT_S)
    return time.time()


async def restart(
    local_infra, component: str, ports: dict[str, int], models: list[str] | None = None
) -> None:
    """Start `component` again through the project's Infrastructure, on the ports it had (the worker knows
    no others), once they are free."""
    base = local_infra.base
    pinned = Infrastructure(base.model_copy(update={"infra": base.infra.model_copy(update=ports)}))
    await until(lambda: all(_free(port) for port in ports.values()), PORTS_WAIT_S)
    pinned.up(components=[component], models=models)  # from the main thread: it dies with this process


def _free(port: int) -> bool:
    try:
        ensure_port_free(port, "restart")
    except PortInUseError:
        return False
    return True


async def finish(log: AnswerLog, load: Load, settings: Settings | None = None) -> None:
    """Until every acknowledged query is answered, and a little longer for a duplicate to show. With
    `settings`, a query that is never answered is looked for on both topics, so the failure says where it was
    lost: never stored by the broker, stored but never answered, or answered but never read."""
    try:
        await log.wait_for(set(load.sent))
    except TimeoutError:
        if settings is None:
            raise
        missing = set(load.sent) - log.got.keys()
        stored = await _request_ids(settings, settings.kafka.topics.queries, QueryEvent)
        answered = await _request_ids(settings, settings.kafka.topics.recommendations, Recommendation)
        raise AssertionError(
            f"{len(missing)} of {len(load.sent)} acknowledged queries unanswered: "
            f"{len(missing - stored)} not on the queries topic, {len(missing & stored - answered)} stored but "
            f"not answered, {len(missing & answered)} answered but not read; sent at "
            f"{sorted(round(load.sent[r], 1) for r in missing)}"
        ) from None
    await asyncio.sleep(3.0)


async def _request_ids(settings: Settings, topic: str, schema) -> set[str]:
    async with TopicReader(settings.kafka, topic, from_beginning=True) as reader:
        return {decode(schema, r.value).request_id async for r in reader.records(idle_timeout_s=3.0)}


def answered_between(log: AnswerLog, load: Load, start: float, end: float) -> list:
    """(produced at, answer) of the answers produced in [start, end) to queries sent after `start`."""
    return [
        (at, answer)
        for request_id, answers in log.got.items()
        if load.sent.get(request_id, 0.0) >= start
        for at, answer in answers
        if start <= at < end
    ]


def assert_once_each(log: AnswerLog, load: Load) -> None:
    counts = log.counts(load.sent)
    assert all(n == 1 for n in counts.values()), {r: n for r, n in counts.items() if n != 1}


def _summary(log: AnswerLog, load: Load) -> str:
    counts = log.counts(load.sent)
    return (
        f"{len(counts)} queries, {sum(counts.values())} answers, "
        f"{sum(n - 1 for n in counts.values() if n > 1)} duplicates, {sum(n == 0 for n in counts.values())} lost"
    )
