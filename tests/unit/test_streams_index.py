"""The Qdrant adapter on embedded storage (in-process, a temporary folder): schema, upserts, searches with
client-side exclusion and filters, lookups, and retries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from instructrec.adapters.qdrant import (
    CF,
    TEXT,
    AsyncItemIndex,
    CandidateFilter,
    IndexedItem,
    IndexUnavailable,
    ItemIndex,
    SchemaMismatch,
    point_id,
)
from instructrec.config import QdrantSettings

N = 60


def unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory):
    settings = QdrantSettings(path=tmp_path_factory.mktemp("qdrant"), upsert_batch=16, max_fetch=200)
    rng = np.random.default_rng(0)
    with ItemIndex(settings, text_dim=16, cf_dim=4) as idx:
        assert idx.ensure_collection() is True
        assert idx.ensure_collection() is False  # idempotent
        items = [
            IndexedItem(
                f"i{n}",
                f"Title {n}",
                ("Comedy",) if n % 3 == 0 else ("Drama",),
                1950 + n,
                unit(rng, 16) * 3.0,
                rng.normal(size=4) if n % 2 == 0 else None,
            )
            for n in range(N)
        ]
        assert idx.upsert(items) == N
        idx.items = items  # for the tests' own expectations
        yield idx


def test_point_ids_are_stable_uuids() -> None:
    assert point_id("318") == point_id("318") != point_id("319")


def test_text_search_is_cosine_and_excludes_ids_client_side(index: ItemIndex) -> None:
    query = index.items[5].text_vector
    hits = index.search(TEXT, query * 10, 5)  # the scale of a query does not matter
    assert hits[0].item_id == "i5" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].title == "Title 5" and hits[0].year == 1955
    excluded = frozenset({h.item_id for h in hits[:3]})
    again = index.search(TEXT, query, 5, CandidateFilter(exclude_ids=excluded))
    assert len(again) == 5 and not excluded & {h.item_id for h in again}
    assert [h.item_id for h in again][:2] == [h.item_id for h in hits[3:5]]


def test_cf_search_only_finds_items_with_a_collaborative_vector(index: ItemIndex) -> None:
    hits = index.search(CF, np.ones(4), 50)
    assert len(hits) == N // 2 and all(int(h.item_id[1:]) % 2 == 0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_payload_filters_are_applied_and_a_selective_one_widens_the_fetch(index: ItemIndex) -> None:
    comedies = CandidateFilter(categories=frozenset({"Comedy"}), year_min=1960)
    hits = index.search(TEXT, index.items[0].text_vector, 8, comedies)
    assert len(hits) == 8
    assert all("Comedy" in h.categories and h.year >= 1960 for h in hits)
    rare = CandidateFilter(year_min=2005, year_max=2008)  # 4 of 60 items
    assert sorted(h.year for h in index.search(TEXT, index.items[0].text_vector, 10, rare)) == [
        2005,
        2006,
        2007,
        2008,
    ]


def test_lookup_returns_payload_and_vectors(index: ItemIndex) -> None:
    found = index.lookup(["i2", "i3", "missing"], vectors=(TEXT, CF))
    assert set(found) == {"i2", "i3"}
    hit, vectors = found["i2"]
    assert hit.title == "Title 2" and hit.categories == ("Drama",)
    assert np.allclose(vectors[TEXT], index.items[2].text_vector / 3.0, atol=1e-5)  # stored normalised
    assert CF in vectors and CF not in found["i3"][1]
    assert index.count() == N


def test_a_reindexed_item_replaces_its_point(index: ItemIndex) -> None:
    item = index.items[7]
    index.upsert([IndexedItem(item.item_id, "Renamed", item.categories, item.year, item.text_vector)])
    assert index.lookup(["i7"])["i7"][0].title == "Renamed" and index.count() == N


def test_failures_are_retried_with_backoff_then_reported(tmp_path: Path) -> None:
    delays: list[float] = []
    idx = ItemIndex(QdrantSettings(path=tmp_path, retries=2, backoff_s=0.01), sleep=delays.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "ok"

    assert idx._call("test", flaky) == "ok" and len(delays) == 2
    assert 0 <= delays[0] <= 0.01 and 0 <= delays[1] <= 0.02  # full jitter under a doubling bound

    def down():
        raise ConnectionError("refused")

    with pytest.raises(IndexUnavailable, match="after 3 attempt"):
        idx._call("search", down)


def test_a_collection_with_other_vector_sizes_is_refused(tmp_path: Path) -> None:
    settings = QdrantSettings(path=tmp_path)
    with ItemIndex(settings, text_dim=8, cf_dim=4) as idx:
        idx.ensure_collection()
    with ItemIndex(settings, text_dim=8, cf_dim=64) as idx, pytest.raises(SchemaMismatch, match="expected"):
        idx.ensure_collection()


async def test_the_async_wrapper_runs_searches_off_the_event_loop(index: ItemIndex) -> None:
    wrapper = AsyncItemIndex(index)
    results = await wrapper.search_many(
        [(TEXT, index.items[1].text_vector, 3, CandidateFilter()), (CF, np.ones(4), 2, CandidateFilter())]
    )
    assert [len(r) for r in results] == [3, 2] and results[0][0].item_id == "i1"
    assert await wrapper.count() == N
