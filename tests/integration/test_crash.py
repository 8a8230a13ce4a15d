"""A stream worker SIGKILLed mid-replay and restarted: no query lost, none answered twice, and every user
context equal to a recomputation from the clicks topic.

What makes the group move on after a SIGKILL on noida-db: the restarted worker, but only as a *static* member
(Kafka's group.instance.id, `StreamSettings.instance_id`). noida-db never expires a dead member's session, and
a restarted worker that joins with a new (dynamic) member id does not replace it either: the rebalance it
starts waits out its timeout, the dead member stays in the group as its leader, and the newcomer's SyncGroup
waits for an assignment that no one sends, rebalance after rebalance, for ever. A shorter rebalance timeout
only turns that loop faster (3 s: still no partition 80 s later). With the killed worker's instance id the
restarted one takes its place at once: noida-db answers its JoinGroup in the same generation, with it as the
leader, within a second. `test_only_a_restarted_member_with_the_same_instance_id_takes_over` measures both with
bare aiokafka consumers.

What a real Kafka does instead: a member that stops heartbeating is removed after session.timeout.ms (Faust's
broker_session_timeout, 60 s by default) and the group rebalances, so survivors or a restarted dynamic
worker take the partitions then. A static member is not removed when it stops: a restart with the same
group.instance.id within the session timeout takes its place and assignment without any rebalance; after it
the member is removed and the group rebalances as for a dynamic one.

The reranker model is not loaded here (answers come degraded, in retrieval order), as in
test_stream_failover.py: delivery does not depend on it, and it keeps the test cheap on two busy cores.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from instructrec.config import KafkaSettings, Settings
from instructrec.events import ClickEvent, Event, QueryEvent, Recommendation, decode
from instructrec.infra import WorkerProcess, free_port
from streams.kafka.producer import EventProducer
from streams.kafka.reader import TopicReader
from streams.state.context import ContextLimits, UserContext
from tests.integration.pipeline import TIMEOUT_S, http
from tests.integration.test_stream_failover import build_catalog, without_reranker
from workers.replay import Answers, ReplayConfig, replay_events, send_live

pytestmark = pytest.mark.integration

USERS = 6
PER_USER = 25  # clicks per user; a query before every QUERY_EVERY-th one (from the 5th on): 4 per user
QUERY_EVERY = 5
RATE = 10.0  # events per second, as scheduled (a click on an unanswered list waits for its answer)
OUTAGE_S = 3.0  # between the kill and the restart: events keep arriving while no worker runs
REPLAYS_S = 240.0  # the whole replay, outage included, on a busy machine


# ------------------------------------------------------------------------------------------- the worker


async def test_a_worker_killed_mid_replay_and_restarted_loses_and_repeats_nothing(
    local_infra, kafka, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("crash")
    dataset, settings = without_reranker(local_infra, root)
    settings.stream.instance_id = "worker-0"  # the identity the restarted worker takes back
    config = ReplayConfig(users=USERS, max_per_user=PER_USER, query_every=QUERY_EVERY, text_rate=0.0, k=5)
    events = replay_events(dataset, config)
    build_catalog(settings, dataset, {e.item_id for e in events if isinstance(e, ClickEvent)})
    queries = {e.request_id for e in events if isinstance(e, QueryEvent)}

    first = WorkerProcess(settings, web_port=free_port(), log=root / "first.log").start()
    restarted = WorkerProcess(settings, web_port=free_port(), log=root / "restarted.log")
    try:
        first.wait_healthy(TIMEOUT_S)
        async with AnswerLog(settings) as log:
            sent: list[Event] = []
            replay = asyncio.create_task(_replay(settings, events, log.answers, sent.append))
            await until(lambda: len(sent) >= len(events) // 3, TIMEOUT_S)
            first.stop(signal.SIGKILL)  # mid-replay: in-flight queries, uncommitted offsets, unflushed tables
            killed_at = time.time()
            await asyncio.sleep(OUTAGE_S)
            restarted.start()
            await asyncio.to_thread(restarted.wait_healthy, TIMEOUT_S)
            healthy_s = time.time() - killed_at
            try:
                async with asyncio.timeout(REPLAYS_S):
                    late_clicks = await replay
                await log.wait_for(queries)
            except TimeoutError:
                pytest.fail(await _stalled(settings, restarted, queries - log.got.keys()))
            await asyncio.sleep(5.0)  # time for any duplicate to show up
        expected = await contexts_from_clicks(settings)
        got = await _contexts_once_settled(restarted, expected)
        skipped = _redeliveries(restarted)
    finally:
        restarted.stop()
        first.stop()

    counts = log.counts(queries)
    after_restart = [t for answers in log.got.values() for t, _ in answers if t > killed_at + OUTAGE_S]
    print(
        f"\ncrash: {len(queries)} queries, {sum(counts.values())} answers, "
        f"{sum(n - 1 for n in counts.values() if n > 1)} duplicates, {sum(n == 0 for n in counts.values())} "
        f"lost; killed after {len(events) // 3} of {len(events)} events; restarted worker healthy "
        f"{healthy_s:.1f} s and answering {min(after_restart) - killed_at:.1f} s after the kill; redeliveries "
        f"skipped {skipped}; clicks sent without their answer {late_clicks}; {len(expected)} user contexts "
        "compared"
    )
    assert all(n == 1 for n in counts.values()), {r: n for r, n in counts.items() if n != 1}
    assert got == expected


class AnswerLog:
    """Reads the recommendations topic in the background: every answer per request id (so a duplicate shows)
    with the time the worker produced it (the record's timestamp, which a reader that falls behind does not
    shift), and `answers` for `send_live`, which holds a click back until its list is in."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.answers = Answers()
        self.got: dict[str, list[tuple[float, Recommendation]]] = {}

    async def __aenter__(self) -> AnswerLog:
        self._reader = TopicReader(self.settings.kafka, self.settings.kafka.topics.recommendations)
        await self._reader.__aenter__()
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for record in self._reader:
            answer = decode(Recommendation, record.value)
            self.got.setdefault(answer.request_id, []).append((record.timestamp / 1000, answer))
            self.answers.add(answer.request_id)

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._reader.__aexit__(*exc)

    async def wait_for(self, request_ids: set[str], timeout_s: float = TIMEOUT_S) -> None:
        await until(lambda: request_ids <= self.got.keys(), timeout_s)

    def counts(self, request_ids) -> dict[str, int]:
        """How many answers each request got (1 each: none lost, none repeated)."""
        return {request_id: len(self.got.get(request_id, ())) for request_id in request_ids}


