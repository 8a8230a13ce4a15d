"""What a request asks (the parser), the held-out phrasing split, and compliance against hand-computed values."""

from __future__ import annotations

import random
import re

import pytest

from instructrec.data.dataset import Item
from instructrec.instructions import Ask, Intention, compliance, intention_kind, parse_ask
from instructrec.instructions.synthesis import negative_intention, specific_intention, vague_intention
from instructrec.instructions.vocabulary import (
    FROM_TAG_PHRASES,
    FROM_TAGS,
    GENRES,
    LEAD_INS,
    NEGATIVE,
    SPECIFIC,
    SPECIFIC_NO_CATEGORY,
    SPECIFIC_NO_YEAR,
    Phrasings,
)

CATEGORIES = list(GENRES)


@pytest.mark.parametrize(
    ("text", "genres", "excluded", "years"),
    [
        ("a gritty 1990s crime story", {"Crime"}, set(), (1990, 1999)),
        ("nothing scary, my kids are watching", set(), {"Horror"}, (None, None)),
        ("a thriller without any horror", {"Thriller"}, {"Horror"}, (None, None)),
        ("no romance please, something with action", {"Action"}, {"Romance"}, (None, None)),
        ("a romantic comedy for date night", {"Romance", "Comedy"}, set(), (None, None)),
        ("anything but a western", set(), {"Western"}, (None, None)),
        ("a war film made before 1970", {"War"}, set(), (None, 1969)),
        ("something from the mid-90s", set(), set(), (1994, 1996)),
        ("a comedy from around 1995", {"Comedy"}, set(), (1993, 1997)),
        ("some nineties sci-fi", {"Sci-Fi"}, set(), (1990, 1999)),
        ("films between 1970 and 1975", set(), set(), (1970, 1975)),
        ("something with explosions and no cartoons", set(), {"Animation"}, (None, None)),
        ("something award-winning", set(), set(), (None, None)),  # "war" only inside a word
        ("a film that gives me chills", set(), set(), (None, None)),  # vague: read by meaning, not named
    ],
)
def test_parse_ask(text: str, genres: set, excluded: set, years: tuple) -> None:
    ask = parse_ask(text, CATEGORIES)
    assert (set(ask.genres), set(ask.excluded), (ask.year_min, ask.year_max)) == (genres, excluded, years)


def test_either_of_two_genres() -> None:
    ask = parse_ask("horror or thriller", CATEGORIES)
    assert ask.any_genre and ask.satisfied_by(("Horror",), None) and not ask.satisfied_by(("Drama",), None)


def test_other_catalogues_are_parsed_by_their_labels() -> None:
    ask = parse_ask("a strategy game from 2015, no puzzle games", ["Strategy", "Puzzle", "Racing"])
    assert ask.genres == {"Strategy"} and ask.excluded == {"Puzzle"} and ask.year_min == ask.year_max == 2015


# ---- held-out phrasings ----


POOLS = {
    "lead-ins": LEAD_INS,
    "specific": SPECIFIC,
    "specific without a year": SPECIFIC_NO_YEAR,
    "specific without a category": SPECIFIC_NO_CATEGORY,
    "from tags": FROM_TAGS,
    "from tag phrases": FROM_TAG_PHRASES,
    "negative": NEGATIVE,
}


def test_held_out_phrasings_are_disjoint_from_training() -> None:
    for name, pool in POOLS.items():
        assert pool.train and pool.heldout, name
        assert not set(pool.train) & set(pool.heldout), name
    for genre, words in GENRES.items():
        assert not set(words.moods) & set(words.heldout), genre
    with pytest.raises(ValueError, match="both trained and held out"):
        Phrasings(("a", "b"), ("b",))


def _shape(template: str) -> re.Pattern:
    """A phrasing template as a pattern of what it can render to (placeholders: anything)."""
    pattern = re.sub(r"\\\{[a-z_]*\\\}", ".*", re.escape(template)).replace("\\ ", "\\s*")
    return re.compile("^" + pattern + "$", re.IGNORECASE)


