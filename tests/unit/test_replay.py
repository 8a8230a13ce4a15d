"""The replay's events: what `instructrec replay`, the stream benchmark and the loop benchmark send."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from instructrec.data import load
from instructrec.events import ClickEvent, QueryEvent, decode, encode
from workers.replay import Answers, ReplayConfig, replay_events, send_live, split_at, time_split

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def dataset():
    if not (DATA / "ml-latest-small").is_dir():
        pytest.fail(f"the shared data is missing at {DATA}")
    return load("ml-latest-small", root=DATA)


def test_replayed_events_are_valid_in_time_order_and_queries_precede_their_click(dataset) -> None:
    config = ReplayConfig(users=40, query_every=4, min_history=3, text_rate=0.7, seed=1)
    events = replay_events(dataset, config)
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    for event in events:  # every one survives the wire as the stream decodes it
        assert decode(type(event), encode(event)) == event
    queries = {e.request_id: e for e in events if isinstance(e, QueryEvent)}
    texts = [q.text for q in queries.values() if q.text is not None]
    assert queries and texts and all(isinstance(t, str) and t.strip() for t in texts)
    assert len(texts) < len(queries)  # text_rate below 1: some queries are preference-only
    clicks = [e for e in events if isinstance(e, ClickEvent)]
    assert len(clicks) == sum(len(dataset.histories[u]) for u in range(40))
    position = {id(e): n for n, e in enumerate(events)}
    answered = [c for c in clicks if c.request_id is not None]
    assert {c.request_id for c in answered} == set(queries)
    for click in answered:
        query = queries[click.request_id]
        assert query.user_id == click.user_id and position[id(query)] < position[id(click)]


def test_replay_is_deterministic_per_seed(dataset) -> None:
    config = ReplayConfig(users=10, query_every=3, min_history=2, text_rate=1.0, seed=3)
    assert replay_events(dataset, config) == replay_events(dataset, config)
    other = replay_events(
        dataset, ReplayConfig(users=10, query_every=3, min_history=2, text_rate=1.0, seed=4)
    )
    assert [e.text for e in other if isinstance(e, QueryEvent)] != [
        e.text for e in replay_events(dataset, config) if isinstance(e, QueryEvent)
    ]


def test_the_time_split_keeps_nothing_after_the_cut_and_the_rest_replays_after_it(dataset) -> None:
    early, cut = time_split(dataset, 0.7, users=100)
    stamps = [x.timestamp for h in early.histories for x in h]
    assert stamps and max(stamps) <= cut
    assert min(len(h) for h in early.histories) >= 5  # 5-core, as offline training filters
    events = replay_events(dataset, ReplayConfig(users=100, query_every=5, min_history=3))
    before, after = split_at(events, cut)
    assert all(isinstance(e, ClickEvent) and e.ts <= cut for e in before)
    assert after and all(e.ts > cut for e in after)
    later = sum(x.timestamp > cut for u in range(100) for x in dataset.histories[u])
    assert sum(isinstance(e, ClickEvent) for e in after) == later
    assert 0.2 < later / (later + len(before)) < 0.4  # about the last 30% of the interactions


class Sent:
    """Stands in for the producer: the sender's logic is what is tested here (the real one: the demo's and
    the loop benchmark's runs, and tests/integration)."""

    def __init__(self) -> None:
        self.events: list = []

    async def send(self, event) -> None:
        self.events.append(event)


async def test_a_click_on_a_list_waits_for_its_answer_and_holds_back_only_its_user() -> None:
    q = QueryEvent(request_id="r1", user_id="a", ts=1.0)
    click = ClickEvent(user_id="a", item_id="9", kind="click", request_id="r1", ts=1.0)
    later = ClickEvent(user_id="a", item_id="8", kind="click", ts=2.0)
    other = ClickEvent(user_id="b", item_id="7", kind="click", ts=1.5)
    producer, answers = Sent(), Answers()
    sending = asyncio.create_task(send_live(producer, [q, click, other, later], rate=1000.0, answers=answers))
    await asyncio.sleep(0.1)
    assert producer.events == [q, other]  # user a waits for r1's answer; user b does not
    answers.add("r1")
    assert await sending == 0
    assert producer.events == [q, other, click, later]


async def test_a_click_whose_answer_never_comes_goes_out_after_the_timeout() -> None:
    click = ClickEvent(user_id="a", item_id="9", kind="click", request_id="lost", ts=1.0)
    producer = Sent()
    assert await send_live(producer, [click], rate=1000.0, answers=Answers(), answer_timeout_s=0.05) == 1
    assert producer.events == [click]
