"""Typed schemas of every topic's value, and their wire format (JSON via orjson).

These models are shared by the stream agents and the workers, so a producer and a consumer can never
disagree about a field. Conventions, the same for every topic:

- every event carries ``event_id`` (a fresh uuid4 hex by default) and ``ts``: **float seconds since the Unix
  epoch, UTC** (default: now). A value at or above ``1e11`` is rejected as an error, because it is almost
  certainly milliseconds;
- identifiers (ids, versions, category labels, dictionary keys) are stripped of surrounding whitespace, then
  must be 1–128 characters with no control, format or line-separator characters;
- free text is bounded (the limits are the ``MAX_*`` constants); oversized text is an error, never silently
  truncated. Only the dead-letter raw value is truncated, by design;
- unknown fields are errors (``extra="forbid"``), instances are immutable (``frozen``), and scalars are
  strict: ``"10"`` is not an int, ``1`` is not a bool, ``"1.5"`` is not a float (an integer is a float);
- floats must be finite: orjson would write NaN and infinity as ``null``, which would not round-trip.

``decode`` turns any bytes at all into either a valid event or one ``EventError`` whose message names the
topic, the field and the reason, e.g. ``clicks: field 'rating': required when kind is 'rating'``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    StringConstraints,
    ValidationError,
    model_validator,
)

__all__ = [
    "MAX_ERROR_CHARS",
    "MAX_ID_CHARS",
    "MAX_INSTRUCTION_CHARS",
    "MAX_ITEM_TEXT_CHARS",
    "MAX_QUERY_TEXT_CHARS",
    "MAX_RAW_BYTES",
    "MAX_REASON_CHARS",
    "MAX_REVIEW_CHARS",
    "MAX_TITLE_CHARS",
    "SCHEMAS",
    "ClickEvent",
    "DeadLetter",
    "Event",
    "EventError",
    "FeedbackEvent",
    "ItemEvent",
    "ModelUpdate",
    "QueryEvent",
    "QueryFilters",
    "RankedItem",
    "Recommendation",
    "dead_letter",
    "decode",
    "encode",
    "validate",
]

# Bounds. Text limits are in characters (code points); MAX_RAW_BYTES is in bytes.
MAX_ID_CHARS = 128
MAX_TITLE_CHARS = 512
MAX_ITEM_TEXT_CHARS = 10_000
MAX_QUERY_TEXT_CHARS = 2_000
MAX_REVIEW_CHARS = 10_000
MAX_INSTRUCTION_CHARS = 20_000  # a rendered instruction: template + history titles + candidate titles
MAX_REASON_CHARS = 2_000
MAX_ITEM_REASON_CHARS = 200  # one "why this item" line: rendered from data, short by construction
MAX_ITEM_REASONS = 3
MAX_ERROR_CHARS = 4_096
MAX_ATTR_TEXT_CHARS = 1_024
MAX_RAW_BYTES = 4_096  # dead-letter raw value; stored base64-encoded (see DeadLetter)
MAX_K = 100
MAX_CANDIDATES = 1_000
MAX_LABELS = 64  # categories, attributes, timings per event
MAX_METRICS = 256
MAX_EXCLUDED_ITEMS = 1_000
MAX_TS = 1e11  # seconds; 1e11 s is the year 5138, 1e11 ms is 1973 — so larger values are milliseconds

_INT64 = 2**63  # orjson writes integers up to 64 bits; keep every int inside the signed range

E = TypeVar("E", bound="Event")


class EventError(ValueError):
    """An event that cannot be decoded or is invalid.

    ``str(err)`` reads ``"<topic>: field '<path>': <reason>"`` (problems joined by ``"; "``);
    ``err.topic`` is the topic role (or None) and ``err.problems`` the ``(field path, reason)`` pairs,
    with an empty path for problems of the whole value (bad UTF-8, not JSON, not an object).
    """

    def __init__(self, topic: str | None, problems: Iterable[tuple[str, str]]):
        self.topic = topic
        self.problems: tuple[tuple[str, str], ...] = tuple(problems)
        parts = [f"field '{path}': {why}" if path else why for path, why in self.problems]
        super().__init__(f"{topic or 'event'}: " + "; ".join(parts))

    @property
    def fields(self) -> tuple[str, ...]:
        """The paths of the fields at fault (e.g. ``"items[0].score"``)."""
        return tuple(path for path, _ in self.problems if path)


class _FieldProblem(ValueError):
    """Raised by cross-field validators so the error names the field, not the whole model."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(reason)


