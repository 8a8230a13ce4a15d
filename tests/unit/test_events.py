"""Event schemas: round trips, and every kind of bad input ends as one EventError naming the field."""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instructrec.config import TopicNames
from instructrec.events import (
    MAX_ERROR_CHARS,
    MAX_ID_CHARS,
    MAX_INSTRUCTION_CHARS,
    MAX_ITEM_TEXT_CHARS,
    MAX_QUERY_TEXT_CHARS,
    MAX_RAW_BYTES,
    MAX_REASON_CHARS,
    MAX_REVIEW_CHARS,
    MAX_TITLE_CHARS,
    SCHEMAS,
    ClickEvent,
    DeadLetter,
    Event,
    EventError,
    FeedbackEvent,
    ItemEvent,
    ModelUpdate,
    QueryEvent,
    QueryFilters,
    RankedItem,
    Recommendation,
    dead_letter,
    decode,
    encode,
    validate,
)

# Two cores: a few dozen examples per property keep the file well under the time budget.
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ----------------------------------------------------------------------------------------

ID_FORBIDDEN = ("Cc", "Cf", "Cs", "Zl", "Zp")
ids = st.one_of(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_:.", min_size=1, max_size=24),
    st.text(st.characters(blacklist_categories=ID_FORBIDDEN), min_size=1, max_size=MAX_ID_CHARS)
    .map(str.strip)
    .filter(bool),
)
TEXT_CHARS = st.characters(
    blacklist_categories=("Cs",),
    blacklist_characters=[
        chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]
    ],
)


