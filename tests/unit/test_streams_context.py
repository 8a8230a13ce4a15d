"""The per-user context: bounded, idempotent under redelivery, and what the instruction renderer reads."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from instructrec.events import ClickEvent
from instructrec.instructions import Intention, Preference, request_instruction
from instructrec.instructions.taxonomy import Combination
from streams.state.context import DISLIKE_RATING, ContextLimits, UserContext, apply_all, review_snippet

LIMITS = ContextLimits(history=5, explicit=3, reviews=2, seen=4)


def click(item: str, kind: str = "click", *, rating=None, text=None, event_id=None, ts=1.0) -> ClickEvent:
    return ClickEvent(
        event_id=event_id or f"e-{item}-{kind}-{ts}",
        ts=ts,
        user_id="u",
        item_id=item,
        kind=kind,
        rating=rating,
        text=text,
    )


def test_history_is_bounded_most_recent_last_and_an_item_seen_again_moves_to_the_end() -> None:
    context = UserContext()
    for i in range(8):
        context.apply(click(f"i{i}", ts=float(i)), LIMITS)
    context.apply(click("i4", ts=9.0), LIMITS)
    assert context.recent(10) == ["i3", "i5", "i6", "i7", "i4"]
    assert context.consumed() == {"i3", "i4", "i5", "i6", "i7"}


def test_a_redelivered_click_changes_nothing() -> None:
    context = UserContext()
    first = click("i1", "rating", rating=5.0, text="Mind-bending", event_id="e1")
    assert context.apply(first, LIMITS)
    before = context.to_bytes()
    assert not context.apply(first, LIMITS)
    assert context.to_bytes() == before


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d", "e", "f", "g"]),
            st.sampled_from(["click", "rating", "dislike"]),
        ),
        max_size=40,
    )
)
def test_applying_a_stream_twice_equals_applying_it_once(steps) -> None:
    """At-least-once delivery: a whole batch delivered again (within the seen-ids bound) is absorbed."""
    clicks = [
        click(item, kind, rating=4.0 if kind == "rating" else None, event_id=f"e{n}", ts=float(n))
        for n, (item, kind) in enumerate(steps)
    ]
    limits = ContextLimits(history=5, explicit=3, reviews=2, seen=100)
    once, twice = UserContext(), UserContext()
    apply_all(once, clicks, limits)
    apply_all(twice, clicks, limits)
    assert apply_all(twice, clicks, limits) == 0
    assert twice.to_bytes() == once.to_bytes()
    assert len(once.history) <= 5 and len(once.ratings) <= 3 and len(once.dislikes) <= 3


def test_seen_event_ids_are_bounded() -> None:
    context = UserContext()
    for i in range(10):
        context.apply(click(f"i{i}", event_id=f"e{i}"), LIMITS)
    assert context.seen == ["e6", "e7", "e8", "e9"]


def test_explicit_preferences_are_bounded_and_deduplicated() -> None:
    context = UserContext()
    for i in range(5):
        context.apply(click(f"i{i}", "rating", rating=float(i), ts=float(i)), LIMITS)
    assert list(context.ratings) == ["i2", "i3", "i4"]
    context.apply(click("i9", text="Dark", event_id="t1"), LIMITS)
    context.apply(click("i9", text="dark ", event_id="t2"), LIMITS)
    assert context.tags == [("i9", "dark")]
    for i in range(3):
        context.apply(click("i8", "review", text=f"Review number {i}.", event_id=f"r{i}"), LIMITS)
    assert context.reviews == [("i8", "Review number 2.")]  # one review per item, the latest
    for i in range(4):
        context.apply(click(f"d{i}", "dislike", event_id=f"d{i}"), LIMITS)
    assert context.dislikes == ["d1", "d2", "d3"]


def test_wire_format_round_trips_and_garbage_reads_as_empty() -> None:
    context = UserContext()
    context.apply(click("i1", "rating", rating=4.5, text="cosy"), LIMITS)
    context.apply(click("i2", "dislike"), LIMITS)
    context.note_intention("  something   light ", 5.0)
    assert UserContext.from_bytes(context.to_bytes()) == context
    assert UserContext.from_bytes(b"not json") == UserContext()
    assert UserContext.from_bytes(b'{"h": 3}') == UserContext()
    assert UserContext.from_bytes(None) == UserContext()
    assert context.intention == "something light"


def test_interactions_carry_ratings_dislikes_and_the_users_words() -> None:
    context = UserContext()
    context.apply(click("i1", "rating", rating=5.0, text="Twisty", ts=1.0), LIMITS)
    context.apply(click("i2", "dislike", ts=2.0), LIMITS)
    context.apply(click("i3", "review", text="Loved the score. The plot less so.", ts=3.0), LIMITS)
    ids: list[str] = []
    history = context.interactions(lambda item: ids.append(item) or len(ids) - 1)
    assert ids == ["i1", "i2", "i3"]
    assert [x.rating for x in history] == [5.0, DISLIKE_RATING, None]
    assert history[0].tags == ("twisty",) and history[2].tags == ("Loved the score",)
    assert [x.timestamp for x in history] == [1, 2, 3]


def test_review_snippets_are_short() -> None:
    assert review_snippet("Short one. More text.") == "Short one"
    long = "word " * 40
    assert len(review_snippet(long)) <= 81 and review_snippet(long).endswith("…")


def test_instruction_from_context_follows_the_live_templates() -> None:
    """No text: ⟨P1 or P2, I0, T3⟩; text: ⟨P·, I1 or I2, T3⟩ (DESIGN §2)."""
    implicit = UserContext()
    for i in range(4):
        implicit.apply(click(f"i{i}", ts=float(i)), LIMITS)
    explicit = UserContext()
    explicit.apply(click("i1", "rating", rating=5.0), LIMITS)
    explicit.apply(click("i2", "rating", rating=1.0), LIMITS)

    def combination(context: UserContext, text: str | None) -> Combination:
        ids: dict[str, int] = {}
        history = context.interactions(lambda item: ids.setdefault(item, len(ids)))
        candidates = [ids.setdefault(f"c{j}", len(ids)) for j in range(5)]
        return request_instruction(history, candidates, intention=text).combination

    assert (combination(implicit, None).preference, combination(implicit, None).intention) == (
        Preference.P1,
        Intention.I0,
    )
    assert combination(explicit, None).preference is Preference.P2
    assert combination(implicit, "something light and funny").intention is Intention.I1
    assert combination(implicit, "a 1990s sci-fi thriller").intention is Intention.I2
    assert combination(UserContext(), "a 1990s sci-fi thriller").preference is Preference.P0
