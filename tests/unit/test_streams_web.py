"""The web layer's reply matching (no Kafka: answers are delivered by hand), the child-process settings, and
the try-it page's views: their pure parts, then the views themselves served by the real app's web server
(built, not started: no Kafka)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import math
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from instructrec.config import Settings, TopicNames
from instructrec.events import ClickEvent, Recommendation, encode
from instructrec.infra.worker import settings_env
from streams.metrics import (
    LATENCY_BOUNDS,
    LiveWindow,
    Metrics,
    Snapshot,
    bucket_quantile,
    counter_totals,
    cumulative_buckets,
)
from streams.state.context import UserContext
from streams.state.prequential import Prequential
from streams.web import PAGE_FILES, Replies, live_figures, parse_limit, users_with_history


def answer(request_id: str) -> bytes:
    return encode(
        Recommendation(request_id=request_id, user_id="u", items=(), model_version="1", template_id="t")
    )


async def test_a_waiting_request_gets_its_own_answer_and_ignores_others() -> None:
    replies = Replies(Settings().kafka)
    replies.ready.set()
    published = asyncio.Event()

    async def publish() -> None:
        published.set()

    waiting = asyncio.create_task(replies.wait("r1", publish, 5.0))
    await published.wait()
    replies._deliver(answer("r2"))  # someone else's
    replies._deliver(b"garbage")  # never fatal
    assert not waiting.done()
    replies._deliver(answer("r1"))
    got = await waiting
    assert got.request_id == "r1" and replies._waiting == {}


async def test_no_answer_in_time_is_a_timeout_and_leaves_nothing_behind() -> None:
    replies = Replies(Settings().kafka)
    replies.ready.set()

    async def publish() -> None:
        return None

    with pytest.raises(TimeoutError):
        await replies.wait("r1", publish, 0.05)
    assert replies._waiting == {}


async def test_waiting_requires_the_listener_to_be_positioned() -> None:
    replies = Replies(Settings().kafka)  # never started: not ready

    async def publish() -> None:
        raise AssertionError("must not publish before the listener can see the answer")

    with pytest.raises(TimeoutError):
        await replies.wait("r1", publish, 0.05)


def test_a_child_process_rebuilds_the_same_settings() -> None:
    settings = Settings()
    settings = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={
                    "broker": "kafka://10.0.0.1:9999",
                    "sasl_password": "s3cret",
                    "topics": TopicNames(items="items-x"),
                }
            ),
            "stream": settings.stream.model_copy(update={"store": "memory", "batch_size": 3}),
        }
    )
    base = {**os.environ, "INSTRUCTREC_KAFKA__BROKER": "kafka://stale:1"}  # the parent's own must not leak
    code = (
        "from instructrec.config import Settings; s = Settings(); "
        "print(s.kafka.broker, s.kafka.topics.items, s.kafka.sasl_password.get_secret_value(), "
        f"s.stream.store, s.stream.batch_size, str(s.state_dir) == {str(settings.state_dir)!r})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=settings_env(settings, base),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["kafka://10.0.0.1:9999", "items-x", "s3cret", "memory", "3", "True"]


# ------------------------------------------------------------------------------------------ the try-it page


def context_bytes(*clicks: tuple[str, float], intention: str | None = None) -> bytes:
    context = UserContext()
    for n, (item, ts) in enumerate(clicks):
        context.apply(ClickEvent(event_id=f"e{n}", user_id="u", item_id=item, kind="click", ts=ts))
    context.note_intention(intention, 1.0)
    return context.to_bytes()


def test_limit_defaults_and_bounds() -> None:
    assert parse_limit(None) == 50 and parse_limit("1") == 1 and parse_limit("500") == 500
    for raw, why in [("x", "integer"), ("2.5", "integer"), ("0", "1..500"), ("501", "1..500")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_limit(raw)


def test_users_are_those_with_a_history_most_recently_active_first() -> None:
    entries = [
        ("old", context_bytes(("i1", 10.0))),
        ("asked-only", context_bytes(intention="something funny")),  # a cold start: nothing to show
        ("recent", context_bytes(("i1", 10.0), ("i2", 30.0))),
        ("unreadable", b"\x00 not json"),
        ("tie", context_bytes(("i3", 10.0))),
    ]
    assert users_with_history(entries, 10) == [
        {"user_id": "recent", "history": 2},
        {"user_id": "old", "history": 1},
        {"user_id": "tie", "history": 1},
    ]
    assert [u["user_id"] for u in users_with_history(entries, 1)] == ["recent"]


def test_quantiles_interpolate_within_a_bucket_like_prometheus() -> None:
    bounds = (0.1, 0.2, 0.4, math.inf)
    cumulative = (10.0, 30.0, 40.0, 40.0)  # 10 below 0.1, 20 in (0.1, 0.2], 10 in (0.2, 0.4]
    assert bucket_quantile(0.25, bounds, cumulative) == pytest.approx(0.1)
    assert bucket_quantile(0.5, bounds, cumulative) == pytest.approx(0.15)  # rank 20: half-way into bucket 2
    assert bucket_quantile(0.125, bounds, cumulative) == pytest.approx(0.05)
    assert bucket_quantile(1.0, bounds, cumulative) == pytest.approx(0.4)
    assert bucket_quantile(0.5, bounds, (0.0, 0.0, 0.0, 0.0)) is None
    # beyond the last finite bound all a histogram can say is "at least that"
    assert bucket_quantile(0.99, bounds, (0.0, 0.0, 1.0, 10.0)) == pytest.approx(0.4)


def test_counters_and_buckets_are_read_per_label() -> None:
    metrics = Metrics()
    metrics.events_in.labels("clicks").inc(3)
    metrics.events_in.labels("queries").inc()
    metrics.stage_seconds.labels("total").observe(0.02)
    metrics.stage_seconds.labels("rerank").observe(5.0)
    assert counter_totals(metrics.events_in) == {"clicks": 3.0, "queries": 1.0}
    total = cumulative_buckets(metrics.stage_seconds, stage="total")
    assert len(total) == len(LATENCY_BOUNDS) and total[-1] == 1.0
    assert total[LATENCY_BOUNDS.index(0.01)] == 0.0 and total[LATENCY_BOUNDS.index(0.025)] == 1.0
    assert cumulative_buckets(metrics.recommend_seconds, outcome="ok") == (0.0,) * len(LATENCY_BOUNDS)


def test_the_live_window_reports_what_happened_since_its_oldest_snapshot() -> None:
    metrics, window = Metrics(), LiveWindow(window_s=60.0)
    metrics.events_in.labels("clicks").inc(100)  # before the window: not in its rates
    metrics.stage_seconds.labels("total").observe(9.0)
    assert window.figures(Snapshot.of(metrics, 0.0))["events_per_s"] is None  # nothing to compare with yet
    window.add(Snapshot.of(metrics, 0.0))
    metrics.events_in.labels("clicks").inc(50)
    metrics.events_in.labels("queries").inc(10)
    for seconds in (0.004, 0.004, 0.004, 0.2):
        metrics.stage_seconds.labels("total").observe(seconds)
    figures = window.figures(Snapshot.of(metrics, 10.0))
    assert figures["window_s"] == 10.0
    assert figures["events_per_s"] == {"clicks": 5.0, "queries": 1.0}
    query = figures["query_ms"]
    assert query["count"] == 4 and 2.5 < query["p50"] <= 5.0 and 150 < query["p99"] <= 250
    assert figures["recommend_ms"] is None  # nothing answered through the view in the window

    window.add(Snapshot.of(metrics, 30.0))
    window.add(Snapshot.of(metrics, 75.0))  # the snapshot at 0 s is now out of the window
    assert window.figures(Snapshot.of(metrics, 80.0))["events_per_s"] == {"clicks": 0.0, "queries": 0.0}


def test_live_figures_carry_the_served_version_and_prequential_quality_per_version() -> None:
    prequential = Prequential()
    for ndcg, hit in [(1.0, 1.0), (0.0, 0.0)]:
        prequential.record("3", ndcg, hit)
    prequential.record("4", 0.5, 1.0)
    stream = SimpleNamespace(
        metrics=Metrics(),
        prequential=prequential,
        services=SimpleNamespace(reranker=SimpleNamespace(model_version="", circuit_state="open")),
    )
    live = live_figures(stream, LiveWindow(), 1.0)
    assert live["model_version"] == "unknown" and live["circuit"] == "open"
    assert live["prequential"] == [
        {"version": "3", "ndcg10": 0.5, "hr10": 0.5, "answers": 2, "scored_total": 2},
        {"version": "4", "ndcg10": 0.5, "hr10": 1.0, "answers": 1, "scored_total": 1},
    ]


def test_the_page_is_self_contained_and_never_writes_markup() -> None:
    folder = importlib.resources.files("streams").joinpath("page")
    assert sorted(f.name for f in folder.iterdir()) == sorted(PAGE_FILES)  # all of it is served
    texts = {name: folder.joinpath(name).read_text() for name in PAGE_FILES}
    assert not [name for name, text in texts.items() if re.search(r"(https?:)?//[\w.-]+\.\w", text)]
    assert {"/page/app.js", "/page/style.css"} <= set(
        re.findall(r'(?:src|href)="([^"]+)"', texts["index.html"])
    )
    # data reaches the DOM as text only
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", texts["app.js"])


@contextlib.asynccontextmanager
async def page_client(state_dir: Path, **sections: dict) -> AsyncIterator[TestClient]:
    """The real app's web server (views, routes, headers) on a test server; its tables are never started,
    so the test writes a context straight into the table's local store. (Not a fixture: the client must
    live on the test's own event loop.) `sections`: settings sections other than the defaults."""
    from streams.app import create_app
    from streams.services import Services

    settings = Settings(_env_file=None, state_dir=state_dir, **{"stream": {"store": "memory"}, **sections})
    reranker = SimpleNamespace(model_version="7", circuit_state="closed")
    stream = create_app(settings, Services(index=None, encoder=None, reranker=reranker))
    stream.tables.context.data["u1"] = context_bytes(("i1", 5.0))
    stream.app.web.init_server()
    async with TestClient(TestServer(stream.app.web.web_app)) as client:
        yield client