def texts(max_size: int = 60, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(TEXT_CHARS, min_size=min_size, max_size=max_size)


non_blank = texts(min_size=1).filter(str.strip)
finite = st.floats(allow_nan=False, allow_infinity=False)
timestamps = st.floats(min_value=0, max_value=1e11, exclude_max=True)
attr_values = st.one_of(texts(30), st.integers(-(2**63), 2**63 - 1), finite, st.booleans())
unique_ids = st.lists(ids, max_size=8, unique=True).map(tuple)

items = st.builds(
    ItemEvent,
    event_id=ids,
    ts=timestamps,
    item_id=ids,
    title=non_blank,
    text=texts(),
    categories=unique_ids,
    attributes=st.dictionaries(ids, attr_values, max_size=6),
)


@st.composite
def clicks(draw: st.DrawFn) -> ClickEvent:
    kind = draw(st.sampled_from(["click", "purchase", "rating", "review", "dislike"]))
    rating = draw(st.floats(0, 5)) if kind == "rating" else None
    if kind == "review":
        rating = draw(st.none() | st.floats(0, 5))
    text = draw(non_blank) if kind == "review" else draw(st.none() | texts())
    return ClickEvent(
        event_id=draw(ids),
        ts=draw(timestamps),
        user_id=draw(ids),
        item_id=draw(ids),
        kind=kind,
        rating=rating,
        text=text,
        request_id=draw(st.none() | ids),
    )


@st.composite
def filters(draw: st.DrawFn) -> QueryFilters:
    cats = draw(st.lists(ids, max_size=6, unique=True))
    split = draw(st.integers(0, len(cats)))
    years = sorted(draw(st.lists(st.integers(0, 9999), min_size=2, max_size=2)))
    return QueryFilters(
        categories=cats[:split],
        exclude_categories=cats[split:],
        exclude_item_ids=draw(unique_ids),
        year_min=draw(st.none() | st.just(years[0])),
        year_max=draw(st.none() | st.just(years[1])),
        exclude_seen=draw(st.booleans()),
    )


queries = st.builds(
    QueryEvent,
    event_id=ids,
    ts=timestamps,
    request_id=ids,
    user_id=ids,
    text=st.none() | non_blank,
    k=st.integers(1, 100),
    filters=filters(),
)


@st.composite
def recommendations(draw: st.DrawFn) -> Recommendation:
    item_ids = draw(st.lists(ids, max_size=20, unique=True))
    degraded = draw(st.booleans())
    return Recommendation(
        event_id=draw(ids),
        ts=draw(timestamps),
        request_id=draw(ids),
        user_id=draw(ids),
        items=[RankedItem(item_id=i, title=draw(texts()), score=draw(finite)) for i in item_ids],
        model_version=draw(ids),
        template_id=draw(ids),
        degraded=degraded,
        reason=draw(non_blank) if degraded else draw(st.none() | texts()),
        timings=draw(st.dictionaries(ids, st.floats(0, 1e7), max_size=5)),
    )


@st.composite
def feedback(draw: st.DrawFn) -> FeedbackEvent:
    candidates = draw(st.lists(ids, min_size=1, max_size=20, unique=True))
    labels = draw(st.lists(st.sampled_from("+-0"), min_size=len(candidates), max_size=len(candidates)))
    if set(labels) == {"0"}:
        labels[0] = "+"
    return FeedbackEvent(
        event_id=draw(ids),
        ts=draw(timestamps),
        user_id=draw(ids),
        request_id=draw(ids),
        instruction=draw(texts(200, min_size=1)),
        candidate_item_ids=candidates,
        positive_item_ids=[c for c, lab in zip(candidates, labels, strict=True) if lab == "+"],
        negative_item_ids=[c for c, lab in zip(candidates, labels, strict=True) if lab == "-"],
        template_id=draw(ids),
        model_version=draw(st.none() | ids),
    )


@st.composite
def model_updates(draw: st.DrawFn) -> ModelUpdate:
    accepted = draw(st.booleans())
    return ModelUpdate(
        event_id=draw(ids),
        ts=draw(timestamps),
        version=draw(ids),
        metrics=draw(st.dictionaries(ids, finite, max_size=8)),
        accepted=accepted,
        reason=draw(st.none() | non_blank) if accepted else draw(non_blank),
    )


@st.composite
def dead_letters(draw: st.DrawFn) -> DeadLetter:
    letter = dead_letter(
        topic=draw(st.text("abcdefghijklmnopqrstuvwxyz-._0123456789", min_size=1, max_size=40)),
        partition=draw(st.none() | st.integers(0, 2**31 - 1)),
        offset=draw(st.none() | st.integers(0, 2**63 - 1)),
        raw=draw(st.none() | st.binary(max_size=MAX_RAW_BYTES + 100)),
        error=draw(st.text(max_size=200) | st.builds(ValueError, st.text(max_size=50))),
    )
    # Fix the id and time the helper defaults, so a draw does not depend on the clock (hypothesis replays).
    return DeadLetter(**{**letter.model_dump(), "event_id": draw(ids), "ts": draw(timestamps)})


STRATEGIES: dict[type[Event], st.SearchStrategy[Event]] = {
    ItemEvent: items,
    ClickEvent: clicks(),
    QueryEvent: queries,
    Recommendation: recommendations(),
    FeedbackEvent: feedback(),
    ModelUpdate: model_updates(),
    DeadLetter: dead_letters(),
}
any_event = st.one_of(*STRATEGIES.values())

# One valid value per schema with every optional field set, for the hand-written bad-input tests.
SAMPLES: dict[type[Event], dict[str, Any]] = {
    ItemEvent: {
        "event_id": "e1",
        "ts": 1_700_000_000.5,
        "item_id": "i1",
        "title": "Heat (1995)",
        "text": "A group of professional bank robbers…",
        "categories": ["Action", "Crime"],
        "attributes": {"year": 1995, "director": "Michael Mann", "rating": 8.3, "sequel": False},
    },
    ClickEvent: {
        "event_id": "e2",
        "ts": 1_700_000_001.0,
        "user_id": "u1",
        "item_id": "i1",
        "kind": "review",
        "rating": 4.5,
        "text": "tense and long, loved it",
        "request_id": "r1",
    },
    QueryEvent: {
        "event_id": "e3",
        "ts": 1_700_000_002.0,
        "request_id": "r1",
        "user_id": "u1",
        "text": "something light to watch with kids",
        "k": 10,
        "filters": {
            "categories": ["Comedy"],
            "exclude_categories": ["Horror"],
            "exclude_item_ids": ["i1"],
            "year_min": 1990,
            "year_max": 2000,
            "exclude_seen": True,
        },
    },
    Recommendation: {
        "event_id": "e4",
        "ts": 1_700_000_003.0,
        "request_id": "r1",
        "user_id": "u1",
        "items": [{"item_id": "i2", "title": "Toy Story (1995)", "score": 0.9}],
        "model_version": "v1",
        "template_id": "P1-I1-T3-a",
        "degraded": True,
        "reason": "reranker timed out; popularity fallback",
        "timings": {"retrieve": 7.5, "rerank": 19.0},
    },
    FeedbackEvent: {
        "event_id": "e5",
        "ts": 1_700_000_004.0,
        "user_id": "u1",
        "request_id": "r1",
        "instruction": "The user watched Heat. Rank: (A) Toy Story (B) Jumanji",
        "candidate_item_ids": ["i2", "i3", "i4"],
        "positive_item_ids": ["i2"],
        "negative_item_ids": ["i3"],
        "template_id": "P1-I0-T3-a",
        "model_version": "v1",
    },
    ModelUpdate: {
        "event_id": "e6",
        "ts": 1_700_000_005.0,
        "version": "v2",
        "metrics": {"ndcg@10": 0.081, "recall@10": 0.155},
        "accepted": False,
        "reason": "ndcg@10 below the served model",
    },
    DeadLetter: {
        "event_id": "e7",
        "ts": 1_700_000_006.0,
        "source_topic": "clicks",
        "partition": 3,
        "offset": 42,
        "raw_b64": "e30=",
        "raw_size": 2,
        "error": "clicks: field 'user_id': required",
    },
}


def raw(cls: type[Event], **changes: Any) -> bytes:
    """The sample of ``cls`` with fields changed (a value of ``...`` removes the field), as JSON."""
    data = dict(SAMPLES[cls])
    for name, value in changes.items():
        if value is ...:
            data.pop(name)
        else:
            data[name] = value
    return orjson.dumps(data)


def error_of(cls: type[Event], data: bytes) -> EventError:
    with pytest.raises(EventError) as info:
        decode(cls, data)
    return info.value


# --- the schema table ------------------------------------------------------------------------------------


def test_schemas_cover_every_topic_role_of_the_config() -> None:
    assert set(SCHEMAS) == set(TopicNames.model_fields)
    for role, cls in SCHEMAS.items():
        assert cls.topic == role


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_samples_are_valid_and_keyed(cls: type[Event]) -> None:
    event = decode(cls, raw(cls))
    expected_key = {
        ItemEvent: "i1",
        ClickEvent: "u1",
        QueryEvent: "u1",
        Recommendation: "u1",
        FeedbackEvent: "u1",
        ModelUpdate: "v2",
        DeadLetter: "clicks",
    }[cls]
    assert event.key == expected_key


# --- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
def test_round_trip(cls: type[Event]) -> None:
    @FAST
    @given(STRATEGIES[cls])
    def check(event: Event) -> None:
        wire = encode(event)
        back = decode(cls, wire)
        assert back == event
        assert encode(back) == wire  # byte-exact: catches 1 vs 1.0 vs True, which == hides
        assert back.key == event.key

    check()


def test_decode_accepts_bytes_like_and_str() -> None:
    wire = raw(ModelUpdate)
    expected = decode(ModelUpdate, wire)
    for form in (bytearray(wire), memoryview(wire), wire.decode()):
        assert decode(ModelUpdate, form) == expected


def test_defaults_id_and_now() -> None:
    before = time.time()
    a = ClickEvent(user_id="u", item_id="i", kind="click")
    b = ClickEvent(user_id="u", item_id="i", kind="click")
    assert a.event_id != b.event_id
    assert before <= a.ts <= time.time()
    q = QueryEvent(user_id="u")
    assert q.k == 10 and q.text is None and q.filters == QueryFilters() and q.request_id


def test_events_are_frozen() -> None:
    event = decode(QueryEvent, raw(QueryEvent))
    with pytest.raises(ValueError):
        event.k = 5  # type: ignore[misc]


def test_ids_are_stripped_and_blank_query_text_is_none() -> None:
    event = decode(QueryEvent, raw(QueryEvent, user_id="  u1\t", text=" \n "))
    assert event.user_id == "u1"
    assert event.text is None


def test_json_int_is_a_float_but_not_the_reverse() -> None:
    assert decode(ClickEvent, raw(ClickEvent, rating=4, ts=1_700_000_000)).rating == 4.0
    assert "k" in error_of(QueryEvent, raw(QueryEvent, k=10.0)).fields


def test_encode_rejects_non_events() -> None:
    with pytest.raises(TypeError):
        encode({"user_id": "u"})  # type: ignore[arg-type]


# --- malformed bytes -------------------------------------------------------------------------------------


@FAST
@given(st.sampled_from(list(SCHEMAS.values())), st.binary(max_size=300))
def test_any_bytes_decode_or_raise_event_error(cls: type[Event], data: bytes) -> None:
    try:
        decode(cls, data)
    except EventError as exc:
        assert str(exc).startswith(f"{cls.topic}: ")


@FAST
@given(st.binary(min_size=1, max_size=200).filter(lambda b: not _is_utf8(b)))
def test_bad_utf8_is_reported_with_its_position(data: bytes) -> None:
    err = error_of(QueryEvent, data)
    try:
        data.decode()
    except UnicodeDecodeError as bad:
        assert str(err) == f"queries: not valid UTF-8 at byte {bad.start}"


@FAST
@given(any_event, st.data())
def test_bad_utf8_inside_a_valid_event(event: Event, data: st.DataObject) -> None:
    wire = encode(event)
    at = data.draw(st.integers(0, len(wire)))
    junk = data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]))
    bad = wire[:at] + junk + wire[at:]
    with pytest.raises(UnicodeDecodeError) as info:
        bad.decode()
    start = info.value.start  # junk may first complete a split character, so it can lie past `at`
    assert start <= at + len(junk) + 3
    assert str(error_of(type(event), bad)) == f"{event.topic}: not valid UTF-8 at byte {start}"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize(
    "data", [b"", b"{", b"nope", b"NaN", b'{"k": 1e400}', b"\xef\xbb\xbf{}", b'{"a": "\\ud800"}', b"{} {}"]
)
def test_not_json(data: bytes) -> None:
    assert str(error_of(QueryEvent, data)).startswith("queries: not JSON: ")


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"[]", "array"),
        (b"[{}]", "array"),
        (b"3", "integer"),
        (b"2.5", "number"),
        (b'"x"', "string"),
        (b"null", "null"),
        (b"true", "boolean"),
    ],
)
def test_json_that_is_not_an_object(data: bytes, kind: str) -> None:
    err = error_of(ClickEvent, data)
    assert str(err) == f"clicks: expected a JSON object, got {kind}"
    assert err.fields == ()


