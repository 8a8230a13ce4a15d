"""The candidate plan: what it keeps, how it relaxes, how it merges, and the reasons it gives."""

from __future__ import annotations

import numpy as np
import pytest

from instructrec.candidates import (
    CandidateFilter,
    GenreAffinity,
    Hit,
    PlanConfig,
    PlanRequest,
    Search,
    TextIndex,
    collaborative_scores,
    merge,
    neighbour,
    plan,
    prepare,
    reasons,
)
from instructrec.catalogue import Catalogue, describe
from instructrec.data.dataset import Item

GENRES = ("Comedy", "Crime", "Horror", "Animation", "Drama")


def toy(n: int = 60) -> Catalogue:
    items = [
        Item(str(i), f"Film {i}", 1960 + (i * 7) % 60, (GENRES[i % 5], GENRES[(i * 3) % 5]), (f"tag{i % 4}",))
        for i in range(n)
    ]
    items[7] = Item("7", "Film 7", None, ("Crime",))  # no year: fails any period
    return Catalogue(
        [i.id for i in items],
        [i.display_title for i in items],
        np.array([i.year or -1 for i in items]),
        [tuple(dict.fromkeys(i.genres)) for i in items],
        [i.tags for i in items],
    )


def scores_for(catalogue: Catalogue, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=len(catalogue))


def test_the_filter_mask_is_accepts_over_the_catalogue() -> None:
    c = toy()
    filters = [
        CandidateFilter(categories=frozenset({"Crime", "Horror"}), year_min=1980),
        CandidateFilter(all_categories=frozenset({"Comedy", "Crime"})),
        CandidateFilter(
            exclude_categories=frozenset({"Drama"}), year_max=1990, exclude_ids=frozenset({"3", "4"})
        ),
        CandidateFilter(categories=frozenset({"Nope"})),
    ]
    for flt in filters:
        expected = [flt.accepts(c.item_ids[r], c.genres[r], c.year(r)) for r in range(len(c))]
        assert flt.mask(c).tolist() == expected


def test_without_text_the_plan_is_the_retrievers_top_k_without_the_history() -> None:
    c = toy()
    retrieval = scores_for(c)
    history = [int(r) for r in np.argsort(-retrieval)[:5]]  # the history holds the retriever's favourites
    request = PlanRequest(
        history, None, CandidateFilter(exclude_ids=frozenset(c.item_ids[r] for r in history)), 10
    )
    result = plan(
        request, c, retrieval=retrieval, popularity=None, text_vector=None, affinity=None, index=None
    )
    expected = [int(r) for r in np.argsort(-retrieval) if int(r) not in history][:10]
    assert [cand.row for cand in result.candidates] == expected
    assert all(
        cand.prior == pytest.approx(retrieval[cand.row]) and cand.sources == ("history",)
        for cand in result.candidates
    )


def test_a_specific_request_is_a_hard_filter_and_a_negative_one_excludes() -> None:
    c = toy()
    retrieval = scores_for(c, 1)
    for text, check in (
        ("a crime film from the 1990s", lambda g, y: "Crime" in g and y is not None and 1990 <= y <= 1999),
        ("nothing animated", lambda g, y: "Animation" not in g),
        ("a comedy, no horror", lambda g, y: "Comedy" in g and "Horror" not in g),
    ):
        result = plan(
            PlanRequest([0, 1], text, n=3),
            c,
            retrieval=retrieval,
            popularity=None,
            text_vector=None,
            affinity=None,
            index=None,
        )
        assert result.candidates and not result.relaxed, text
        assert all(check(cand.categories, cand.year) for cand in result.candidates), text


def test_too_few_matches_are_topped_up_under_a_relaxed_ask_and_it_says_so() -> None:
    c = toy()
    text = "a horror drama from the 1970s, nothing animated"
    strict = prepare(PlanRequest((), text, n=10), c).filter
    matching = {c.item_ids[r] for r in np.flatnonzero(strict.mask(c))}
    assert 0 < len(matching) < 10
    result = plan(
        PlanRequest((0,), text, n=10),
        c,
        retrieval=scores_for(c, 5),
        popularity=None,
        text_vector=None,
        affinity=None,
        index=None,
    )
    ids = [cand.item_id for cand in result.candidates]
    assert len(ids) == 10 and set(ids[: len(matching)]) == matching  # every exact match first
    assert result.relaxed and result.relaxed[0] == "any of the categories"
    assert all("Animation" not in cand.categories for cand in result.candidates)  # exclusions are promises