async def test_the_page_views_serve_the_page_users_and_live_figures(tmp_path: Path) -> None:
    async with page_client(tmp_path) as client:
        page = await client.get("/")  # ours, not Faust's own index at "/"
        assert page.status == 200 and page.content_type == "text/html"
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert 'id="ask"' in await page.text()
        script = await client.get("/page/app.js")
        assert script.status == 200 and script.content_type == "text/javascript"
        assert (await client.get("/page/web.py")).status == 404
        users = await client.get("/users?limit=5")
        assert users.status == 200 and await users.json() == {"users": [{"user_id": "u1", "history": 1}]}
        assert (await client.get("/users?limit=many")).status == 400
        live = await (await client.get("/live")).json()
        assert live["model_version"] == "7" and live["prequential"] == [] and live["events_per_s"] is None


async def test_recommend_answers_429_to_a_user_over_the_rate(tmp_path: Path) -> None:
    limits = {"store": "memory", "user_rate_per_s": 0.01, "user_burst": 1}  # one now, the next in 100 s
    async with page_client(tmp_path, stream=limits, web={"recommend_timeout_s": 0.05}) as client:
        first = await client.post("/recommend", json={"user_id": "u1", "request_id": "a"})
        assert first.status == 504  # admitted: no broker here to answer it
        second = await client.post("/recommend", json={"user_id": "u1", "request_id": "b"})
        assert second.status == 429 and second.headers["Retry-After"] == "100"
        body = await second.json()
        assert body["request_id"] == "b" and body["error"].startswith("rate limited: user 'u1'")
        assert (await client.post("/recommend", json={"user_id": "u2"})).status == 504  # others are not
        assert (await client.post("/recommend", json={"user_id": "u1", "k": "ten"})).status == 400
