"""Batch job: a dataset's interactions as click and query events, in time order.

Every rating becomes a `ClickEvent` (kind "rating", the user's first tag on the item as its text). Before
every `query_every`-th interaction of a user (once the user has `min_history` items) a `QueryEvent` asks for
recommendations, and the interaction that follows names that query's request id — as a click on a served
list would, so the clicks agent can join it into feedback. A share `text_rate` of queries carries an
intention synthesised from the item the user goes on to choose (the training synthesis, no title leaked).

Ids are derived from the dataset, user and position, so a replay sent twice is absorbed by the stream's
idempotency (seen event ids, answered request ids). `speed` compresses time: the pause between two events is
their timestamp gap divided by `speed` (capped by `max_gap_s`); 0 sends as fast as the broker takes them.
`replay` does not wait for answers, so a click can reach the stream before the list it names was answered
(and then joins no impression: no feedback, no prequential score). `send_live` — the loop benchmark's and the
demo's sender — holds such a click back until its answer was read back, as a person would.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from instructrec.config import KafkaSettings
from instructrec.data.dataset import Dataset
from instructrec.data.filtering import k_core
from instructrec.events import ClickEvent, Event, QueryEvent
from instructrec.instructions import specific_intention, vague_intention
from instructrec.instructions.render import rng_for
from streams.kafka.producer import EventProducer

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "instructrec/replay")


@dataclass(frozen=True)
class ReplayConfig:
    users: int | None = None  # the first N users (in the dataset's user order); None: all
    max_per_user: int | None = None  # each user's first M interactions; None: all
    query_every: int = 10  # 0: no queries
    min_history: int = 5
    text_rate: float = 0.5
    k: int = 10
    seed: int = 0


def _id(*parts: object) -> str:
    return uuid.uuid5(_NAMESPACE, "/".join(map(str, parts))).hex


def replay_events(dataset: Dataset, config: ReplayConfig = ReplayConfig()) -> list[Event]:
    """Every user's interactions (and queries) merged into one time-ordered list."""
    users = range(dataset.n_users if config.users is None else min(config.users, dataset.n_users))
    per_user: list[list[tuple[float, int, int, Event]]] = []
    for u in users:
        user_id = dataset.users[u]
        history = dataset.histories[u][: config.max_per_user] if config.max_per_user else dataset.histories[u]
        stream: list[tuple[float, int, int, Event]] = []
        for position, x in enumerate(history):
            item = dataset.items[x.item]
            request_id = None
            if config.query_every and position >= config.min_history and position % config.query_every == 0:
                request_id = _id(dataset.name, user_id, position, "query")
                text = _intention(dataset, x.item, config, user_id, position)
                query = QueryEvent(
                    event_id=_id(dataset.name, user_id, position, "query-event"),
                    ts=float(x.timestamp),
                    request_id=request_id,
                    user_id=user_id,
                    text=text,
                    k=config.k,
                )
                stream.append((float(x.timestamp), u, 2 * position, query))
            click = ClickEvent(
                event_id=_id(dataset.name, user_id, position, "click"),
                ts=float(x.timestamp),
                user_id=user_id,
                item_id=item.id,
                kind="rating" if x.rating is not None else "click",
                rating=x.rating,
                text=x.tags[0] if x.tags else None,
                request_id=request_id,
            )
            stream.append((float(x.timestamp), u, 2 * position + 1, click))
        per_user.append(stream)
    # Each user's list is already in time order: merge them (ties: user, then position; query before click).
    return [event for *_, event in heapq.merge(*per_user, key=lambda entry: entry[:3])]


def time_split(dataset: Dataset, share: float, users: int | None = None) -> tuple[Dataset, float]:
    """The first `users` users' interactions up to the `share` quantile of all their timestamps (5-core: what a
    pipeline trained then could have learned), and that time. A model trained on it has seen nothing later,
    so the rest of the replay is news to it (`benchmarks/loop.py`, the demo)."""
    keep = range(dataset.n_users if users is None else min(users, dataset.n_users))
    stamps = np.array([x.timestamp for u in keep for x in dataset.histories[u]], dtype=np.float64)
    cut = float(np.quantile(stamps, share))
    early = Dataset(
        dataset.name,
        dataset.items,
        [dataset.users[u] for u in keep],
        [[x for x in dataset.histories[u] if x.timestamp <= cut] for u in keep],
        nouns=dataset.nouns,
    )
    return k_core(early, 5), cut


