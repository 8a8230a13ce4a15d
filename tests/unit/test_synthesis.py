"""Training-instruction synthesis: signals come from the data, intentions never name the target, seeds rule."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from instructrec.data import Dataset, Interaction, Item, LeaveOneOut, load
from instructrec.instructions import (
    Intention,
    Preference,
    RandomNegatives,
    SynthesisConfig,
    Synthesizer,
    Task,
    explicit_preferences,
    intention_kind,
    specific_intention,
    vague_intention,
)
from instructrec.instructions.synthesis import leaks_title
from instructrec.instructions.vocabulary import GENRES

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

MATRIX = Item(
    "1",
    "The Matrix",
    1999,
    ("Action", "Sci-Fi", "Thriller"),
    ("atmospheric", "twist ending", "sci-fi", "matrix", "1990s", "bd-r"),
)
SOMETHING_FUNNY = Item("2", "Something Funny", 2004, ("Comedy",))
COMEDY = Item("3", "Comedy", 1995, ("Comedy",))  # every specific phrase would name it
BARE = Item("4", "Untitled", None, ())


def tiny() -> Dataset:
    items = [MATRIX, SOMETHING_FUNNY, COMEDY, BARE] + [
        Item(str(i), f"Filler {i}", 1980 + i, ("Drama",)) for i in range(5, 30)
    ]
    history = [
        Interaction(5, 1, 5.0, ("dark", "quirky")),
        Interaction(6, 2, 1.0, ("quirky",)),
        Interaction(7, 3, 3.0),
        Interaction(8, 4, 4.0, ("dark",)),
        Interaction(9, 5, 2.0),
        Interaction(0, 6, 4.5),
        Interaction(1, 7, 4.0),
    ]
    other = [Interaction(i, i, 3.0) for i in (10, 11, 12, 2, 3)]
    return Dataset("tiny", items, ["u0", "u1"], [history, other])


def strip_lead_in(phrase: str) -> str:
    for lead in ("I'd like ", "show me ", "I'm in the mood for ", "looking for ", "any ideas for "):
        if phrase.startswith(lead):
            return phrase[len(lead) :].rstrip("?")
    return phrase


# ---- explicit preferences ----


def test_explicit_preferences_from_ratings_and_tags() -> None:
    liked, disliked, tags = explicit_preferences(tiny().histories[0])
    assert liked == [5, 8, 0, 1]  # rating ≥ 4, most recent last
    assert disliked == [6, 9]  # rating ≤ 2
    assert tags == ["dark", "quirky"]  # both used twice: the most recently used first
    liked, disliked, tags = explicit_preferences(tiny().histories[0], liked=4.5, disliked=1.0, window=3)
    assert (liked, disliked, tags) == ([0], [], [])


# ---- intentions ----


def test_vocabulary_agrees_with_the_live_heuristic() -> None:
    for words in GENRES.values():
        assert all(intention_kind(mood) is Intention.I1 for mood in words.moods), words
        assert intention_kind(f"a 1990s {words.noun.format(item='movie')}") is Intention.I2


def test_vague_intentions_come_from_genres_and_tags() -> None:
    moods = {m for g in MATRIX.genres for m in GENRES[g].moods}
    seen = set()
    for seed in range(60):
        phrase = vague_intention(MATRIX, random.Random(seed)).text
        assert phrase and intention_kind(phrase) is Intention.I1, phrase
        core = strip_lead_in(phrase)
        assert core in moods or "atmospheric" in core or "twist ending" in core, phrase
        seen.add(core)
    assert any("atmospheric" in s for s in seen) and any("twist ending" in s for s in seen)
    assert len(seen) >= 8  # paraphrase variety
    assert vague_intention(BARE, random.Random(0)) is None


def test_specific_intentions_come_from_genres_and_year() -> None:
    words = {w for g in MATRIX.genres for w in (GENRES[g].modifier, GENRES[g].noun.split()[0])}
    seen = set()
    for seed in range(60):
        phrase = specific_intention(MATRIX, random.Random(seed)).text
        assert phrase and intention_kind(phrase) is Intention.I2, phrase
        assert any(period in phrase for period in ("1999", "1990s", "late 90s")), phrase
        assert any(word in phrase for word in words), phrase
        seen.add(strip_lead_in(phrase))
    assert len(seen) >= 8
    assert any(s.startswith("a 1990s ") for s in seen) and any(" from around 1999" in s for s in seen)
    no_year = Item("9", "X", None, ("Horror",))
    assert strip_lead_in(specific_intention(no_year, random.Random(1)).text) == "a horror movie"
    assert specific_intention(BARE, random.Random(0)) is None


def test_intentions_never_name_the_target() -> None:
    for seed in range(100):
        rng = random.Random(seed)
        for item in (MATRIX, SOMETHING_FUNNY, COMEDY):
            for wish in (vague_intention(item, rng), specific_intention(item, rng)):
                phrase = wish.text if wish else None
                assert phrase is None or not leaks_title(phrase, item.title), (item.title, phrase)
                assert phrase is None or "matrix" not in phrase.lower()
    assert specific_intention(COMEDY, random.Random(0)) is None  # every option would say "comedy"


@pytest.mark.parametrize(
    ("text", "title", "leaks"),
    [
        ("something like the matrix reloaded", "The Matrix", True),
        ("a Matrix-style film", "The Matrix", True),
        ("something upbeat", "Up", False),
        ("looking for se7en", "Seven (a.k.a. Se7en)", True),
        ("a 1990s sci-fi thriller", "The Matrix", False),
    ],
)
def test_leaks_title(text: str, title: str, leaks: bool) -> None:
    assert leaks_title(text, title) is leaks


# ---- the synthesiser ----


def test_examples_are_deterministic_and_consistent() -> None:
    data = tiny()
    synth = Synthesizer(data)
    history, target, negatives = data.histories[0][:5], 0, [20, 21, 22, 23, 24]
    first = synth.example(history, target, negatives, seed=3)
    assert first == synth.example(history, target, negatives, seed=3)
    examples = [synth.example(history, target, negatives, seed=s) for s in range(80)]
    assert len({e.instruction for e in examples}) > 60
    for e in examples:
        ins = e.instruction
        assert target in ins.candidates or ins.task is Task.T0
        if ins.task is Task.T0:
            assert e.answer == ("yes" if ins.candidates[0] == target else "no")
        else:
            assert ins.candidates[ins.labels.index(e.answer)] == target
            assert set(ins.candidates) <= {target, *negatives}
        assert (e.intention is None) == (ins.combination.intention is Intention.I0)
        assert e.intention is None or not leaks_title(e.intention, MATRIX.title)
    assert {e.instruction.task for e in examples} == set(Task)
    assert {e.instruction.combination.preference for e in examples} == set(Preference)
    with pytest.raises(ValueError, match="negative"):
        synth.example(history, target, [target], seed=0)


def test_config_weights_steer_the_mixture() -> None:
    data = tiny()
    history = data.histories[0][:5]
    only = SynthesisConfig(
        tasks={Task.T3: 1.0}, preferences={Preference.P2: 1.0}, intentions={Intention.I2: 1.0}, n_candidates=4
    )
    for seed in range(20):
        e = Synthesizer(data, only).example(history, 0, list(range(10, 20)), seed=seed)
        assert e.instruction.template_id.startswith("P2-I2-T3")
        assert len(e.instruction.candidates) == 4
        assert e.instruction.mentions("liked")
    # The specific intention is impossible for "Comedy": the mixture falls back to what is possible.
    no_intent = SynthesisConfig(intentions={Intention.I0: 1.0, Intention.I2: 1.0}, negative_rate=0.0)
    for seed in range(20):
        e = Synthesizer(data, no_intent).example(history, 2, [20], seed=seed)
        assert e.intention is None
    with pytest.raises(ValueError, match="no combination"):
        Synthesizer(data, SynthesisConfig(intentions={Intention.I1: 1.0})).example([], 3, [20], seed=0)


def test_random_negatives() -> None:
    data = tiny()
    sample = RandomNegatives(data)
    seen = {x.item for x in data.histories[0]}
    negatives = sample(0, 10, seed=5)
    assert negatives == sample(0, 10, seed=5)
    assert negatives != sample(0, 10, seed=6)
    assert len(set(negatives)) == 10 and not seen & set(negatives)
    assert len(sample(0, 1000, seed=1)) == data.n_items - len(seen)


def test_examples_over_histories() -> None:
    data = tiny()
    examples = list(Synthesizer(data, SynthesisConfig(n_candidates=5)).examples(data.histories, seed=2))
    assert len(examples) == sum(len(h) - 1 for h in data.histories)
    assert [e.target for e in examples[:6]] == [x.item for x in data.histories[0][1:]]
    user_items = {x.item for x in data.histories[0]}
    for e in examples[:6]:
        assert not (set(e.instruction.candidates) - {e.target}) & user_items


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")
def test_on_movielens() -> None:
    data = load("ml-latest-small", root=DATA)
    split = LeaveOneOut(data)
    synth = Synthesizer(data)
    histories = [split.train(u) for u in range(0, data.n_users, 20)]
    kinds: Counter[str] = Counter()
    for n, e in enumerate(synth.examples(histories, seed=0)):
        if n == 1500:
            break
        kinds[e.instruction.combination.code[:5]] += 1
        if e.intention:
            assert not leaks_title(e.intention, data.items[e.target].title), e.intention
            assert intention_kind(e.intention) is e.instruction.combination.intention
    assert len(kinds) == 8  # every preference × intention pair occurs