async def _replay(settings: Settings, events: list[Event], answers: Answers, on_sent) -> int:
    async with EventProducer(settings.kafka) as producer:
        return await send_live(
            producer, events, rate=RATE, answers=answers, answer_timeout_s=TIMEOUT_S, on_sent=on_sent
        )


async def until(done, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not done():
            await asyncio.sleep(0.1)


async def contexts_from_clicks(settings: Settings) -> dict[str, dict]:
    """Every user's context folded from the whole clicks topic with the clicks agent's own rule
    (`UserContext.apply`; a user's clicks share a partition, so they come in the order the agent saw them)."""
    limits = ContextLimits.from_settings(settings.stream)
    contexts: dict[str, UserContext] = {}
    async with TopicReader(settings.kafka, settings.kafka.topics.clicks, from_beginning=True) as reader:
        async for record in reader.records(idle_timeout_s=3.0):
            click = decode(ClickEvent, record.value)
            contexts.setdefault(click.user_id, UserContext()).apply(click, limits)
    # as GET /users/{id}/context shows it (JSON)
    return {
        user: json.loads(json.dumps({"user_id": user, **context.describe()}))
        for user, context in contexts.items()
    }


async def _contexts_once_settled(worker: WorkerProcess, expected: dict[str, dict]) -> dict[str, dict]:
    """The worker's view of each user's context (GET /users/{id}/context), once it equals `expected` or
    TIMEOUT_S has passed: the last clicks may still be on their way when the last query is answered."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        got = {user: http("GET", worker.url(f"/users/{user}/context"))[1] for user in expected}
        if got == expected or time.monotonic() > deadline:
            return got
        await asyncio.sleep(1.0)


async def _stalled(settings: Settings, worker: WorkerProcess, unanswered: set[str]) -> str:
    """Which of the ways a query can go unanswered it was, for CI's log: where each unanswered query sits
    against the group's committed offsets (below them: committed without an answer), whether an answer is
    on the topic after all (the test's reader missed it), the redeliveries the restarted worker skipped as
    answered (its served log holds an answer that never reached the topic), its /health (queries in
    flight), and the frames of this project's code in its asyncio tasks (mode dumps them on SIGUSR1)."""
    health = worker.health()
    skipped = _redeliveries(worker) if worker.running() else "?"
    log_size = worker.log.stat().st_size
    if worker.running():
        worker.process.send_signal(signal.SIGUSR1)
    # Each read below idles 3 s at its end: time enough for the worker's loop to write the dump.
    topics = settings.kafka.topics
    at = await _offsets_of(settings, topics.queries, QueryEvent, unanswered)
    answered = await _offsets_of(settings, topics.recommendations, Recommendation, unanswered)
    admin = AIOKafkaAdminClient(**settings.kafka.aiokafka_kwargs())
    await admin.start()
    try:
        committed = {
            tp.partition: meta.offset
            for tp, meta in (await admin.list_consumer_group_offsets(settings.stream.app_id)).items()
            if tp.topic == settings.kafka.topics.queries
        }
    finally:
        await admin.close()
    place = {
        request_id: f"{partition}@{offset} (committed {committed.get(partition)})"
        for request_id, (partition, offset) in at.items()
    }
    with worker.log.open("rb") as log:
        log.seek(log_size)
        dump = log.read().decode(errors="replace").splitlines()
    frames = sorted(
        {
            line.strip()
            for line in dump
            if line.strip().startswith('File "') and ("/streams/" in line or "/instructrec/" in line)
        }
    )
    return (
        f"{len(unanswered)} queries unanswered after the restart: {place}; answered on the topic after all: "
        f"{sorted(answered)}; redeliveries skipped {skipped}; the restarted worker's /health: {health}; "
        f"this project's frames in its tasks: {frames}; its whole log: {worker.log}"
    )


async def _offsets_of(settings: Settings, topic: str, kind, request_ids: set[str]) -> dict[str, tuple]:
    """(partition, offset) of each record of `topic` (decoded as `kind`) that names one of `request_ids`."""
    found = {}
    async with TopicReader(settings.kafka, topic, from_beginning=True) as reader:
        async for record in reader.records(idle_timeout_s=3.0):
            event = decode(kind, record.value)
            if event.request_id in request_ids:
                found[event.request_id] = (record.partition, record.offset)
    return found


def _redeliveries(worker: WorkerProcess) -> dict[str, float]:
    """Events the restarted worker skipped as already applied or answered (instructrec_duplicates_total)."""
    with urllib.request.urlopen(worker.url("/metrics"), timeout=10) as response:
        lines = response.read().decode().splitlines()
    prefix = "instructrec_duplicates_total{topic="
    return {
        line[len(prefix) + 1 : line.index('"}')]: float(line.split()[-1])
        for line in lines
        if line.startswith(prefix)
    }


# ------------------------------------------------------------------------------------------- the broker

# A bare group member in a process of its own (so that it can be SIGKILLed): prints each assignment it gets.
MEMBER = """
import asyncio, json, sys
from aiokafka import AIOKafkaConsumer
from aiokafka.abc import ConsumerRebalanceListener
from streams.kafka.compat import pause_after_empty_fetch

broker, topic, group, instance = sys.argv[1:]


class Report(ConsumerRebalanceListener):
    def on_partitions_revoked(self, revoked):
        pass

    def on_partitions_assigned(self, assigned):
        print(json.dumps(sorted(tp.partition for tp in assigned)), flush=True)


async def main():
    pause_after_empty_fetch(0.005)  # noida-db answers empty fetches at once: do not spin a core
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker, group_id=group, group_instance_id=instance or None,
        session_timeout_ms=6000, rebalance_timeout_ms=3000, heartbeat_interval_ms=1000,
    )
    consumer.subscribe([topic], listener=Report())
    await consumer.start()
    await asyncio.Event().wait()


asyncio.run(main())
"""
PARTITIONS = 4
DYNAMIC_WAIT_S = 15.0  # five rebalance timeouts
STATIC_WAIT_S = 10.0


async def test_only_a_restarted_member_with_the_same_instance_id_takes_over(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """A member SIGKILLed and restarted: with a new member id (dynamic) the newcomer gets nothing, however many
    rebalance timeouts pass; with the dead member's instance id (static) it gets every partition at once."""
    topic = f"crash-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(**kafka_settings.aiokafka_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()

    dynamic = await _restart_after_kill(kafka_settings, topic, "", tmp_path / "dynamic", DYNAMIC_WAIT_S)
    static = await _restart_after_kill(kafka_settings, topic, "member-0", tmp_path / "static", STATIC_WAIT_S)
    print(
        f"\nrestart after SIGKILL on noida-db: dynamic member {_told(dynamic, DYNAMIC_WAIT_S)}; "
        f"static member {_told(static, STATIC_WAIT_S)}"
    )
    assert dynamic is None
    assert static is not None


async def _restart_after_kill(
    kafka: KafkaSettings, topic: str, instance: str, folder: Path, wait_s: float
) -> float | None:
    """Seconds until the restarted member holds every partition, or None if it does not within `wait_s`."""
    folder.mkdir()
    group = f"{folder.name}-{uuid.uuid4().hex[:8]}"
    killed = _member(kafka, topic, group, instance, folder / "killed.log")
    try:
        await _assigned(folder / "killed.log", TIMEOUT_S)
    finally:
        killed.kill()
        killed.wait()
    started = time.monotonic()
    restarted = _member(kafka, topic, group, instance, folder / "restarted.log")
    try:
        took_over = await _assigned(folder / "restarted.log", wait_s)
        return time.monotonic() - started if took_over else None
    finally:
        restarted.kill()
        restarted.wait()


def _member(kafka: KafkaSettings, topic: str, group: str, instance: str, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-c", MEMBER, kafka.bootstrap_servers, topic, group, instance]
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])


async def _assigned(log: Path, wait_s: float) -> bool:
    """Whether the member's latest assignment is every partition within `wait_s`."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if line.startswith("[")]
        if lines and json.loads(lines[-1]) == list(range(PARTITIONS)):
            return True
        await asyncio.sleep(0.2)
    return False


def _told(seconds: float | None, waited_s: float) -> str:
    return (
        f"held nothing after {waited_s:.0f} s"
        if seconds is None
        else f"held every partition in {seconds:.1f} s"
    )
