"""The one in-memory form every loader produces and every model consumes.

Items and users are renumbered densely (0..n-1) so models can index arrays; the original ids are kept for
output. Each user's interactions are time-ordered, ties broken by item id (91 users of ml-latest-small rate
their last two movies in the same second; a stable, documented order keeps the split reproducible).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Nouns:
    """How instructions name a catalogue's items and what users do with them: movies are "watched" by a
    "viewer", games "played" by a "player", products "bought" by a "shopper". Templates and synthesised
    requests take their words from here, so one model family serves any catalogue."""

    item: str = "movie"
    items: str = "movies"
    did: str = "watched"  # past tense and participle: "the user has watched"
    do: str = "watch"  # infinitive: "would they want to watch"
    person: str = "viewer"
    activity: str = "viewing"  # "viewing history"

    @classmethod
    def named(cls, kind: str) -> Nouns:
        """A preset by catalogue kind: movie(s), game(s), product(s), article(s), book(s), item(s)."""
        key = kind.lower().rstrip("s")
        if key not in CATALOGUES:
            raise ValueError(
                f"unknown catalogue kind {kind!r}; choose one of {sorted(CATALOGUES)} or build Nouns"
            )
        return CATALOGUES[key]


CATALOGUES: dict[str, Nouns] = {
    "movie": Nouns(),
    "game": Nouns("game", "games", "played", "play", "player", "playing"),
    "product": Nouns("product", "products", "bought", "buy", "shopper", "shopping"),
    "article": Nouns("article", "articles", "read", "read", "reader", "reading"),
    "book": Nouns("book", "books", "read", "read", "reader", "reading"),
    "item": Nouns("item", "items", "chose", "choose", "user", "browsing"),
}
MOVIES = CATALOGUES["movie"]


@dataclass(frozen=True, slots=True)
class Item:
    id: str  # the source's item id
    title: str  # without the year, e.g. "Toy Story"
    year: int | None
    genres: tuple[str, ...]
    tags: tuple[str, ...] = ()  # free-text tags users put on it, most frequent first

    @property
    def display_title(self) -> str:
        return f"{self.title} ({self.year})" if self.year else self.title


def item_text(item: Item, max_tags: int = 5) -> str:
    """What an item reads as for a text encoder (the text retriever, the catalogue's Qdrant vectors): its title
    and year, genres and most frequent tags."""
    text = f"{item.display_title}."
    if item.genres:
        text += f" Genres: {', '.join(item.genres)}."
    if item.tags:
        text += f" Tags: {', '.join(item.tags[:max_tags])}."
    return text


@dataclass(frozen=True, slots=True)
class Interaction:
    item: int  # dense item index
    timestamp: int
    rating: float | None = None
    tags: tuple[str, ...] = ()  # what this user wrote about this item


@dataclass(slots=True)
class Dataset:
    name: str
    items: list[Item]
    users: list[str]  # dense user index -> source user id
    histories: list[list[Interaction]]  # per dense user, time-ordered
    nouns: Nouns = MOVIES  # how instructions name the catalogue's items
    _item_index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.users) != len(self.histories):
            raise ValueError(f"{len(self.users)} users but {len(self.histories)} histories")
        self._item_index = {item.id: i for i, item in enumerate(self.items)}

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_interactions(self) -> int:
        return sum(len(h) for h in self.histories)

    def item_index(self, item_id: str) -> int:
        return self._item_index[item_id]

    def sequence(self, user: int) -> list[int]:
        return [x.item for x in self.histories[user]]

    @property
    def categories(self) -> list[str]:
        """Every category (genre) label of the catalogue, most common first."""
        counts: dict[str, int] = {}
        for item in self.items:
            for genre in item.genres:
                counts[genre] = counts.get(genre, 0) + 1
        return sorted(counts, key=lambda g: (-counts[g], g))

    def describe(self) -> dict:
        lengths = sorted(len(h) for h in self.histories)
        return {
            "dataset": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "mean_length": round(self.n_interactions / max(1, self.n_users), 1),
            "median_length": lengths[len(lengths) // 2] if lengths else 0,
        }


def sort_history(history: Sequence[Interaction], items: Sequence[Item]) -> list[Interaction]:
    """Time order; equal timestamps ordered by the source item id (numerically where it is a number)."""

    def key(x: Interaction):
        item_id = items[x.item].id
        return (x.timestamp, (0, int(item_id), "") if item_id.isdigit() else (1, 0, item_id))

    return sorted(history, key=key)