def split_at(events: Sequence[Event], cut: float) -> tuple[list[ClickEvent], list[Event]]:
    """The clicks up to `cut` (the past a stream starting then would be told, to build contexts and
    histories; their queries were answered by no one) and every event after it."""
    before = [e for e in events if e.ts <= cut and isinstance(e, ClickEvent)]
    return before, [e for e in events if e.ts > cut]


def _intention(dataset: Dataset, item: int, config: ReplayConfig, user_id: str, position: int) -> str | None:
    rng = rng_for(config.seed, f"replay:{user_id}:{position}")
    if rng.random() >= config.text_rate:
        return None
    write = vague_intention if rng.random() < 0.5 else specific_intention
    # Held-out phrasings: replayed users word their needs in ways training never rendered.
    wish = write(dataset.items[item], random.Random(rng.getrandbits(64)), pool="heldout", nouns=dataset.nouns)
    return wish.text if wish else None


async def replay(
    kafka: KafkaSettings,
    events: Sequence[Event],
    *,
    speed: float = 0.0,
    max_gap_s: float = 1.0,
    progress: bool = True,
) -> int:
    """Send events in order, pacing them by `speed` (0: no pacing); returns how many were sent."""
    columns = (
        TextColumn("replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    async with EventProducer(kafka) as producer:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("events", total=len(events))
            previous: float | None = None
            for event in events:
                if speed > 0 and previous is not None:
                    pause = min(max(0.0, (event.ts - previous) / speed), max_gap_s)
                    if pause > 0:
                        await asyncio.sleep(pause)
                previous = event.ts
                await producer.send(event)
                bar.advance(task)
    return len(events)


# ------------------------------------------------------------------------------ live, as users would act


class Answers:
    """The request ids whose recommendation has been read back (the caller's reader reports each one)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._waiting: dict[str, asyncio.Event] = {}

    def add(self, request_id: str) -> None:
        self._seen.add(request_id)
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None:
            waiting.set()

    async def wait(self, request_id: str, timeout_s: float) -> bool:
        """True once the answer is in; False after `timeout_s` (the click goes out anyway)."""
        if request_id in self._seen:
            return True
        event = self._waiting.setdefault(request_id, asyncio.Event())
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
            return True
        except TimeoutError:
            self._waiting.pop(request_id, None)
            return False


async def send_live(
    producer: EventProducer,
    events: Sequence[Event],
    *,
    rate: float,
    answers: Answers,
    answer_timeout_s: float = 10.0,
    on_sent: Callable[[Event], None] | None = None,
) -> int:
    """Send `events` at `rate` per second, in order per user, as people act: a click on a served list (one
    that names its request id) goes out only once that list was answered — a user cannot click what they
    were not shown yet — and the user's later events wait behind it. Other users are not held up. Returns
    how many clicks went out without their answer (after `answer_timeout_s`)."""
    queues: dict[str, asyncio.Queue] = {}
    unanswered = 0

    async def user(queue: asyncio.Queue) -> None:
        nonlocal unanswered
        while True:
            event = await queue.get()
            try:
                if isinstance(event, ClickEvent) and event.request_id:
                    unanswered += not await answers.wait(event.request_id, answer_timeout_s)
                await producer.send(event)
                if on_sent is not None:
                    on_sent(event)
            finally:
                queue.task_done()

    tasks = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        for n, event in enumerate(events):
            wait = start + n / rate - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            key = event.key
            if key not in queues:
                queues[key] = asyncio.Queue()
                tasks.append(asyncio.create_task(user(queues[key])))
            queues[key].put_nowait(event)
        for queue in queues.values():
            await queue.join()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return unanswered
