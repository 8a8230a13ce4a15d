"""The catalogue as the method sees it: every trained item's attributes in arrays over the retriever's rows,
so that a request's constraints become one vectorised mask, and the words a candidate is shown with.

Offline it comes from the `Dataset`; the offline pipeline saves it beside the retrievers
(`Artifacts.catalogue`) and the stream loads that file, so both filter, describe and explain the same items
the same way. Items that arrive after training (new in the items topic) are not here: the stream knows them
from Qdrant's payload, and `describe` takes the same fields.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from instructrec.data.dataset import MOVIES, Dataset, Item, Nouns

SEPARATOR = " · "
DESCRIBED_TAGS = 3  # tags a candidate is shown with (the token budget cuts further)


def describe(title: str, categories: Sequence[str] = (), tags: Sequence[str] = ()) -> str:
    """How a candidate reads to the reranker: its title (with the year), categories and a few tags —
    the attributes requests talk about — most important first, so a token budget cuts tags before genres."""
    parts = [title]
    if categories:
        parts.append(", ".join(c.lower() for c in categories))
    if tags:
        parts.append(", ".join(tags[:DESCRIBED_TAGS]))
    return SEPARATOR.join(parts)


@dataclass
class Catalogue:
    item_ids: list[str]
    titles: list[str]  # display titles, with the year: "Heat (1995)"
    years: np.ndarray  # int32, -1 when unknown
    genres: list[tuple[str, ...]]
    tags: list[tuple[str, ...]]
    nouns: Nouns = MOVIES
    categories: list[str] = field(init=False)  # every label, most common first
    genre_matrix: np.ndarray = field(init=False)  # bool [items × categories]
    rows: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        counts: dict[str, int] = {}
        for genres in self.genres:
            for genre in genres:
                counts[genre] = counts.get(genre, 0) + 1
        self.categories = sorted(counts, key=lambda g: (-counts[g], g))
        column = {c: j for j, c in enumerate(self.categories)}
        self.genre_matrix = np.zeros((len(self.item_ids), len(self.categories)), dtype=bool)
        for row, genres in enumerate(self.genres):
            self.genre_matrix[row, [column[g] for g in genres]] = True
        self.years = np.asarray(self.years, dtype=np.int32)
        self.rows = {item_id: row for row, item_id in enumerate(self.item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def empty(cls, nouns: Nouns = MOVIES) -> Catalogue:
        """No trained items (a stream without a trained pipeline: every candidate comes from Qdrant)."""
        return cls([], [], np.zeros(0, dtype=np.int32), [], [], nouns)

    @classmethod
    def from_dataset(cls, dataset: Dataset, max_tags: int = 5) -> Catalogue:
        items = dataset.items
        return cls(
            item_ids=[i.id for i in items],
            titles=[i.display_title for i in items],
            years=np.array([i.year if i.year is not None else -1 for i in items], dtype=np.int32),
            genres=[tuple(i.genres) for i in items],
            tags=[tuple(i.tags[:max_tags]) for i in items],
            nouns=dataset.nouns,
        )

    def year(self, row: int) -> int | None:
        year = int(self.years[row])
        return year if year >= 0 else None

    def items(self) -> list[Item]:
        """The catalogue as dataset items (what request synthesis reads: title, year, genres, tags)."""
        out = []
        for row, item_id in enumerate(self.item_ids):
            year = self.year(row)
            title = self.titles[row]
            if year is not None and title.endswith(f" ({year})"):
                title = title[: -len(f" ({year})")]
            out.append(Item(item_id, title, year, self.genres[row], self.tags[row]))
        return out

    def as_dataset(self, name: str = "catalogue") -> Dataset:
        """A dataset of these items and no users: enough to synthesise requests about them."""
        return Dataset(name, self.items(), [], [], nouns=self.nouns)

    def describe(self, row: int) -> str:
        return describe(self.titles[row], self.genres[row], self.tags[row])

    def columns(self, categories: frozenset[str]) -> list[int]:
        return [j for j, c in enumerate(self.categories) if c in categories]

    # -- persistence

    def save(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps(
                {
                    "item_ids": self.item_ids,
                    "titles": self.titles,
                    "years": self.years.tolist(),
                    "genres": self.genres,
                    "tags": self.tags,
                    "nouns": asdict(self.nouns),
                }
            )
        )

    @classmethod
    def load(cls, path: str | Path) -> Catalogue:
        raw = json.loads(Path(path).read_text())
        return cls(
            item_ids=[str(i) for i in raw["item_ids"]],
            titles=list(raw["titles"]),
            years=np.asarray(raw["years"], dtype=np.int32),
            genres=[tuple(g) for g in raw["genres"]],
            tags=[tuple(t) for t in raw["tags"]],
            nouns=Nouns(**raw.get("nouns", {})),
        )