def test_tombstone() -> None:
    assert "tombstone" in str(error_of(ClickEvent, None))  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | finite | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@FAST
@given(st.data())
def test_arbitrary_json_objects_decode_or_raise_event_error(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(list(SAMPLES)))
    base = dict(SAMPLES[cls])
    keys = [*base, "junk"]
    for _ in range(data.draw(st.integers(1, 3))):
        base[data.draw(st.sampled_from(keys))] = data.draw(json_values)
    try:
        decode(cls, orjson.dumps(base))
    except EventError as exc:
        assert exc.fields  # a bad value always names its field


# --- invalid values: each message names the field -----------------------------------------------------------

REQUIRED = [
    (cls, name) for cls in SCHEMAS.values() for name, field in cls.model_fields.items() if field.is_required()
]


@pytest.mark.parametrize(("cls", "name"), REQUIRED, ids=lambda v: getattr(v, "__name__", v))
def test_missing_field(cls: type[Event], name: str) -> None:
    err = error_of(cls, raw(cls, **{name: ...}))
    assert f"field '{name}': required" in str(err)
    assert err.fields == (name,)


def _wrong(value: Any) -> Any:
    """A JSON value of the wrong type for a field whose valid value is ``value``."""
    if isinstance(value, bool):
        return "true"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return 5
    if isinstance(value, list):
        return "x"
    return [value]


