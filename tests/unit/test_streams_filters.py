"""Candidate filters and merging: consumed and excluded items, categories, years, over-fetch sizes, RRF."""

from __future__ import annotations

import pytest

from instructrec.adapters.qdrant import fetch_limits, payload_filter
from instructrec.candidates import MAX_RERANKED, CandidateFilter, sizes
from instructrec.events import ClickEvent, QueryEvent, QueryFilters
from streams.agents.queries import candidate_filter
from streams.state.context import UserContext


def test_filter_accepts_by_categories_any_exclusions_and_inclusive_years() -> None:
    f = CandidateFilter(
        categories=frozenset({"Comedy", "Drama"}),
        exclude_categories=frozenset({"Horror"}),
        year_min=1990,
        year_max=1999,
        exclude_ids=frozenset({"seen"}),
    )
    assert f.accepts("a", ("Comedy",), 1990)
    assert f.accepts("a", ("Drama", "Romance"), 1999)
    assert not f.accepts("a", ("Action",), 1995)  # none of the wanted categories
    assert not f.accepts("a", ("Comedy", "Horror"), 1995)  # an excluded one
    assert not f.accepts("a", ("Comedy",), 1989)
    assert not f.accepts("a", ("Comedy",), 2000)
    assert not f.accepts("a", ("Comedy",), None)  # no year cannot satisfy a range
    assert not f.accepts("seen", ("Comedy",), 1995)
    assert CandidateFilter().accepts("anything")
    assert not CandidateFilter(exclude_ids=frozenset({"x"})).constrains_payload
    assert CandidateFilter(year_max=2000).constrains_payload


def test_payload_filter_for_the_slow_path() -> None:
    f = CandidateFilter(
        categories=frozenset({"Comedy"}), exclude_categories=frozenset({"Horror"}), year_min=1990
    )
    qf = payload_filter(f)
    assert len(qf.must) == 2 and len(qf.must_not) == 1
    assert payload_filter(CandidateFilter()).must is None


def test_fetch_limits_cover_the_excluded_ids_then_grow_to_the_cap() -> None:
    assert fetch_limits(20, CandidateFilter(), 1000) == [20, 80, 320, 1000]
    excluded = CandidateFilter(exclude_ids=frozenset(str(i) for i in range(100)))
    assert fetch_limits(20, excluded, 1000)[0] == 120
    with_payload = CandidateFilter(exclude_ids=frozenset({"a"}), categories=frozenset({"Drama"}))
    assert fetch_limits(20, with_payload, 1000)[0] == 84
    assert fetch_limits(20, CandidateFilter(exclude_ids=frozenset(map(str, range(2000)))), 1000) == [1000]


def test_candidate_filter_excludes_consumed_items_unless_asked_not_to() -> None:
    context = UserContext()
    context.apply(ClickEvent(user_id="u", item_id="watched", kind="click"))
    query = QueryEvent(
        user_id="u", filters=QueryFilters(exclude_item_ids=("nope",), categories=("Drama",), year_min=1980)
    )
    f = candidate_filter(query, context)
    assert f.exclude_ids == {"watched", "nope"}
    assert f.categories == {"Drama"} and f.year_min == 1980
    rewatch = QueryEvent(user_id="u", filters=QueryFilters(exclude_seen=False))
    assert candidate_filter(rewatch, context).exclude_ids == frozenset()


@pytest.mark.parametrize(
    ("k", "candidates", "expected"),
    [
        (10, 20, (20, 20)),
        (24, 20, (24, 24)),
        (26, 20, (26, 26)),
        (40, 20, (MAX_RERANKED, 40)),
        (1, 2, (2, 2)),
    ],
)
def test_sizes(k: int, candidates: int, expected: tuple[int, int]) -> None:
    assert sizes(k, candidates) == expected
