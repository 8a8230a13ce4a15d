"""RecBole atomic files: `<name>.inter` (required) and `<name>.item` (optional), tab-separated with typed
headers `field:type` (token, token_seq, float, float_seq; sequences are space-separated).

Known field names are mapped onto `Item`; ml-100k writes titles MovieLens-style ("Shawshank Redemption, The"),
so the same title repair applies. Items that only appear in `.inter` get their id as a title.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from instructrec.data.dataset import CATALOGUES, MOVIES, Dataset, Interaction, Item, sort_history
from instructrec.data.source import DataFormatError, numeric_first, parse_field, require_file
from instructrec.data.titles import parse_title


def float_seq(value: str) -> list[float]:
    return [float(x) for x in value.split()]


TYPES = {"token": str, "token_seq": str.split, "float": float, "float_seq": float_seq}
# Field names used by RecBole's converted datasets, first match wins.
TITLE_FIELDS = ("movie_title", "title", "name")
YEAR_FIELDS = ("release_year", "year")
GENRE_FIELDS = ("class", "genre", "genres", "categories")
TAG_FIELDS = ("tags", "tag")
UNKNOWN = {"unknown", "unkonwn", ""}  # ml-100k marks missing values this way, typo included


def load_recbole(path_or_dir: str | Path, name: str | None = None) -> Dataset:
    """Load `<dir>/<name>.inter` (+ `.item`); `path_or_dir` may also be the `.inter` file itself."""
    path = Path(path_or_dir)
    if path.suffix == ".inter":
        folder, name = path.parent, name or path.stem
    else:
        folder, name = path, name or path.name
    inter = require_file(folder / f"{name}.inter", "a RecBole atomic dataset needs <name>.inter")
    item_file = folder / f"{name}.item"
    items, is_movies = _read_items(item_file) if item_file.is_file() else ([], False)
    item_index = {item.id: i for i, item in enumerate(items)}

    histories: dict[str, list[Interaction]] = defaultdict(list)
    extra: list[str] = []  # item ids seen only in .inter
    for line, row in _read_atomic(inter, required=("user_id", "item_id")):
        user, item = row["user_id"], row["item_id"]
        if not user or not item:
            raise DataFormatError(inter, "empty user_id or item_id", line)
        if item not in item_index:
            item_index[item] = len(items) + len(extra)
            extra.append(item)
        rating = row.get("rating")
        histories[user].append(
            Interaction(
                item=item_index[item],
                timestamp=int(_number(inter, line, "timestamp", row.get("timestamp", 0.0))),
                rating=None if rating is None else _number(inter, line, "rating", rating),
                tags=_tokens(row.get("tags")),
            )
        )
    items += [Item(id=i, title=i, year=None, genres=()) for i in extra]

    users = sorted(histories, key=numeric_first)
    return Dataset(
        name=name,
        items=items,
        users=users,
        histories=[sort_history(histories[u], items) for u in users],
        nouns=MOVIES if is_movies else CATALOGUES["item"],
    )


def _read_atomic(path: Path, required: tuple[str, ...]):
    """(line number, {field: typed value}) per row; header fields are `name:type`."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if not header:
            raise DataFormatError(path, "empty file")
        fields = []
        for column in header:
            field, _, kind = column.partition(":")
            if kind not in TYPES:
                raise DataFormatError(
                    path, f"header field {column!r} is not name:type with type one of {list(TYPES)}", line=1
                )
            fields.append((field, kind))
        names = [field for field, _ in fields]
        missing = [field for field in required if field not in names]
        if missing:
            raise DataFormatError(path, f"missing field(s) {missing}; the header has {header}", line=1)
        converters = [(field, TYPES[kind]) for field, kind in fields]
        for row in reader:
            if not row:
                continue
            if len(row) != len(fields):
                raise DataFormatError(
                    path, f"expected {len(fields)} tab-separated fields, found {len(row)}", reader.line_num
                )
            try:
                typed = {
                    field: convert(value) for (field, convert), value in zip(converters, row, strict=True)
                }
            except ValueError:  # find the field at fault, for the message
                for (field, convert), value in zip(converters, row, strict=True):
                    parse_field(path, reader.line_num, field, value, convert)
                raise
            yield reader.line_num, typed


def _read_items(path: Path) -> tuple[list[Item], bool]:
    """The items, and whether they are movies (a `movie_title` field, as RecBole's MovieLens conversions)."""
    items = []
    movies = False
    for _, row in _read_atomic(path, required=("item_id",)):
        movies = movies or "movie_title" in row
        raw_title = _first(row, TITLE_FIELDS)
        raw_title = " ".join(raw_title) if isinstance(raw_title, list) else raw_title
        title, title_year = parse_title(raw_title) if raw_title else (row["item_id"], None)
        year = _year(_first(row, YEAR_FIELDS)) or title_year
        genres = tuple(g for g in _tokens(_first(row, GENRE_FIELDS)) if g.lower() not in UNKNOWN)
        items.append(Item(row["item_id"], title, year, genres, _tokens(_first(row, TAG_FIELDS))))
    return items, movies


def _number(path: Path, line: int, name: str, value) -> float:
    """Some exports type rating and timestamp as tokens: convert what was read."""
    return value if isinstance(value, float) else parse_field(path, line, name, str(value), float)


def _first(row: dict, names: tuple[str, ...]):
    return next((row[n] for n in names if n in row), None)


def _tokens(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _year(value) -> int | None:
    """A 4-digit year, else None (ml-100k has "unkonwn" and, for one title, "V")."""
    if isinstance(value, float):
        value = str(int(value))
    return int(value) if isinstance(value, str) and len(value) == 4 and value.isdigit() else None
