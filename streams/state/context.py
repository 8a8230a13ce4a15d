"""What the service knows about a user: the per-user context held in a changelog-backed Faust table.

`UserContext` is plain data with pure update rules (unit-tested without Kafka):
- recent history: the last `history` distinct items, most recent last (an item seen again moves to the end);
  these are the consumed items a recommendation leaves out;
- explicit preferences, each bounded: ratings (item → stars), dislikes, free-text tags and review snippets;
- the last intention (the text of the user's last query);
- the ids of the last `seen` click events, so a redelivered click changes nothing (at-least-once delivery).
Every list is bounded, so a record stays a few KB however active the user is.

On the wire (the table's changelog) a context is compact JSON; an unreadable record reads as an empty
context rather than stopping the agent (it is logged once per read).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import orjson

from instructrec.config import StreamSettings
from instructrec.data.dataset import Interaction
from instructrec.events import ClickEvent

log = logging.getLogger(__name__)

TABLE = "user-context"
DISLIKE_RATING = (
    1.0  # an explicit dislike reads as a low rating, so the instruction renders it under dislikes
)
REVIEW_SNIPPET_CHARS = (
    80  # a review enters the instruction as a short quote (titles and candidates need room)
)
REVIEW_KEPT_CHARS = 500


@dataclass(frozen=True)
class ContextLimits:
    history: int = 200
    explicit: int = 50
    reviews: int = 10
    seen: int = 512

    @classmethod
    def from_settings(cls, stream: StreamSettings) -> ContextLimits:
        return cls(stream.history_size, stream.explicit_size, stream.reviews_size, stream.seen_events)


@dataclass
class UserContext:
    history: list[tuple[str, float]] = field(default_factory=list)  # (item id, ts), most recent last
    ratings: dict[str, float] = field(default_factory=dict)  # insertion order: most recently rated last
    dislikes: list[str] = field(default_factory=list)
    tags: list[tuple[str, str]] = field(default_factory=list)  # (item id, tag)
    reviews: list[tuple[str, str]] = field(default_factory=list)  # (item id, text)
    intention: str | None = None
    intention_ts: float | None = None
    seen: list[str] = field(default_factory=list)  # click event ids, oldest first
    updated: float = 0.0

    # -- updates

    def apply(self, click: ClickEvent, limits: ContextLimits = ContextLimits()) -> bool:
        """Fold one click into the context; False (and no change) when this event was applied before."""
        if click.event_id in self.seen:
            return False
        _push_bounded(self.seen, click.event_id, limits.seen)
        item = click.item_id
        self.history = [entry for entry in self.history if entry[0] != item]
        self.history.append((item, click.ts))
        del self.history[: max(0, len(self.history) - limits.history)]
        if click.rating is not None:
            self.ratings.pop(item, None)
            self.ratings[item] = click.rating
            while len(self.ratings) > limits.explicit:
                del self.ratings[next(iter(self.ratings))]
        if click.kind == "dislike":
            if item in self.dislikes:
                self.dislikes.remove(item)
            _push_bounded(self.dislikes, item, limits.explicit)
        text = " ".join((click.text or "").split())
        if text and click.kind == "review":
            self.reviews = [r for r in self.reviews if r[0] != item]
            _push_bounded(self.reviews, (item, text[:REVIEW_KEPT_CHARS]), limits.reviews)
        elif text:
            tag = text.lower()
            if (item, tag) not in self.tags:
                _push_bounded(self.tags, (item, tag), limits.explicit)
        self.updated = max(self.updated, click.ts)
        return True

    def note_intention(self, text: str | None, ts: float) -> None:
        if text and text.strip():
            self.intention, self.intention_ts = " ".join(text.split()), ts
            self.updated = max(self.updated, ts)

    # -- reads

    def consumed(self) -> set[str]:
        return {item for item, _ in self.history}

    def recent(self, n: int) -> list[str]:
        """The last `n` items, most recent last."""
        return [item for item, _ in self.history[-n:]] if n > 0 else []

    def interactions(self, index_of: Callable[[str], int], window: int = 100) -> list[Interaction]:
        """The last `window` history items as `Interaction`s (ratings, dislikes and the user's words attached),
        oldest first, with items numbered by `index_of` (request-local dense ints): what
        `request_instruction` reads implicit (P1) and explicit (P2) preferences from."""
        disliked = set(self.dislikes)
        words: dict[str, list[str]] = {}
        for item, tag in self.tags:
            words.setdefault(item, []).append(tag)
        for item, text in self.reviews:
            words.setdefault(item, []).append(review_snippet(text))
        out = []
        for item, ts in self.history[-window:]:
            rating = self.ratings.get(item)
            if item in disliked:
                rating = min(rating, DISLIKE_RATING) if rating is not None else DISLIKE_RATING
            out.append(Interaction(index_of(item), int(ts), rating, tuple(words.get(item, ()))))
        return out

    # -- wire format

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "h": self.history,
                "r": self.ratings,
                "d": self.dislikes,
                "t": self.tags,
                "v": self.reviews,
                "i": self.intention,
                "it": self.intention_ts,
                "s": self.seen,
                "u": self.updated,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> UserContext:
        if not raw:
            return cls()
        try:
            data = orjson.loads(raw)
            return cls(
                history=[(str(i), float(ts)) for i, ts in data.get("h", [])],
                ratings={str(k): float(v) for k, v in data.get("r", {}).items()},
                dislikes=[str(i) for i in data.get("d", [])],
                tags=[(str(i), str(t)) for i, t in data.get("t", [])],
                reviews=[(str(i), str(t)) for i, t in data.get("v", [])],
                intention=data.get("i"),
                intention_ts=data.get("it"),
                seen=[str(e) for e in data.get("s", [])],
                updated=float(data.get("u", 0.0)),
            )
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError) as error:
            log.error("unreadable user context (%s); starting from an empty one", error)
            return cls()

    def describe(self) -> dict:
        """A JSON view for `GET /users/{id}/context`."""
        return {
            "history": [{"item_id": i, "ts": ts} for i, ts in self.history],
            "ratings": self.ratings,
            "dislikes": self.dislikes,
            "tags": [{"item_id": i, "tag": t} for i, t in self.tags],
            "reviews": [{"item_id": i, "text": t} for i, t in self.reviews],
            "intention": self.intention,
            "intention_ts": self.intention_ts,
            "seen_events": len(self.seen),
            "updated": self.updated,
        }


def review_snippet(text: str) -> str:
    """The first sentence of a review, cut to a word boundary within REVIEW_SNIPPET_CHARS."""
    first = text.split(". ")[0].strip()
    if len(first) <= REVIEW_SNIPPET_CHARS:
        return first
    cut = first[:REVIEW_SNIPPET_CHARS].rsplit(" ", 1)[0]
    return cut + "…"


def _push_bounded(items: list, value, bound: int) -> None:
    items.append(value)
    del items[: max(0, len(items) - bound)]


def apply_all(context: UserContext, clicks: Iterable[ClickEvent], limits: ContextLimits) -> int:
    """Fold clicks in order; returns how many were new."""
    return sum(context.apply(click, limits) for click in clicks)