WRONG = [(cls, name) for cls, sample in SAMPLES.items() for name in sample]


@pytest.mark.parametrize(("cls", "name"), WRONG, ids=lambda v: getattr(v, "__name__", v))
def test_wrong_type(cls: type[Event], name: str) -> None:
    err = error_of(cls, raw(cls, **{name: _wrong(SAMPLES[cls][name])}))
    assert err.fields == (name,)
    assert f"field '{name}': expected " in str(err) or f"field '{name}': must be " in str(err)


@pytest.mark.parametrize(
    ("cls", "changes", "field", "reason"),
    [
        (QueryEvent, {"k": 0}, "k", "must be >= 1, got 0"),
        (QueryEvent, {"k": 101}, "k", "must be <= 100, got 101"),
        (QueryEvent, {"k": True}, "k", "expected an integer, got boolean"),
        (ClickEvent, {"rating": -0.5}, "rating", "must be >= 0.0, got -0.5"),
        (ClickEvent, {"rating": 5.01}, "rating", "must be <= 5.0, got 5.01"),
        (
            ClickEvent,
            {"kind": "like"},
            "kind",
            "must be 'click', 'purchase', 'rating', 'review' or 'dislike'",
        ),
        (
            ClickEvent,
            {"ts": 1_700_000_000_000},
            "ts",
            "seconds since the epoch expected, got 1700000000000.0 (milliseconds?)",
        ),
        (ClickEvent, {"ts": -1}, "ts", "must be >= 0.0"),
        (Recommendation, {"timings": {"rerank": -1}}, "timings.rerank", "must be >= 0.0"),
        (DeadLetter, {"partition": -1}, "partition", "must be >= 0"),
        (DeadLetter, {"source_topic": "no spaces"}, "source_topic", "must match"),
        (ItemEvent, {"attributes": {"year": None}}, "attributes.year", "expected a string, integer"),
        (
            ItemEvent,
            {"attributes": {"big": 2**63}},
            "attributes.big",
            "integer outside the signed 64-bit range",
        ),
        (ItemEvent, {"title": "   "}, "title", "must not be blank"),
        (ItemEvent, {"item_id": " "}, "item_id", "must not be empty"),
        (
            Recommendation,
            {"items": [{"item_id": "a", "score": "high"}]},
            "items[0].score",
            "expected a number",
        ),
        (Recommendation, {"items": [{"item_id": "a"}]}, "items[0].score", "required"),
    ],
)
def test_out_of_range_and_malformed_values(cls: type[Event], changes: dict, field: str, reason: str) -> None:
    err = error_of(cls, raw(cls, **changes))
    assert err.fields == (field,)
    assert f"field '{field}': {reason}" in str(err)