# --- field types -------------------------------------------------------------------------------------

_TEXT_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# Control, format (zero-width, bidi overrides), surrogate and line/paragraph separators: invisible or
# spoofable in a key, and they break logs and Kafka tooling.
_ID_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _check_id(value: str) -> str:
    for i, ch in enumerate(value):
        if unicodedata.category(ch) in _ID_FORBIDDEN_CATEGORIES:
            raise ValueError(f"control or invisible character U+{ord(ch):04X} at position {i} not allowed")
    return value


def _check_text(value: str) -> str:
    # Tabs and newlines are fine in prose; other C0/C1 controls and lone surrogates are not (orjson cannot
    # even write a lone surrogate).
    bad = _TEXT_FORBIDDEN.search(value)
    if bad is not None:
        raise ValueError(f"control character U+{ord(bad.group()):04X} at position {bad.start()} not allowed")
    return value


def _text(max_chars: int, min_chars: int = 0) -> Any:
    """Free text of at most ``max_chars`` characters (tabs and newlines allowed)."""
    return Annotated[
        str,
        StringConstraints(strict=True, min_length=min_chars, max_length=max_chars),
        AfterValidator(_check_text),
    ]


def _check_ts(value: float) -> float:
    if value >= MAX_TS:
        raise ValueError(f"seconds since the epoch expected, got {value!r} (milliseconds?)")
    return value


def _check_attr(value: Any) -> str | int | float | bool:
    # A plain validator, not a union: a union reports one error per member, with member names in the path.
    # Subclasses (numpy's float64, IntEnum, …) are turned into the builtin, so encoding cannot surprise.
    if isinstance(value, str):
        if len(value) > MAX_ATTR_TEXT_CHARS:
            raise ValueError(f"at most {MAX_ATTR_TEXT_CHARS} characters, got {len(value)}")
        return _check_text(str(value))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise ValueError("integer outside the signed 64-bit range")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return float(value)
    raise ValueError(f"expected a string, integer, number or boolean, got {_json_type(value)}")


Id = Annotated[
    str,
    StringConstraints(strict=True, strip_whitespace=True, min_length=1, max_length=MAX_ID_CHARS),
    AfterValidator(_check_id),
]
"""An identifier: stripped, 1–128 characters, no control/format/separator characters."""
Label = Id  # category names, attribute/metric/timing keys: the same rules as identifiers
Timestamp = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False), AfterValidator(_check_ts)]
Score = Annotated[float, Strict(), Field(allow_inf_nan=False)]
AttrValue = Annotated[str | int | float | bool, PlainValidator(_check_attr)]
StrictBool = Annotated[bool, Strict()]
Title = _text(MAX_TITLE_CHARS, min_chars=1)
OptionalTitle = _text(MAX_TITLE_CHARS)
ItemText = _text(MAX_ITEM_TEXT_CHARS)
ReviewText = _text(MAX_REVIEW_CHARS)
QueryText = _text(MAX_QUERY_TEXT_CHARS)
Reason = _text(MAX_REASON_CHARS)
ItemReason = _text(MAX_ITEM_REASON_CHARS, min_chars=1)
InstructionText = _text(MAX_INSTRUCTION_CHARS, min_chars=1)
ErrorText = _text(MAX_ERROR_CHARS, min_chars=1)


def _now() -> float:
    return time.time()


def _new_id() -> str:
    return uuid.uuid4().hex


def _unique(field: str, values: Iterable[str]) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise _FieldProblem(field, f"duplicate {v!r}")
        seen.add(v)


# --- schemas -----------------------------------------------------------------------------------------


