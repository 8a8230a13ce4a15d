"""What the service answered a user: the request ids it answered (deduplication) and its recent impressions.

Queries are delivered at least once: after a worker failure the partition's uncommitted queries come again,
to whichever worker now owns it. The answered request ids therefore live in a changelog-backed table keyed
by user (queries are user-keyed, so the table is co-partitioned with them): the worker that takes the
partition over recovers the table first and skips what was already answered. The queries agent writes this
record and publishes the recommendation in one synchronous step (both are queued on the same producer, no
await in between), and Faust flushes that producer before it commits offsets: so a query is either answered
and marked, or neither and redelivered.

Impressions (the instruction the model saw, its candidates, the served order, the version that scored it)
let the clicks agent turn a click that follows a recommendation into a feedback example (`feedback_for`),
and score the answer against what the user did next (`streams.state.prequential`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import orjson

from instructrec.events import ClickEvent, FeedbackEvent

log = logging.getLogger(__name__)

TABLE = "served"
POSITIVE_RATING = (
    4.0  # as in training synthesis: rated at or above is liked, at or below NEGATIVE is disliked
)
NEGATIVE_RATING = 2.0


@dataclass(frozen=True)
class Impression:
    request_id: str
    instruction: str  # the rendered instruction text the model scored ("" when no model ranked the answer)
    candidates: tuple[str, ...]  # in the order the instruction presented them
    served: tuple[str, ...]  # the answer, best first
    template_id: str
    model_version: str | None
    ts: float = 0.0  # when the query was made (event time)
    intention: str | None = None  # the request's text
    scored: bool = False  # already scored against the user's next interaction (prequential)


@dataclass
class Served:
    answered: list[str] = field(default_factory=list)  # request ids, oldest first
    impressions: list[Impression] = field(default_factory=list)  # oldest first

    def has_answered(self, request_id: str) -> bool:
        return request_id in self.answered

    def record(
        self, request_id: str, impression: Impression | None, *, answered: int, impressions: int
    ) -> None:
        if request_id not in self.answered:
            self.answered.append(request_id)
            del self.answered[: max(0, len(self.answered) - answered)]
        if impression is not None and impressions > 0:
            self.impressions = [i for i in self.impressions if i.request_id != request_id]
            self.impressions.append(impression)
            del self.impressions[: max(0, len(self.impressions) - impressions)]

    def impression(self, request_id: str) -> Impression | None:
        return next((i for i in reversed(self.impressions) if i.request_id == request_id), None)

    def to_score(self, click_ts: float, request_id: str | None) -> Impression | None:
        """The answer a click judges: the one it names, else the latest answer made before it; None when
        that answer was already scored."""
        found = self.impression(request_id) if request_id else None
        if found is None:
            found = next((i for i in reversed(self.impressions) if i.ts <= click_ts), None)
        return found if found is not None and not found.scored else None

    def mark_scored(self, request_id: str) -> None:
        self.impressions = [
            Impression(*[getattr(i, f) for f in _FIELDS[:-1]], True) if i.request_id == request_id else i
            for i in self.impressions
        ]

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "a": self.answered,
                "i": [[getattr(i, f) for f in _FIELDS] for i in self.impressions],
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> Served:
        if not raw:
            return cls()
        try:
            data = orjson.loads(raw)
            impressions = [_impression(row) for row in data.get("i", [])]
            return cls(answered=[str(r) for r in data.get("a", [])], impressions=impressions)
        except (orjson.JSONDecodeError, TypeError, ValueError) as error:
            log.error("unreadable served record (%s); starting from an empty one", error)
            return cls()


_FIELDS = (
    "request_id",
    "instruction",
    "candidates",
    "served",
    "template_id",
    "model_version",
    "ts",
    "intention",
    "scored",
)


def _impression(row: list) -> Impression:
    """A stored impression (older records lack the trailing fields)."""
    r, text, candidates, served, template, version, *rest = row
    ts, intention, scored = (rest + [0.0, None, False][len(rest) :])[:3]
    return Impression(
        str(r),
        str(text),
        tuple(candidates),
        tuple(served),
        str(template),
        version,
        float(ts),
        intention,
        bool(scored),
    )


def feedback_for(click: ClickEvent, impression: Impression) -> FeedbackEvent | None:
    """A training example from a click on a served list, or None when the click says nothing.

    Positive: a click, a purchase, an unrated review, or a rating (or rated review) ≥ 4 — and then the items served
    above it that the user passed over are negatives (the "skip-above" rule: they were seen and not chosen).
    Negative: a dislike or a rating ≤ 2. A middling rating, or an item that was not among the candidates,
    gives nothing.
    """
    item = click.item_id
    if item not in impression.candidates or not impression.instruction:
        return None
    rating = click.rating
    if click.kind == "dislike" or (rating is not None and rating <= NEGATIVE_RATING):
        positives, negatives = (), (item,)
    elif click.kind in ("click", "purchase", "review") or (rating is not None and rating >= POSITIVE_RATING):
        if rating is not None and rating < POSITIVE_RATING:
            return None
        above = impression.served[: impression.served.index(item)] if item in impression.served else ()
        positives, negatives = (item,), tuple(i for i in above if i != item)
    else:
        return None
    return FeedbackEvent(
        user_id=click.user_id,
        request_id=impression.request_id,
        instruction=impression.instruction,
        candidate_item_ids=impression.candidates,
        positive_item_ids=positives,
        negative_item_ids=negatives,
        template_id=impression.template_id,
        model_version=impression.model_version,
        intention=impression.intention,
        ts=click.ts,
    )
