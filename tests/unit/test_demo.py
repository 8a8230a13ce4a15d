"""The demo's pure parts: its presets and its dashboard's state (the run itself: tests/integration/test_demo.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from rich.console import Console

from instructrec.events import ModelUpdate, QueryEvent, RankedItem, Recommendation
from instructrec.infra.demo import FULL, QUICK
from instructrec.infra.demo.dashboard import Dashboard


def test_presets_name_their_model_by_what_it_is_trained_with() -> None:
    assert FULL.model_key() != QUICK.model_key()
    assert replace(FULL, rate=99.0, requests=("x",)).model_key() == FULL.model_key()  # live knobs: same model
    assert replace(FULL, reranker_minutes=3.0).model_key() != FULL.model_key()
    assert QUICK.encoder_layers < FULL.encoder_layers and QUICK.live_seconds < FULL.live_seconds


def answer(request_id: str, *, degraded: bool = False, version: str = "1") -> Recommendation:
    items = (
        RankedItem(item_id="1", title="Toy Story (1995)", score=1.0, reasons=("matches: animation",)),
        RankedItem(item_id="2", title="Heat (1995)", score=0.5),
    )
    return Recommendation(
        request_id=request_id,
        user_id="u1",
        items=() if degraded else items,
        model_version=version,
        template_id="P1-I1-T3-01",
        degraded=degraded,
        reason="the reranker is unavailable" if degraded else None,
        instruction=None
        if degraded
        else 'User taste: ... Request: "an animated movie". Rank these candidates',
    )


def test_the_dashboard_measures_round_trips_of_its_own_queries_only() -> None:
    board = Dashboard(started=0.0)
    board.on_sent(QueryEvent(request_id="a", user_id="u1", text="an animated movie"), 1.0)
    board.on_sent(QueryEvent(request_id="b", user_id="u2"), 2.0)
    assert board.unanswered == 2 and board.sent == 2
    board.on_answer(answer("a"), 1.05)
    board.on_answer(answer("zzz"), 1.1)  # a POST /recommend answer: not this replay's
    board.on_answer(answer("b", degraded=True), 2.2)
    assert (board.answered, board.degraded, board.unanswered) == (2, 1, 0)
    p50, p99 = board.latency()
    assert 50 <= p50 <= 200 and 150 < p99 <= 200
    assert [r.query.request_id for r in board.recent] == ["a"]  # text requests are the ones worth showing
    assert board.rate(10.0) == 2 / 10.0


def test_latency_and_rate_forget_what_is_older_than_a_minute() -> None:
    board = Dashboard(started=0.0)
    board.on_sent(QueryEvent(request_id="a", user_id="u1"), 1.0)
    board.on_answer(answer("a"), 1.5)
    board.on_sent(QueryEvent(request_id="b", user_id="u1"), 100.0)
    board.on_answer(answer("b"), 100.01)
    assert board.latency() == pytest.approx((10.0, 10.0))
    assert board.rate(100.0) == 1 / 60


def test_the_dashboard_renders_what_it_was_told() -> None:
    board = Dashboard(started=0.0, phase="live")
    board.on_sent(QueryEvent(request_id="a", user_id="u1", text="an animated movie"), 1.0)
    board.on_answer(answer("a", version="2"), 1.08)
    board.on_update(
        ModelUpdate(
            version="2",
            accepted=True,
            incumbent="1",
            metrics={
                "candidate_ndcg@10": 0.31,
                "incumbent_ndcg@10": 0.29,
                "judged": 120.0,
                "examples": 400.0,
            },
        )
    )
    board.on_update(ModelUpdate(version="2", accepted=True, kind="prequential", metrics={"ndcg@10": 0.3}))
    board.on_update(ModelUpdate(version="candidate-3", accepted=False, reason="NDCG@10 gain -0.01 is below"))
    board.live = {
        "model_version": "2",
        "circuit": "closed",
        "events_per_s": {"clicks": 31.0, "queries": 6.0},
        "prequential": [{"version": "1", "ndcg10": 0.21, "hr10": 0.4, "answers": 80}],
    }
    board.store = {"examples": 1234, "running": True}
    console = Console(width=160, record=True)
    console.print(board.render(30.0))
    text = console.export_text()
    for shown in (
        "00:30",
        "live",
        "an animated movie",
        "Toy Story (1995)",
        "matches: animation",
        "version 2",
        "clicks 31",
        "0.2100",
        "accepted, now serving (over v1)",
        "0.2900 → 0.3100",
        "rejected: NDCG@10 gain -0.01",
        "1,234 examples stored · a cycle is training",
    ):
        assert shown in text, shown
    assert len(board.verdicts) == 2  # prequential updates are figures, not verdicts
    assert "v1 NDCG@10 0.210 (80)" in board.line(30.0)