@pytest.mark.parametrize(
    ("cls", "changes", "field", "reason"),
    [
        (ClickEvent, {"kind": "rating", "rating": None}, "rating", "required when kind is 'rating'"),
        (ClickEvent, {"kind": "click", "rating": 3}, "rating", "not allowed when kind is 'click'"),
        (ClickEvent, {"kind": "review", "text": " "}, "text", "required (non-blank) when kind is 'review'"),
        (Recommendation, {"reason": None}, "reason", "required when degraded is true"),
        (Recommendation, {"items": [{"item_id": "a", "score": 1}] * 2}, "items", "duplicate 'a'"),
        (ModelUpdate, {"reason": ""}, "reason", "required when accepted is false"),
        (FeedbackEvent, {"positive_item_ids": ["zz"]}, "positive_item_ids", "'zz' is not among candidate"),
        (FeedbackEvent, {"negative_item_ids": ["i2"]}, "negative_item_ids", "'i2' is also positive"),
        (
            FeedbackEvent,
            {"positive_item_ids": [], "negative_item_ids": []},
            "positive_item_ids",
            "a training example needs a",
        ),
        (FeedbackEvent, {"candidate_item_ids": []}, "candidate_item_ids", "at least 1 entries"),
        (ItemEvent, {"categories": ["A", "A"]}, "categories", "duplicate 'A'"),
        (QueryEvent, {"filters": {"year_min": 2000, "year_max": 1990}}, "filters.year_max", "must be >="),
        (
            QueryEvent,
            {"filters": {"categories": ["A"], "exclude_categories": ["A"]}},
            "filters.exclude_categories",
            "'A' is also in categories",
        ),
        (DeadLetter, {"raw_b64": "not base64!"}, "raw_b64", "not valid base64"),
        (DeadLetter, {"raw_size": 1}, "raw_size", "must be >= the 2 bytes kept"),
        (
            DeadLetter,
            {"raw_b64": base64.b64encode(b"x" * (MAX_RAW_BYTES + 1)).decode()},
            "raw_b64",
            "at most",
        ),
    ],
)
def test_cross_field_rules(cls: type[Event], changes: dict, field: str, reason: str) -> None:
    err = error_of(cls, raw(cls, **changes))
    assert err.fields == (field,)
    assert f"field '{field}': {reason}" in str(err)


def test_several_problems_are_all_reported() -> None:
    err = error_of(QueryEvent, raw(QueryEvent, user_id="", k=0, surprise=1))
    assert set(err.fields) == {"user_id", "k", "surprise"}


