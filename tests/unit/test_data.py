"""Loaders on the real shared data, k-core filtering, title repair, tie order, the split, readable errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from instructrec.data import (
    DataFormatError,
    Dataset,
    Interaction,
    Item,
    LeaveOneOut,
    k_core,
    load,
    load_movielens,
    load_recbole,
)
from instructrec.data.titles import parse_title
from workers.fetch import fetch_movielens

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


@pytest.fixture(scope="module")
def ml_small_raw() -> Dataset:
    return load_movielens(DATA / "ml-latest-small")


@pytest.fixture(scope="module")
def ml_small(ml_small_raw: Dataset) -> Dataset:
    return k_core(ml_small_raw, 5)


@pytest.fixture(scope="module")
def ml_100k_raw() -> Dataset:
    return load_recbole(DATA / "ml-100k", "ml-100k")


def by_id(dataset: Dataset, item_id: str) -> Item:
    return dataset.items[dataset.item_index(item_id)]


# ---- titles ----


@pytest.mark.parametrize(
    ("raw", "title", "year"),
    [
        ("Toy Story (1995)", "Toy Story", 1995),
        ("Matrix, The (1999)", "The Matrix", 1999),
        ("Shawshank Redemption, The", "The Shawshank Redemption", None),
        ("Fish Called Wanda, A (1988)", "A Fish Called Wanda", 1988),
        ("American Werewolf in London, An (1981)", "An American Werewolf in London", 1981),
        (
            "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
            "The City of Lost Children (La Cité des enfants perdus)",
            1995,
        ),
        (
            "Good, the Bad and the Ugly, The (Buono, il brutto, il cattivo, Il) (1966)",
            "The Good, the Bad and the Ugly (Il Buono, il brutto, il cattivo)",
            1966,
        ),
        ("Avventura, L' (Adventure, The) (1960)", "L'Avventura (The Adventure)", 1960),
        ("Seven (a.k.a. Se7en) (1995)", "Seven (a.k.a. Se7en)", 1995),
        ("Sam, I Am (2001)", "Sam, I Am", 2001),  # an article only moves from the end of a title
        ("Death Note: Desu nôto (2006–2007)", "Death Note: Desu nôto", 2006),
        ("Babylon 5 ", "Babylon 5", None),
    ],
)
def test_titles_are_repaired(raw: str, title: str, year: int | None) -> None:
    assert parse_title(raw) == (title, year)


# ---- ml-latest-small ----


@needs_data
def test_movielens_raw_counts_and_items(ml_small_raw: Dataset) -> None:
    assert (ml_small_raw.n_users, ml_small_raw.n_items, ml_small_raw.n_interactions) == (610, 9742, 100836)
    toy = by_id(ml_small_raw, "1")
    assert (toy.title, toy.year, toy.genres) == (
        "Toy Story",
        1995,
        ("Adventure", "Animation", "Children", "Comedy", "Fantasy"),
    )
    assert by_id(ml_small_raw, "2571").title == "The Matrix"
    assert not any("(no genres listed)" in item.genres for item in ml_small_raw.items)
    assert sum(1 for item in ml_small_raw.items if not item.genres) == 34


@needs_data
def test_movielens_tags(ml_small_raw: Dataset) -> None:
    step_brothers = by_id(ml_small_raw, "60756")
    # Most users first; lower-cased ("Highly quotable"), deduplicated, capped.
    assert step_brothers.tags[:2] == ("funny", "will ferrell")
    assert "highly quotable" in step_brothers.tags
    assert all(
        len(item.tags) <= 10 and item.tags == tuple(dict.fromkeys(item.tags)) for item in ml_small_raw.items
    )
    assert all(t == t.lower() for item in ml_small_raw.items for t in item.tags)
    # The user's own tags sit on their rating of that movie, in the order written.
    user = ml_small_raw.users.index("2")
    rating = next(x for x in ml_small_raw.histories[user] if x.item == ml_small_raw.item_index("60756"))
    assert rating.tags == ("will ferrell", "funny", "highly quotable")
    # 1,775 (user, movie) pairs carry tags; 1,635 of them are ratings. The rest are not interactions.
    assert sum(1 for h in ml_small_raw.histories for x in h if x.tags) == 1635


@needs_data
def test_movielens_five_core(ml_small: Dataset) -> None:
    assert (ml_small.n_users, ml_small.n_items, ml_small.n_interactions) == (610, 3650, 90274)
    assert ml_small.describe()["mean_length"] == 148.0
    assert ml_small.describe()["median_length"] == 68
    counts = [0] * ml_small.n_items
    for history in ml_small.histories:
        assert len(history) >= 5
        for x in history:
            counts[x.item] += 1
    assert min(counts) >= 5  # dense: every index 0..n-1 is used


@needs_data
def test_ties_are_ordered_by_item_id(ml_small: Dataset) -> None:
    tied_last = 0
    for history in ml_small.histories:
        assert [x.timestamp for x in history] == sorted(x.timestamp for x in history)
        for a, b in itertools.pairwise(history):
            if a.timestamp == b.timestamp:
                assert int(ml_small.items[a.item].id) < int(ml_small.items[b.item].id)
        tied_last += history[-1].timestamp == history[-2].timestamp
    assert tied_last == 91


@needs_data
def test_leave_one_out(ml_small: Dataset) -> None:
    split = LeaveOneOut(ml_small)
    for user in range(0, ml_small.n_users, 7):
        seq = ml_small.sequence(user)
        assert split.target(user, "test") == seq[-1]
        assert split.target(user, "valid") == seq[-2]
        assert [x.item for x in split.history(user, "test")] == seq[:-1]
        assert [x.item for x in split.history(user, "valid")] == seq[:-2]
        assert [x.item for x in split.train(user)] == seq[:-2]
    assert len(split.targets("test")) == ml_small.n_users
    with pytest.raises(ValueError, match="fewer than 3"):
        LeaveOneOut(tiny_dataset([[1, 2]]))


# ---- ml-100k ----


@needs_data
def test_recbole_ml_100k(ml_100k_raw: Dataset) -> None:
    assert (ml_100k_raw.n_users, ml_100k_raw.n_items, ml_100k_raw.n_interactions) == (943, 1682, 100000)
    assert by_id(ml_100k_raw, "64").title == "The Shawshank Redemption"
    assert by_id(ml_100k_raw, "64").year == 1994
    assert by_id(ml_100k_raw, "1").genres == ("Animation", "Children's", "Comedy")
    assert by_id(ml_100k_raw, "1412").year == 1995  # release_year "V": the year comes from the title
    assert by_id(ml_100k_raw, "267").genres == ()  # "unknown" is no genre
    filtered = k_core(ml_100k_raw, 5)
    assert (filtered.n_users, filtered.n_items, filtered.n_interactions) == (943, 1349, 99287)


@needs_data
def test_load_by_name(ml_100k_raw: Dataset) -> None:
    assert load("ml-100k", root=DATA).describe() == k_core(ml_100k_raw, 5).describe()


def test_load_by_path_and_errors(tmp_path: Path) -> None:
    rows = "".join(f"{u}\t{i}\t{t}\n" for u in "12" for t, i in enumerate("abc"))
    write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n" + rows)
    assert load(tmp_path / "x.inter", k=2).n_interactions == 6
    assert load(tmp_path, k=3).n_users == 0
    (tmp_path / "csv").mkdir()
    write(tmp_path / "csv" / "movies.csv", "movieId,title,genres\n1,A (2000),Drama\n")
    write(tmp_path / "csv" / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,10\n")
    assert load(tmp_path / "csv", k=0).n_interactions == 1
    with pytest.raises(ValueError, match="root"):
        load("ml-latest-small")
    with pytest.raises(FileNotFoundError, match="expected under root"):
        load("ml-100k", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        load(tmp_path / "csv" / "nothing")


# ---- k-core on small handmade data ----


def tiny_dataset(sequences: list[list[int]], n_items: int | None = None) -> Dataset:
    n_items = n_items or max(i for s in sequences for i in s) + 1
    items = [Item(str(i), f"movie {i}", 2000, ("Drama",)) for i in range(n_items)]
    histories = [[Interaction(i, t) for t, i in enumerate(s)] for s in sequences]
    return Dataset("tiny", items, [str(u) for u in range(len(sequences))], histories)


def test_k_core_iterates_until_stable() -> None:
    # User 3 goes first; then item 3 has one interaction, then user 2 one, then item 2 one.
    data = tiny_dataset([[0, 1], [0, 1, 2], [2, 3], [3]], n_items=5)
    core = k_core(data, 2)
    assert core.users == ["0", "1"]
    assert [item.id for item in core.items] == ["0", "1"]
    assert [core.sequence(u) for u in range(core.n_users)] == [[0, 1], [0, 1]]
    assert k_core(data, 1) is data


# ---- readable errors ----


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_movielens_errors_name_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,10\n1,1,great,11\n")
    with pytest.raises(DataFormatError, match=r"ratings\.csv, line 3: rating 'great' is not a valid float"):
        load_movielens(tmp_path)
    write(tmp_path / "ratings.csv", "userId,movieId,stars,timestamp\n1,1,4.0,10\n")
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['rating'\]"):
        load_movielens(tmp_path)
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,4.0,10\n")
    with pytest.raises(DataFormatError, match=r"movieId '2' is not in movies\.csv"):
        load_movielens(tmp_path)
    with pytest.raises(DataFormatError, match="no such file"):
        load_movielens(tmp_path / "missing")


def test_movielens_small_folder_loads(tmp_path: Path) -> None:
    write(
        tmp_path / "movies.csv",
        'movieId,title,genres\n1,"Matrix, The (1999)",Action|Sci-Fi\n2,Nothing (2000),(no genres listed)\n',
    )
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n7,2,4.0,10\n7,1,2.0,10\n")
    write(tmp_path / "tags.csv", "userId,movieId,tag,timestamp\n7,1,Mind-Bending,11\n8,2,lonely,12\n")
    data = load_movielens(tmp_path)
    assert data.items[0] == Item("1", "The Matrix", 1999, ("Action", "Sci-Fi"), ("mind-bending",))
    assert data.items[1].genres == ()
    assert data.users == ["7"]  # user 8 only tagged: not an interaction
    assert [(x.item, x.tags) for x in data.histories[0]] == [
        (0, ("mind-bending",)),
        (1, ()),
    ]  # tie: id 1 first


def test_recbole_errors_and_inter_only(tmp_path: Path) -> None:
    write(tmp_path / "x.inter", "user_id\titem_id:token\n1\t2\n")
    with pytest.raises(DataFormatError, match="line 1: header field 'user_id' is not name:type"):
        load_recbole(tmp_path, "x")
    write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\n")
    with pytest.raises(DataFormatError, match="line 3: expected 3 tab-separated fields, found 2"):
        load_recbole(tmp_path, "x")
    write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tlate\n")
    with pytest.raises(DataFormatError, match="timestamp 'late' is not a valid float"):
        load_recbole(tmp_path, "x")
    write(tmp_path / "x.inter", "user_id:token\ttimestamp:float\n1\t5\n")
    with pytest.raises(DataFormatError, match=r"missing field\(s\) \['item_id'\]"):
        load_recbole(tmp_path, "x")
    with pytest.raises(DataFormatError, match="no such file"):
        load_recbole(tmp_path, "y")
    # No .item file: items get their ids as titles; the .inter file path works as well as the folder.
    write(
        tmp_path / "x.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\tb\t3\t5\n1\ta\t4\t5\n",
    )
    data = load_recbole(tmp_path / "x.inter")
    assert data.name == "x"
    assert [data.items[x.item].id for x in data.histories[0]] == ["a", "b"]
    assert data.histories[0][0].rating == 4.0


def test_fetch_rejects_unknown_release(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown MovieLens release"):
        fetch_movielens("ml-nope", tmp_path)
