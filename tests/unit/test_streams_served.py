"""The served log: request-id deduplication, bounded impressions, and clicks joined into feedback."""

from __future__ import annotations

from instructrec.events import ClickEvent
from streams.state.served import Impression, Served, feedback_for

IMPRESSION = Impression(
    request_id="r1",
    instruction="The user watched X. Rank: (a) A (b) B (c) C (d) D",
    candidates=("a", "b", "c", "d"),
    served=("c", "a", "d", "b"),
    template_id="P1-I0-T3-01",
    model_version="3",
)


def test_answered_requests_are_remembered_bounded_and_survive_the_wire() -> None:
    served = Served()
    for i in range(5):
        served.record(f"r{i}", None, answered=3, impressions=2)
    assert not served.has_answered("r1") and served.has_answered("r4")
    served.record("r4", None, answered=3, impressions=2)
    assert served.answered == ["r2", "r3", "r4"]
    again = Served.from_bytes(served.to_bytes())
    assert again == served
    assert Served.from_bytes(b"\x00garbage") == Served()


def test_impressions_are_bounded_and_found_by_request_id() -> None:
    served = Served()
    for i in range(4):
        served.record(
            f"r{i}", Impression(f"r{i}", "x", ("a", "b"), ("a",), "t", None), answered=10, impressions=2
        )
    assert [i.request_id for i in served.impressions] == ["r2", "r3"]
    assert served.impression("r3").candidates == ("a", "b")
    assert served.impression("r0") is None
    assert Served.from_bytes(served.to_bytes()).impressions == served.impressions


def click(item: str, kind: str = "click", rating: float | None = None) -> ClickEvent:
    return ClickEvent(user_id="u", item_id=item, kind=kind, rating=rating, request_id="r1")


def test_a_click_is_positive_and_the_items_served_above_it_negative() -> None:
    fb = feedback_for(click("d"), IMPRESSION)
    assert fb.positive_item_ids == ("d",) and fb.negative_item_ids == ("c", "a")
    assert fb.candidate_item_ids == IMPRESSION.candidates and fb.request_id == "r1"
    assert fb.instruction == IMPRESSION.instruction and fb.model_version == "3"
    top = feedback_for(click("c", "purchase"), IMPRESSION)
    assert top.positive_item_ids == ("c",) and top.negative_item_ids == ()


def test_dislikes_and_low_ratings_are_negative_middling_ratings_say_nothing() -> None:
    assert feedback_for(click("b", "dislike"), IMPRESSION).negative_item_ids == ("b",)
    low = feedback_for(click("a", "rating", 1.5), IMPRESSION)
    assert low.positive_item_ids == () and low.negative_item_ids == ("a",)
    assert feedback_for(click("a", "rating", 3.0), IMPRESSION) is None
    assert feedback_for(click("a", "rating", 4.5), IMPRESSION).positive_item_ids == ("a",)


def test_a_click_outside_the_candidates_gives_no_feedback() -> None:
    assert feedback_for(click("z"), IMPRESSION) is None