def test_review_may_carry_a_rating_and_any_kind_a_tag() -> None:
    assert decode(ClickEvent, raw(ClickEvent, kind="review", rating=4)).rating == 4.0
    assert decode(ClickEvent, raw(ClickEvent, kind="click", rating=None, text="cozy")).text == "cozy"


@pytest.mark.parametrize(
    ("cls", "changes", "field"),
    [
        (ItemEvent, {"colour": "red"}, "colour"),
        (QueryEvent, {"filters": {"genre": "x"}}, "filters.genre"),
        (Recommendation, {"items": [{"item_id": "a", "score": 1, "rank": 1}]}, "items[0].rank"),
    ],
)
def test_unknown_fields(cls: type[Event], changes: dict, field: str) -> None:
    err = error_of(cls, raw(cls, **changes))
    assert str(err) == f"{cls.topic}: field '{field}': unknown field"


# Every bounded text field: (schema, field path, how to set it, limit).
TEXT_BOUNDS = [
    (ItemEvent, "title", lambda s: {"title": s}, MAX_TITLE_CHARS),
    (ItemEvent, "text", lambda s: {"text": s}, MAX_ITEM_TEXT_CHARS),
    (ItemEvent, "item_id", lambda s: {"item_id": s}, MAX_ID_CHARS),
    (ItemEvent, "event_id", lambda s: {"event_id": s}, MAX_ID_CHARS),
    (ItemEvent, "categories[0]", lambda s: {"categories": [s]}, MAX_ID_CHARS),
    (ItemEvent, "attributes.note", lambda s: {"attributes": {"note": s}}, 1024),
    (ClickEvent, "text", lambda s: {"text": s}, MAX_REVIEW_CHARS),
    (ClickEvent, "user_id", lambda s: {"user_id": s}, MAX_ID_CHARS),
    (ClickEvent, "request_id", lambda s: {"request_id": s}, MAX_ID_CHARS),
    (QueryEvent, "text", lambda s: {"text": s}, MAX_QUERY_TEXT_CHARS),
    (
        QueryEvent,
        "filters.exclude_item_ids[0]",
        lambda s: {"filters": {"exclude_item_ids": [s]}},
        MAX_ID_CHARS,
    ),
    (
        Recommendation,
        "items[0].title",
        lambda s: {"items": [{"item_id": "a", "title": s, "score": 1}]},
        MAX_TITLE_CHARS,
    ),
    (Recommendation, "reason", lambda s: {"reason": s}, MAX_REASON_CHARS),
    (Recommendation, "model_version", lambda s: {"model_version": s}, MAX_ID_CHARS),
    (FeedbackEvent, "instruction", lambda s: {"instruction": s}, MAX_INSTRUCTION_CHARS),
    (FeedbackEvent, "template_id", lambda s: {"template_id": s}, MAX_ID_CHARS),
    (ModelUpdate, "reason", lambda s: {"reason": s}, MAX_REASON_CHARS),
    (ModelUpdate, "version", lambda s: {"version": s}, MAX_ID_CHARS),
    (DeadLetter, "error", lambda s: {"error": s}, MAX_ERROR_CHARS),
]


@pytest.mark.parametrize(
    ("cls", "field", "setter", "limit"), TEXT_BOUNDS, ids=lambda v: getattr(v, "__name__", v)
)
def test_text_bounds_are_errors_not_truncation(cls: type[Event], field: str, setter: Any, limit: int) -> None:
    at_limit = decode(cls, raw(cls, **setter("é" * limit)))  # characters, not bytes
    assert at_limit is not None
    err = error_of(cls, raw(cls, **setter("é" * (limit + 100))))
    assert err.fields == (field,)
    assert f"field '{field}': at most {limit} characters, got {limit + 100}" in str(err)


@pytest.mark.parametrize(
    ("cls", "changes", "field", "limit"),
    [
        (ItemEvent, {"categories": [f"c{i}" for i in range(65)]}, "categories", 64),
        (ItemEvent, {"attributes": {f"a{i}": i for i in range(65)}}, "attributes", 64),
        (Recommendation, {"items": [{"item_id": f"i{i}", "score": 1} for i in range(101)]}, "items", 100),
    ],
)
def test_collection_bounds(cls: type[Event], changes: dict, field: str, limit: int) -> None:
    err = error_of(cls, raw(cls, **changes))
    assert f"field '{field}': at most {limit} entries" in str(err)