class Event(BaseModel):
    """Base of every topic's value: an id, a timestamp, and the partition ``key``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    topic: ClassVar[str] = "event"  # the topic role; set by each subclass, used in error messages

    event_id: Id = Field(default_factory=_new_id)
    ts: Timestamp = Field(default_factory=_now)

    @property
    def key(self) -> str:
        """The Kafka message key (DESIGN §1: user_id for user topics, item_id for items)."""
        return self.event_id


class ItemEvent(Event):
    """``items``: a catalogue item was added or changed. Keyed by ``item_id``."""

    topic: ClassVar[str] = "items"

    item_id: Id
    title: Title
    text: ItemText = ""
    categories: Annotated[tuple[Label, ...], Field(max_length=MAX_LABELS)] = ()
    attributes: Annotated[dict[Label, AttrValue], Field(max_length=MAX_LABELS)] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _rules(self) -> ItemEvent:
        if not self.title.strip():
            raise _FieldProblem("title", "must not be blank")
        _unique("categories", self.categories)
        return self

    @property
    def key(self) -> str:
        return self.item_id


ClickKind = Literal["click", "purchase", "rating", "review", "dislike"]
_RATED_KINDS = frozenset({"rating", "review"})


class ClickEvent(Event):
    """``clicks``: a user interacted with an item. Keyed by ``user_id``.

    ``rating`` (0–5 inclusive, half stars and any other fraction allowed) is required when ``kind`` is
    ``rating``, optional for ``review`` and not allowed otherwise. ``text`` is required (non-blank) for a
    ``review`` and optional for any kind (e.g. a free-text tag). ``request_id`` links the interaction to
    the recommendation it followed, when it did.
    """

    topic: ClassVar[str] = "clicks"

    user_id: Id
    item_id: Id
    kind: ClickKind
    rating: Annotated[float, Strict(), Field(ge=0, le=5, allow_inf_nan=False)] | None = None
    text: ReviewText | None = None
    request_id: Id | None = None

    @model_validator(mode="after")
    def _rules(self) -> ClickEvent:
        if self.kind == "rating" and self.rating is None:
            raise _FieldProblem("rating", "required when kind is 'rating'")
        if self.kind not in _RATED_KINDS and self.rating is not None:
            raise _FieldProblem("rating", f"not allowed when kind is {self.kind!r}")
        if self.kind == "review" and not (self.text and self.text.strip()):
            raise _FieldProblem("text", "required (non-blank) when kind is 'review'")
        return self

    @property
    def key(self) -> str:
        return self.user_id


class QueryFilters(BaseModel):
    """Hard constraints on a query's candidates. Empty filters constrain nothing.

    ``categories`` keeps items in ANY of them; ``exclude_categories`` drops items in any of those;
    ``year_min``/``year_max`` bound the item's ``year`` attribute, inclusive; ``exclude_seen`` drops items
    already in the user's history (the default: recommend something new).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    categories: Annotated[tuple[Label, ...], Field(max_length=MAX_LABELS)] = ()
    exclude_categories: Annotated[tuple[Label, ...], Field(max_length=MAX_LABELS)] = ()
    exclude_item_ids: Annotated[tuple[Id, ...], Field(max_length=MAX_EXCLUDED_ITEMS)] = ()
    year_min: Annotated[int, Strict(), Field(ge=0, le=9999)] | None = None
    year_max: Annotated[int, Strict(), Field(ge=0, le=9999)] | None = None
    exclude_seen: StrictBool = True

    @model_validator(mode="after")
    def _rules(self) -> QueryFilters:
        _unique("categories", self.categories)
        _unique("exclude_categories", self.exclude_categories)
        _unique("exclude_item_ids", self.exclude_item_ids)
        both = set(self.categories) & set(self.exclude_categories)
        if both:
            raise _FieldProblem("exclude_categories", f"{min(both)!r} is also in categories")
        if self.year_min is not None and self.year_max is not None and self.year_min > self.year_max:
            raise _FieldProblem("year_max", f"must be >= year_min ({self.year_min}), got {self.year_max}")
        return self


class QueryEvent(Event):
    """``queries``: a request for ``k`` recommendations. Keyed by ``user_id``.

    ``text`` is the user's free-form instruction; None (blank text is read as None) means "no intention",
    i.e. sequential recommendation.
    """

    topic: ClassVar[str] = "queries"

    request_id: Id = Field(default_factory=_new_id)
    user_id: Id
    text: QueryText | None = None
    k: Annotated[int, Strict(), Field(ge=1, le=MAX_K)] = 10
    filters: QueryFilters = QueryFilters()

    @model_validator(mode="before")
    @classmethod
    def _blank_text_is_none(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("text"), str) and not data["text"].strip():
            return {**data, "text": None}
        return data

    @property
    def key(self) -> str:
        return self.user_id


