"""MovieLens in GroupLens' csv layout (ml-latest-small, ml-latest, ml-20m/25m/32m): movies.csv, ratings.csv and
an optional tags.csv.

Every movie in movies.csv becomes an item (k-core filtering drops the unrated ones later). Every rating is
an interaction; a tag is attached to the interaction of the user who wrote it on that movie, and a tag
without a rating is not an interaction. Item tags aggregate all of tags.csv: the tags most users agree on
describe a movie best, so they come first.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

from instructrec.data.dataset import Dataset, Interaction, Item, sort_history
from instructrec.data.source import DataFormatError, column_indices, numeric_first, parse_field, require_file
from instructrec.data.titles import parse_title

NO_GENRES = "(no genres listed)"


def load_movielens(path: str | Path, *, max_item_tags: int = 10, name: str | None = None) -> Dataset:
    """Load a MovieLens csv folder into a `Dataset` (all users and movies, no filtering)."""
    folder = Path(path)
    hint = "download it with `instructrec fetch` or from https://grouplens.org/datasets/movielens/"
    items, item_index = _read_movies(require_file(folder / "movies.csv", hint))
    user_tags, tag_users = _read_tags(folder / "tags.csv", item_index)
    histories = _read_ratings(require_file(folder / "ratings.csv", hint), item_index, user_tags)

    items = [
        Item(item.id, item.title, item.year, item.genres, _top_tags(tag_users.get(i), max_item_tags))
        for i, item in enumerate(items)
    ]
    users = sorted(histories, key=numeric_first)
    return Dataset(
        name=name or folder.name,
        items=items,
        users=users,
        histories=[sort_history(histories[u], items) for u in users],
    )


def _rows(path: Path, columns: tuple[str, ...]):
    """(line number, {column: value}) for each data row, checking the header and each row's width."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(path, "empty file")
        at = column_indices(path, header, columns)
        width = max(at.values()) + 1
        for row in reader:
            if not row:
                continue
            if len(row) < width:
                raise DataFormatError(
                    path, f"expected {len(header)} fields, found {len(row)}", reader.line_num
                )
            yield reader.line_num, {name: row[i] for name, i in at.items()}


def _read_movies(path: Path) -> tuple[list[Item], dict[str, int]]:
    items: list[Item] = []
    for _, row in _rows(path, ("movieId", "title", "genres")):
        title, year = parse_title(row["title"])
        genres = () if row["genres"] == NO_GENRES else tuple(g for g in row["genres"].split("|") if g)
        items.append(Item(row["movieId"], title, year, genres))
    return items, {item.id: i for i, item in enumerate(items)}


def _read_tags(path: Path, item_index: dict[str, int]):
    """Per (user, movie) the user's tags in the order written; per item, the users behind each tag."""
    user_tags: dict[tuple[str, str], list[str]] = defaultdict(list)
    tag_users: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    if not path.is_file():  # tags are optional: ml-20m and later ship them, exports may not
        return user_tags, tag_users
    rows = sorted(
        (parse_field(path, line, "timestamp", r["timestamp"], int), line, r)
        for line, r in _rows(path, ("userId", "movieId", "tag", "timestamp"))
    )
    for _, _, row in rows:
        tag = " ".join(row["tag"].lower().split())
        if not tag or row["movieId"] not in item_index:
            continue
        mine = user_tags[row["userId"], row["movieId"]]
        if tag not in mine:
            mine.append(tag)
        tag_users[item_index[row["movieId"]]][tag].add(row["userId"])
    return user_tags, tag_users


def _top_tags(users_by_tag: dict[str, set[str]] | None, limit: int) -> tuple[str, ...]:
    if not users_by_tag:
        return ()
    counts = Counter({tag: len(users) for tag, users in users_by_tag.items()})
    return tuple(tag for tag, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit])


def _read_ratings(path: Path, item_index: dict[str, int], user_tags) -> dict[str, list[Interaction]]:
    histories: dict[str, list[Interaction]] = defaultdict(list)
    for line, row in _rows(path, ("userId", "movieId", "rating", "timestamp")):
        movie = row["movieId"]
        if movie not in item_index:
            raise DataFormatError(path, f"movieId {movie!r} is not in movies.csv", line)
        histories[row["userId"]].append(
            Interaction(
                item=item_index[movie],
                timestamp=parse_field(path, line, "timestamp", row["timestamp"], int),
                rating=parse_field(path, line, "rating", row["rating"], float),
                tags=tuple(user_tags.get((row["userId"], movie), ())),
            )
        )
    return histories