def test_text_hits_merge_by_weighted_rrf_and_unknown_items_join() -> None:
    c = toy()
    retrieval = scores_for(c, 2)
    prepared = prepare(PlanRequest([0], "something", n=8), c)
    scores, source = collaborative_scores(prepared, c, retrieval=retrieval, popularity=None, affinity=None)
    favourite = int(np.argmax(np.where(np.isfinite(scores), scores, -np.inf)))
    hits = [Hit("new-1", 0.9, "Brand New (2024)", ("Comedy",), 2024), Hit(c.item_ids[favourite], 0.8)]
    merged = merge(
        prepared, c, collaborative=scores, source=source, hits=hits, config=PlanConfig(text_weight=2.0)
    )
    first = merged.candidates[0]
    assert first.row == favourite and set(first.sources) == {"history", "intention"}  # found by both: first
    new = next(cand for cand in merged.candidates if cand.item_id == "new-1")
    assert new.row is None and new.prior is None and new.sources == ("intention",)
    assert new.text == describe("Brand New (2024)", ("Comedy",))
    without = merge(
        prepared, c, collaborative=scores, source=source, hits=hits, config=PlanConfig(text_weight=0.0)
    )
    ids = [x.item_id for x in without.candidates]
    assert "new-1" not in ids or ids.index("new-1") == len(ids) - 1  # a weightless search adds nothing


def test_without_history_popularity_leads() -> None:
    c = toy()
    popularity = np.arange(len(c), dtype=float)
    result = plan(
        PlanRequest((), None, n=5),
        c,
        retrieval=None,
        popularity=popularity,
        text_vector=None,
        affinity=None,
        index=None,
    )
    assert [cand.row for cand in result.candidates] == [59, 58, 57, 56, 55]
    assert all(cand.sources == ("popular",) for cand in result.candidates)


class WordEncoder:
    """A stand-in sentence encoder: a bag of words over a tiny vocabulary (no model download in unit tests)."""

    WORDS = (
        "funny",
        "laugh",
        "comedy",
        "scary",
        "horror",
        "chills",
        "crime",
        "heist",
        "cartoon",
        "animated",
        "moving",
        "drama",
    )

    def encode(self, texts):
        out = np.zeros((len(texts), len(self.WORDS)), dtype=np.float32)
        for i, text in enumerate(texts):
            for j, word in enumerate(self.WORDS):
                out[i, j] = text.lower().count(word)
        out[:, :] += 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_affinity_leans_a_vague_request_towards_its_category() -> None:
    c = toy()
    encoder = WordEncoder()
    affinity = GenreAffinity.build(encoder.encode, c)
    vector = encoder.encode(["something that gives me chills, scary"])[0]
    weights = affinity.of_text(vector)
    assert c.categories[int(np.argmax(weights))] == "Horror"
    retrieval = np.zeros(len(c))
    result = plan(
        PlanRequest((1,), "something that gives me chills, scary", n=10),
        c,
        retrieval=retrieval,
        popularity=None,
        text_vector=vector,
        affinity=affinity,
        index=None,
        config=PlanConfig(affinity_weight=2.0),
    )
    assert all("Horror" in cand.categories for cand in result.candidates)


def test_the_offline_text_index_filters_like_the_plan() -> None:
    c = toy()
    vectors = np.random.default_rng(3).normal(size=(len(c), 8)).astype(np.float32)
    index = TextIndex(c, vectors)
    flt = CandidateFilter(categories=frozenset({"Crime"}))
    hits = index.search(Search(vectors[11], 5, flt))
    assert hits and all("Crime" in h.categories for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_reasons_come_from_data_and_are_bounded() -> None:
    c = toy()
    result = plan(
        PlanRequest((0, 2), "a crime film from the 1990s", n=5),
        c,
        retrieval=scores_for(c, 4),
        popularity=None,
        text_vector=None,
        affinity=None,
        index=None,
    )
    vectors = np.eye(len(c), dtype=np.float32)
    vectors[result.candidates[0].row] += vectors[2]  # the first candidate neighbours history item 2
    near = neighbour(result.candidates[0].row, [0, 2], vectors)
    assert near == 2
    said = reasons(result.candidates[0], result.ask, "watched", c.titles[near])
    assert said[0].startswith("matches: 1990s") and "crime" in said[0]
    assert said[1] == f"because you watched {c.titles[2]}"
    assert len(said) <= 3 and all(len(r) <= 100 for r in said)
    long = reasons(result.candidates[0], result.ask, "watched", "x" * 300)
    assert all(len(r) <= 100 for r in long)


def test_catalogue_round_trips(tmp_path) -> None:
    c = toy()
    c.save(tmp_path / "catalogue.json")
    back = Catalogue.load(tmp_path / "catalogue.json")
    assert back.item_ids == c.item_ids and back.genres == c.genres and back.years.tolist() == c.years.tolist()
    assert back.categories == c.categories and (back.genre_matrix == c.genre_matrix).all()