class RankedItem(BaseModel):
    """One recommended item; its position in ``Recommendation.items`` is its rank."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    item_id: Id
    title: OptionalTitle = ""
    score: Score
    # Why it is here, from data: the request attributes it matches, the history item it neighbours.
    reasons: Annotated[tuple[ItemReason, ...], Field(max_length=MAX_ITEM_REASONS)] = ()


class Recommendation(Event):
    """``recommendations``: the answer to one query. Keyed by ``user_id``.

    ``items`` are in rank order, best first (scores are the model's, not necessarily monotone after
    re-ordering). ``degraded`` marks a fallback answer (e.g. the reranker was down) and then needs a
    ``reason``. ``timings`` are per-stage durations in milliseconds. ``instruction`` is the rendered
    InstructRec instruction the model scored (absent when no model ranked the answer); ``relaxed`` names the
    parts of the request that no item satisfied and were let go.
    """

    topic: ClassVar[str] = "recommendations"

    request_id: Id
    user_id: Id
    items: Annotated[tuple[RankedItem, ...], Field(max_length=MAX_K)]
    model_version: Id
    template_id: Id
    degraded: StrictBool = False
    reason: Reason | None = None
    timings: Annotated[
        dict[Label, Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]],
        Field(max_length=MAX_LABELS),
    ] = Field(default_factory=dict)
    instruction: InstructionText | None = None
    relaxed: Annotated[tuple[Label, ...], Field(max_length=MAX_LABELS)] = ()
    requested_version: Id | None = None  # the version the stream asked Triton for (degraded answers too)

    @model_validator(mode="after")
    def _rules(self) -> Recommendation:
        _unique("items", (it.item_id for it in self.items))
        if self.degraded and not (self.reason and self.reason.strip()):
            raise _FieldProblem("reason", "required when degraded is true")
        return self

    @property
    def key(self) -> str:
        return self.user_id


class FeedbackEvent(Event):
    """``feedback``: one training example built from an impression joined with the user's clicks.

    ``instruction`` is the rendered instruction the model saw, over ``candidate_item_ids``;
    ``positive_item_ids`` (clicked, bought, rated well) and ``negative_item_ids`` (disliked, or shown and
    ignored) are disjoint subsets of the candidates, and at least one of them is non-empty.
    Keyed by ``user_id``.
    """

    topic: ClassVar[str] = "feedback"

    user_id: Id
    request_id: Id
    instruction: InstructionText
    candidate_item_ids: Annotated[tuple[Id, ...], Field(min_length=1, max_length=MAX_CANDIDATES)]
    positive_item_ids: Annotated[tuple[Id, ...], Field(max_length=MAX_CANDIDATES)] = ()
    negative_item_ids: Annotated[tuple[Id, ...], Field(max_length=MAX_CANDIDATES)] = ()
    template_id: Id
    model_version: Id | None = None  # the model that served the impression, when known
    intention: QueryText | None = None  # the request's text, when it had one

    @model_validator(mode="after")
    def _rules(self) -> FeedbackEvent:
        _unique("candidate_item_ids", self.candidate_item_ids)
        _unique("positive_item_ids", self.positive_item_ids)
        _unique("negative_item_ids", self.negative_item_ids)
        candidates = set(self.candidate_item_ids)
        for field in ("positive_item_ids", "negative_item_ids"):
            stray = [i for i in getattr(self, field) if i not in candidates]
            if stray:
                raise _FieldProblem(field, f"{stray[0]!r} is not among candidate_item_ids")
        both = set(self.positive_item_ids) & set(self.negative_item_ids)
        if both:
            raise _FieldProblem("negative_item_ids", f"{min(both)!r} is also positive")
        if not self.positive_item_ids and not self.negative_item_ids:
            raise _FieldProblem("positive_item_ids", "a training example needs a positive or a negative")
        return self

    @property
    def key(self) -> str:
        return self.user_id


class ModelUpdate(Event):
    """``model_updates``: what happened to a model version. Keyed by ``version``.

    ``kind``: ``verdict`` — a fine-tuned candidate was gated (``accepted``; ``reason`` is required when
    rejected; ``metrics`` are the held-out figures the gate compared, candidate and incumbent); ``rollback``
    — the served version was rolled back to ``version``; ``prequential`` — the stream's rolling quality of
    ``version`` on live traffic (``metrics``: NDCG@10, HR@10 and how many answers they cover).
    """

    topic: ClassVar[str] = "model_updates"

    version: Id
    metrics: Annotated[
        dict[Label, Annotated[float, Strict(), Field(allow_inf_nan=False)]], Field(max_length=MAX_METRICS)
    ] = Field(default_factory=dict)
    accepted: StrictBool
    reason: Reason | None = None
    kind: Literal["verdict", "rollback", "prequential"] = "verdict"
    incumbent: Id | None = None  # the version the candidate was compared with (verdicts)

    @model_validator(mode="after")
    def _rules(self) -> ModelUpdate:
        if not self.accepted and not (self.reason and self.reason.strip()):
            raise _FieldProblem("reason", "required when accepted is false")
        return self

    @property
    def key(self) -> str:
        return self.version


class DeadLetter(Event):
    """``dead_letter``: a value an agent could not process, with where it came from and why.

    ``raw_b64`` is the **base64** (standard alphabet, padded) of the first ``MAX_RAW_BYTES`` bytes of the
    value: base64 rather than text with replacement characters so the exact bytes (bad UTF-8 included) can
    be inspected and replayed. ``raw_size`` is the original size in bytes. ``partition`` and ``offset`` are
    None when the value did not come from a topic partition (e.g. a web request). Keyed by source ``topic``.
    Build one with ``dead_letter()``, which never fails on the raw value or the error.
    """

    topic: ClassVar[str] = "dead_letter"

    source_topic: Annotated[
        str, StringConstraints(strict=True, min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")
    ]
    partition: Annotated[int, Strict(), Field(ge=0, lt=2**31)] | None = None
    offset: Annotated[int, Strict(), Field(ge=0, lt=_INT64)] | None = None
    raw_b64: Annotated[str, StringConstraints(strict=True, max_length=4 * ((MAX_RAW_BYTES + 2) // 3))] = ""
    raw_size: Annotated[int, Strict(), Field(ge=0, lt=_INT64)] = 0
    error: ErrorText

    @model_validator(mode="after")
    def _rules(self) -> DeadLetter:
        try:
            raw = base64.b64decode(self.raw_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _FieldProblem("raw_b64", f"not valid base64: {exc}") from None
        if len(raw) > MAX_RAW_BYTES:
            raise _FieldProblem("raw_b64", f"at most {MAX_RAW_BYTES} bytes, got {len(raw)}")
        if len(raw) > self.raw_size:
            raise _FieldProblem("raw_size", f"must be >= the {len(raw)} bytes kept, got {self.raw_size}")
        return self

    @property
    def raw_bytes(self) -> bytes:
        """The kept (possibly truncated) raw bytes."""
        return base64.b64decode(self.raw_b64)

    @property
    def raw_text(self) -> str:
        """The kept bytes as text for humans, with bad UTF-8 replaced by U+FFFD."""
        return self.raw_bytes.decode("utf-8", errors="replace")

    @property
    def truncated(self) -> bool:
        return self.raw_size > len(self.raw_bytes)

    @property
    def key(self) -> str:
        return self.source_topic


SCHEMAS: Mapping[str, type[Event]] = MappingProxyType(
    {
        cls.topic: cls
        for cls in (ItemEvent, ClickEvent, QueryEvent, Recommendation, FeedbackEvent, ModelUpdate, DeadLetter)
    }
)
"""Topic role (the field names of ``config.TopicNames``) → schema of the topic's values."""