ID_FIELDS = [
    (cls, name)
    for cls in SAMPLES
    for name in ("event_id", "user_id", "item_id", "request_id", "version", "template_id")
    if name in SAMPLES[cls]
]
bad_id_chars = st.characters(whitelist_categories=("Cc", "Cf", "Zl", "Zp"))


@FAST
@given(st.sampled_from(ID_FIELDS), bad_id_chars)
def test_control_characters_in_ids(where: tuple[type[Event], str], ch: str) -> None:
    cls, name = where
    err = error_of(cls, raw(cls, **{name: f"a{ch}b"}))
    assert (
        str(err)
        == f"{cls.topic}: field '{name}': control or invisible character U+{ord(ch):04X} at position 1 not allowed"
    )


def test_whitespace_controls_around_an_id_are_stripped_like_spaces() -> None:
    assert decode(ClickEvent, raw(ClickEvent, user_id="\r\n u1\t")).user_id == "u1"
    assert error_of(ClickEvent, raw(ClickEvent, user_id="\x00u1")).fields == ("user_id",)


@pytest.mark.parametrize("ch", ["\x00", "\x07", "\x1b", "\x7f", "\x85"])
def test_control_characters_in_text(ch: str) -> None:
    err = error_of(ClickEvent, raw(ClickEvent, text=f"good{ch}bad"))
    assert str(err) == f"clicks: field 'text': control character U+{ord(ch):04X} at position 4 not allowed"


def test_tabs_and_newlines_are_fine_in_text() -> None:
    assert decode(ClickEvent, raw(ClickEvent, text="line one\n\tline two\r\n")).text.endswith("\r\n")


def test_validate_a_parsed_body() -> None:
    assert validate(QueryEvent, {"user_id": "u"}).k == 10
    with pytest.raises(EventError, match="expected a JSON object, got array"):
        validate(QueryEvent, [])


# --- dead letters ------------------------------------------------------------------------------------------


def test_dead_letter_truncates_raw_and_keeps_its_size() -> None:
    data = bytes(range(256)) * 20  # 5,120 bytes, not UTF-8
    letter = dead_letter("clicks", 2, 99, data, "boom")
    assert letter.raw_bytes == data[:MAX_RAW_BYTES]
    assert letter.raw_size == len(data) and letter.truncated
    assert (letter.source_topic, letter.partition, letter.offset, letter.key) == ("clicks", 2, 99, "clicks")
    assert decode(DeadLetter, encode(letter)) == letter


@FAST
@given(st.binary(max_size=2 * MAX_RAW_BYTES), st.text(max_size=300))
def test_any_bytes_make_a_dead_letter_that_round_trips(data: bytes, error: str) -> None:
    letter = dead_letter("queries", 0, 7, data, error)
    assert letter.raw_bytes == data[:MAX_RAW_BYTES]
    assert letter.truncated == (len(data) > MAX_RAW_BYTES)
    assert letter.raw_text == data[:MAX_RAW_BYTES].decode("utf-8", errors="replace")
    assert decode(DeadLetter, encode(letter)) == letter


def test_dead_letter_of_a_decode_failure() -> None:
    data = b'{"user_id": "u", "k": 0}'
    with pytest.raises(EventError) as info:
        decode(QueryEvent, data)
    letter = dead_letter("queries", 1, 5, data, info.value)
    assert letter.error == "queries: field 'k': must be >= 1, got 0"
    assert not letter.truncated and letter.raw_text == data.decode()


def test_dead_letter_error_text_is_made_safe() -> None:
    letter = dead_letter("items", None, None, None, KeyError("x\x00\ud800" + "y" * 10_000))
    assert letter.error.startswith("KeyError: ")
    assert len(letter.error) == MAX_ERROR_CHARS and letter.error.endswith("…")
    assert "\x00" not in letter.error and "\ud800" not in letter.error
    assert letter.raw_size == 0 and letter.partition is None
    assert decode(DeadLetter, encode(letter)) == letter
    assert dead_letter("items", 0, 0, b"", "").error == "unknown error"


def test_dead_letter_keeps_lone_surrogates_of_a_str_value() -> None:
    letter = dead_letter("items", 0, 0, "a\ud800b", "bad")
    assert letter.raw_bytes == b"a\xed\xa0\x80b"


def test_dead_letter_with_a_bad_source_raises_event_error() -> None:
    with pytest.raises(EventError, match="source_topic"):
        dead_letter("not a topic", 0, 0, b"", "x")