MATRIX = Item("1", "The Matrix", 1999, ("Action", "Sci-Fi", "Thriller"), ("atmospheric", "twist ending"))
FAMILY = Item("2", "Toy Story", 1995, ("Animation", "Children", "Comedy"), ("pixar", "funny"))
HISTORY = [Item("3", "A", 1990, ("Comedy", "Romance")), Item("4", "B", 1991, ("Romance", "Drama"))]


def _core(text: str, pool: str) -> str:
    """The phrase inside a lead-in ("looking for {}"), or the text itself."""
    for lead in LEAD_INS.pool(pool):
        before, after = lead.split("{}")
        if text.startswith(before) and text.endswith(after) and len(text) > len(before) + len(after):
            return text[len(before) : len(text) - len(after)]
    return text


def test_training_never_writes_a_held_out_wording_and_every_ask_parses_back() -> None:
    moods = {p: {m for w in GENRES.values() for m in w.moods_in(p)} for p in ("train", "heldout")}
    shapes = {
        p: [_shape(t) for pool in POOLS.values() if pool is not LEAD_INS for t in pool.pool(p)] for p in moods
    }
    for pool, other in (("train", "heldout"), ("heldout", "train")):
        for seed in range(200):
            rng = random.Random(seed)
            for item in (MATRIX, FAMILY):
                for wish in (
                    vague_intention(item, rng, pool=pool),
                    specific_intention(item, rng, pool=pool),
                    negative_intention(item, HISTORY, rng, pool=pool),
                ):
                    core = _core(wish.text, pool)
                    assert core not in moods[other], (pool, wish.text)
                    own = core in moods[pool] or any(s.match(core) for s in shapes[pool])
                    assert own, (pool, wish.text)
                    if wish.ask.constrains or wish.ask.excluded:
                        if core in moods[pool]:
                            assert intention_kind(wish.text) is Intention.I1, wish.text  # moods stay vague
                        else:
                            assert parse_ask(wish.text, CATEGORIES) == wish.ask, (wish.text, wish.ask)


def test_held_out_moods_read_as_vague() -> None:
    for words in GENRES.values():
        assert all(intention_kind(mood) is Intention.I1 for mood in words.heldout), words


# ---- compliance ----


def test_compliance_against_hand_computed_values() -> None:
    crime_90s = Ask(frozenset({"Crime"}), year_min=1990, year_max=1999)
    no_horror = Ask(excluded=frozenset({"Horror"}))
    ranked_a = [(("Crime", "Drama"), 1995), (("Crime",), 1985), (("Comedy",), 1994), (("Crime",), None)]
    ranked_b = [(("Horror",), 2000), (("Comedy",), 2001)]
    # a: only the first satisfies (wrong decade, wrong genre, no year): 1/4; b: one of two excluded: 1/2
    assert compliance([crime_90s, no_horror], [ranked_a, ranked_b]) == pytest.approx((0.25 + 0.5) / 2)
    assert compliance([crime_90s], [ranked_a], k=1) == 1.0
    assert compliance([Ask()], [ranked_a]) != compliance([Ask()], [ranked_a])  # nothing asked: NaN, skipped
    both = Ask(frozenset({"Romance", "Comedy"}))
    assert both.satisfied_by(("Comedy", "Romance", "Drama"), None) and not both.satisfied_by(
        ("Comedy",), None
    )


def test_relaxation_keeps_exclusions() -> None:
    ask = Ask(frozenset({"Crime", "Western"}), frozenset({"Horror"}), 1950, 1959)
    steps = ask.relaxed()
    assert [what for what, _ in steps] == ["any of the categories", "the period", "the categories"]
    assert all(a.excluded == {"Horror"} for _, a in steps)
    assert steps[-1][1] == Ask(excluded=frozenset({"Horror"}))


def test_matches_name_what_an_item_satisfies() -> None:
    ask = parse_ask("a gritty 1990s crime story, nothing animated", CATEGORIES)
    assert ask.matches(("Crime", "Thriller"), 1994) == ["1990s", "crime", "not animation"]