# --- wire format -------------------------------------------------------------------------------------


def encode(event: Event) -> bytes:
    """The event as compact UTF-8 JSON (orjson); ``decode(type(event), encode(event)) == event``."""
    if not isinstance(event, Event):
        raise TypeError(f"expected an Event, got {type(event).__name__}")
    return orjson.dumps(event.model_dump())


def decode(model_cls: type[E], raw: bytes | bytearray | memoryview | str | None) -> E:
    """Parse and validate one value of ``model_cls``'s topic; any bad input raises ``EventError``."""
    topic = model_cls.topic
    if raw is None:
        raise EventError(topic, [("", "no value (tombstone)")])
    if isinstance(raw, memoryview | bytearray):
        raw = bytes(raw)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventError(topic, [("", _why_not_json(raw, exc))]) from None
    return validate(model_cls, data)


def validate(model_cls: type[E], data: Any) -> E:
    """Validate an already-parsed JSON value (e.g. a web request body) as ``model_cls``; raises EventError."""
    topic = model_cls.topic
    if not isinstance(data, dict):
        raise EventError(topic, [("", f"expected a JSON object, got {_json_type(data)}")])
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise EventError(topic, [_describe(err) for err in exc.errors(include_url=False)]) from None


def dead_letter(
    topic: str,
    partition: int | None,
    offset: int | None,
    raw: bytes | bytearray | memoryview | str | None,
    error: BaseException | str,
) -> DeadLetter:
    """A ``DeadLetter`` for a value that failed; keeps the first ``MAX_RAW_BYTES`` bytes of ``raw``.

    Never fails because of ``raw`` or ``error``: the error text is made printable and cut to
    ``MAX_ERROR_CHARS``; an invalid ``topic``, ``partition`` or ``offset`` raises ``EventError``. An ``EventError`` is recorded by its message, any other exception as
    ``"TypeName: message"``.
    """
    if raw is None:
        data = b""
    elif isinstance(raw, str):
        data = raw.encode("utf-8", errors="surrogatepass")  # keep even lone surrogates, byte for byte
    else:
        data = bytes(raw)
    if isinstance(error, EventError):
        text = str(error)
    elif isinstance(error, BaseException):
        text = f"{type(error).__name__}: {error}"
    else:
        text = str(error)
    text = _TEXT_FORBIDDEN.sub("\ufffd", text).strip() or "unknown error"
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    fields = {
        "source_topic": topic,
        "partition": partition,
        "offset": offset,
        "raw_b64": base64.b64encode(data[:MAX_RAW_BYTES]).decode("ascii"),
        "raw_size": len(data),
        "error": text,
    }
    return validate(DeadLetter, fields)  # a bad topic/partition/offset is an EventError like any other


# --- error messages ----------------------------------------------------------------------------------

_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "tuple_type": "an array",
    "list_type": "an array",
}
_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"
        else:
            out += (f".{part}" if part.isidentifier() else f"[{_short(part)}]") if out else str(part)
    return out


def _describe(err: Mapping[str, Any]) -> tuple[str, str]:
    """One pydantic error as (field path, reason a person can act on)."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    path = _path(err["loc"])
    problem = ctx.get("error")
    if isinstance(problem, _FieldProblem):
        return (f"{path}.{problem.field}" if path else problem.field), problem.reason
    if kind == "missing":
        why = "required"
    elif kind == "extra_forbidden":
        why = "unknown field"
    elif kind in _TYPE_NAMES:
        why = f"expected {_TYPE_NAMES[kind]}, got {_json_type(value)}"
    elif kind == "string_too_long":
        why = f"at most {ctx['max_length']} characters, got {len(value)}"
    elif kind == "string_too_short":
        why = "must not be empty"
    elif kind == "too_long":
        why = f"at most {ctx['max_length']} entries, got {ctx.get('actual_length', '?')}"
    elif kind == "too_short":
        why = f"at least {ctx['min_length']} entries, got {ctx.get('actual_length', '?')}"
    elif kind in _BOUNDS:
        op, name = _BOUNDS[kind]
        why = f"must be {op} {ctx[name]}, got {_short(value)}"
    elif kind == "finite_number":
        why = "must be a finite number"
    elif kind == "literal_error":
        why = f"must be {ctx['expected']}, got {_short(value)}"
    elif kind == "string_pattern_mismatch":
        why = f"must match {ctx['pattern']}, got {_short(value)}"
    elif problem is not None:
        why = str(problem)
    else:
        why = err["msg"][:1].lower() + err["msg"][1:]
    return path, why


def _why_not_json(raw: bytes | str, exc: orjson.JSONDecodeError) -> str:
    # orjson does not say where bad UTF-8 is; find it, but only on this (rare) error path.
    if isinstance(raw, bytes):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return f"not valid UTF-8 at byte {bad.start}"
    return f"not JSON: {exc}"
