"""Training instructions from real signals (no teacher LLM; one can replace the intention writers later).

For a history prefix and the item the user chose next (the target):
- implicit preference (P1): the prefix's titles;
- explicit preference (P2): liked (rating ≥ 4) and disliked (rating ≤ 2) items and the user's own tags;
- vague intention (I1): a mood phrase for one of the target's genres, or one of its tags ("something
  scary", "something atmospheric"); specific intention (I2): genres with a year or decade ("a 1990s sci-fi
  thriller", "a comedy from around 1995"); a negative constraint: a category the target lacks and the user's
  recent history has ("nothing animated"). An intention never contains the target's title;
- every intention comes with what it asks (`Ask`: the categories, period or exclusion it was written from):
  the gold standard of compliance and of the filtered-retriever reference;
- phrasings come from the training pool of each `vocabulary.Phrasings`; `pool="heldout"` writes with the
  wordings training never sees (evaluation only);
- a mixture over tasks and combinations (configurable weights) and uniformly over each combination's
  templates. Candidates come from the caller (the candidate plan, as serving has them); `RandomNegatives` is
  the fallback. Everything is deterministic for a seed.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from instructrec.data.dataset import MOVIES, Dataset, Interaction, Item, Nouns
from instructrec.instructions.instruction import NO, YES, Instruction
from instructrec.instructions.intent import AROUND_YEARS, PART_OF_DECADE, Ask
from instructrec.instructions.render import render, rng_for
from instructrec.instructions.taxonomy import Combination, Intention, Preference, Task
from instructrec.instructions.templates import templates_for
from instructrec.instructions.vocabulary import (
    FROM_TAG_PHRASES,
    FROM_TAGS,
    LEAD_INS,
    NEGATIVE,
    SPECIFIC,
    SPECIFIC_NO_CATEGORY,
    SPECIFIC_NO_YEAR,
    Pool,
    article,
    intention_kind,
    words_for,
)

# (user, how many, seed) -> negative item indices
NegativeSampler = Callable[[int, int, int], Sequence[int]]

_LEAD_IN_RATE = 0.35  # how often a phrase is wrapped as a request, as live queries are
# Bookkeeping tags that say nothing about a movie (MovieLens users keep watch lists in tags).
_NOT_A_NEED = re.compile(r"netflix|dvd|bd-r|imdb|queue|\bseen\b|download|\bowned?\b")
_ADJECTIVE = re.compile(r"^[a-z-]+(ic|al|ous|ful|y|ive|ing|ed|ish|less|able|ible|ant|ent)$")


@dataclass(frozen=True, slots=True)
class Wish:
    """A synthesised request text and what it asks (the attributes it was written from)."""

    text: str
    ask: Ask = field(default_factory=Ask)

    @property
    def kind(self) -> Intention:
        return intention_kind(self.text)


@dataclass(frozen=True, slots=True)
class Example:
    instruction: Instruction
    target: int  # the item the user chose next
    answer: str  # the verbalizer token to predict: the target's letter (T1–T3), "yes"/"no" (T0)
    intention: str | None = None  # the synthesised request text, when the instruction has one
    ask: Ask = field(default_factory=Ask)  # what the request asks


@dataclass(frozen=True, slots=True)
class Request:
    """A training request before its candidates are known: who (preference), what they say (intention) and
    which task form; the candidate plan then fetches candidates for it, as serving would."""

    preference: Preference
    intention: Intention
    task: Task
    wish: Wish | None  # None for I0
    history: tuple[Interaction, ...]  # the prefix (empty for P0: the plan sees no history either)


@dataclass(frozen=True)
class SynthesisConfig:
    tasks: Mapping[Task, float] = field(
        default_factory=lambda: {Task.T3: 0.6, Task.T2: 0.15, Task.T1: 0.15, Task.T0: 0.1}
    )
    preferences: Mapping[Preference, float] = field(
        default_factory=lambda: {Preference.P1: 0.5, Preference.P2: 0.4, Preference.P0: 0.1}
    )
    intentions: Mapping[Intention, float] = field(
        default_factory=lambda: {Intention.I0: 0.4, Intention.I1: 0.3, Intention.I2: 0.3}
    )
    negative_rate: float = 0.15  # of I2 requests with a history, the share that rule a category out instead
    n_candidates: int = 20  # T2/T3 list length, target included
    max_history: int = 10
    max_explicit: int = 5
    liked: float = 4.0  # rating at or above: liked
    disliked: float = 2.0  # rating at or below: disliked
    explicit_window: int = 100  # explicit preferences come from this many most recent interactions
    shuffle: bool = True
    pool: Pool = "train"  # which phrasings intentions are written with


def explicit_preferences(
    history: Sequence[Interaction],
    *,
    liked: float = 4.0,
    disliked: float = 2.0,
    window: int = 100,
) -> tuple[list[int], list[int], list[str]]:
    """(liked items, disliked items, tags) from the most recent `window` interactions.

    Items are most recent last; tags most used first (ties: most recent first), as `render` expects.
    """
    recent = history[-window:]
    likes = [x.item for x in recent if x.rating is not None and x.rating >= liked]
    dislikes = [x.item for x in recent if x.rating is not None and x.rating <= disliked]
    counts: Counter[str] = Counter()
    last_seen: dict[str, int] = {}
    for position, x in enumerate(recent):
        for tag in x.tags:
            counts[tag] += 1
            last_seen[tag] = position
    tags = sorted(counts, key=lambda t: (-counts[t], -last_seen[t]))
    return likes, dislikes, tags


def vague_intention(
    item: Item, rng: random.Random, *, pool: Pool = "train", nouns: Nouns = MOVIES
) -> Wish | None:
    """A need in a user's words, from the item's genres (mood phrases) and tags; None when it has neither.
    A mood asks for its genre (compliance); a tag asks for nothing checkable."""
    options: list[tuple[str, Ask]] = [
        (mood, Ask(frozenset({genre}))) for genre in item.genres for mood in words_for(genre).moods_in(pool)
    ]
    for tag in item.tags:
        # Tags naming a genre or a year would read as specific; tags with digits are mostly lists ("top 250").
        if (
            len(tag) < 3
            or any(ch.isdigit() for ch in tag)
            or _NOT_A_NEED.search(tag)
            or intention_kind(tag) is not Intention.I1
        ):
            continue
        phrasings = FROM_TAGS if " " not in tag and _ADJECTIVE.match(tag) else FROM_TAG_PHRASES
        options += [(_fill(p, nouns, tag=tag, a_tag=article(tag)), Ask()) for p in phrasings.pool(pool)]
    return _first_safe(options, item, rng, pool)


def specific_intention(
    item: Item, rng: random.Random, *, pool: Pool = "train", nouns: Nouns = MOVIES
) -> Wish | None:
    """Attributes from the item's categories and year ("a 1990s sci-fi thriller"); None when it has neither.
    The ask is what the phrasing names: the one or two categories, and the period as said."""
    genres = [(g, words_for(g)) for g in item.genres if g != "IMAX"]
    rng.shuffle(genres)
    year = item.year
    options: list[tuple[str, Ask]] = []
    if genres:
        (g1, w1), second = genres[0], genres[1] if len(genres) > 1 else None
        one = w1.noun.format(item=nouns.item)
        two = f"{w1.modifier} {second[1].noun.format(item=nouns.item)}" if second else one
        both = frozenset({g1, second[0]}) if second else frozenset({g1})
        names = {"one": one, "two": two, "a_one": article(one), "a_two": article(two)}
        if year:
            for phrasing in SPECIFIC.pool(pool):
                words, ask = _period_of(phrasing, year)
                genres_asked = both if "{two}" in phrasing else frozenset({g1})
                text = _fill(phrasing, nouns, year=year, **words, **names)
                options.append((text, Ask(genres_asked, year_min=ask[0], year_max=ask[1])))
        else:
            for phrasing in SPECIFIC_NO_YEAR.pool(pool):
                options.append(
                    (_fill(phrasing, nouns, **names), Ask(both if "{two}" in phrasing else frozenset({g1})))
                )
    elif year:
        for phrasing in SPECIFIC_NO_CATEGORY.pool(pool):
            words, ask = _period_of(phrasing, year)
            options.append(
                (_fill(phrasing, nouns, year=year, **words), Ask(year_min=ask[0], year_max=ask[1]))
            )
    return _first_safe(options, item, rng, pool)


def negative_intention(
    target: Item, history: Sequence[Item], rng: random.Random, *, pool: Pool = "train", nouns: Nouns = MOVIES
) -> Wish | None:
    """A category the user should not be offered: the one most common in their recent history that the
    target does not have (so the constraint bites), ties broken at random; None when there is none."""
    counts = Counter(
        g for item in history[-10:] for g in item.genres if g not in target.genres and g != "IMAX"
    )
    if not counts:
        return None
    top = max(counts.values())
    genre = rng.choice(sorted(g for g, n in counts.items() if n == top))
    words = words_for(genre)
    noun = _plural(words.noun.format(item=nouns.item))
    options = [
        (_fill(p, nouns, noun=noun, modifier=words.modifier, a_noun=""), Ask(excluded=frozenset({genre})))
        for p in NEGATIVE.pool(pool)
    ]
    rng.shuffle(options)
    text, ask = options[0]
    return Wish(" ".join(text.split()), ask)


def _period_of(phrasing: str, year: int) -> tuple[dict[str, str], tuple[int | None, int | None]]:
    """The period words a phrasing uses and the year range they name (as `intent.parse_ask` reads them)."""
    decade, period = _decade(year)
    start = year // 10 * 10
    words = {"decade": decade, "period": period, "a_decade": article(decade)}
    decade_word = _DECADE_WORDS.get(start)
    words["decade_words"] = decade_word or decade
    if "{period}" in phrasing:
        part = period.split("-")[0].split()[0] if not period[0].isdigit() else ""
        first, last = PART_OF_DECADE[part]
        return words, (start + first, start + last)
    if "{decade}" in phrasing or "{decade_words}" in phrasing:
        return words, (start, start + 9)
    if "around {year}" in phrasing:
        return words, (year - AROUND_YEARS, year + AROUND_YEARS)
    return words, (year, year)


_DECADE_WORDS = {1950: "fifties", 1960: "sixties", 1970: "seventies", 1980: "eighties", 1990: "nineties"}


def _fill(phrasing: str, nouns: Nouns, **values: object) -> str:
    return phrasing.format(item=nouns.item, items=nouns.items, **values)


def _plural(noun: str) -> str:
    """ "comedy" → "comedies", "thriller" → "thrillers" (the parser reads both forms)."""
    if noun.endswith("s"):
        return noun
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def leaks_title(text: str, title: str) -> bool:
    """Whether `text` contains the title or one of its parenthesised alternatives, as whole words."""
    haystack = f" {_normal(text)} "
    for segment in re.split(r"[()]", title):
        words = _normal(segment)
        words = re.sub(r"^(a k a|aka) ", "", words)
        words = re.sub(r"^(the|a|an) (?=\w)", "", words)
        if words and f" {words} " in haystack:
            return True
    return False


class RandomNegatives:
    """Seeded uniform negatives the user never interacted with: the fallback when no retriever is at hand."""

    def __init__(self, dataset: Dataset) -> None:
        self.n_items = dataset.n_items
        self.seen = [frozenset(x.item for x in h) for h in dataset.histories]

    def __call__(self, user: int, n: int, seed: int) -> list[int]:
        seen = self.seen[user]
        n = min(n, self.n_items - len(seen))
        rng = np.random.default_rng(rng_for(seed, f"negatives:{user}").getrandbits(64))
        chosen: dict[int, None] = {}  # ordered set: the draw order is part of the determinism
        while len(chosen) < n:
            for item in rng.integers(0, self.n_items, size=2 * (n - len(chosen)) + 8).tolist():
                if item not in seen and len(chosen) < n:
                    chosen[item] = None
        return list(chosen)


class Synthesizer:
    def __init__(self, dataset: Dataset, config: SynthesisConfig | None = None) -> None:
        self.dataset = dataset
        self.config = config or SynthesisConfig()

    def example(
        self, history: Sequence[Interaction], target: int, negatives: Sequence[int], *, seed: int
    ) -> Example:
        """One training instruction for `target`, chosen after `history` (time-ordered, oldest first), over
        the target and the given negatives (tests and simple uses; training plans candidates per request)."""
        request = self.request(history, target, seed=seed)
        return self.render(request, target, negatives, seed=seed)

    def request(self, history: Sequence[Interaction], target: int, *, seed: int) -> Request:
        """Who asks, what they say and the task form, before candidates: the candidate plan needs the
        request (its history, text and ask) to fetch candidates the way serving does."""
        cfg = self.config
        rng = rng_for(seed, "synthesis")
        item = self.dataset.items[target]
        nouns = self.dataset.nouns
        liked, disliked, tags = explicit_preferences(
            history, liked=cfg.liked, disliked=cfg.disliked, window=cfg.explicit_window
        )
        liked = [i for i in liked if i != target]
        disliked = [i for i in disliked if i != target]
        specific = specific_intention(item, rng, pool=cfg.pool, nouns=nouns)
        if history and rng.random() < cfg.negative_rate:
            recent = [self.dataset.items[x.item] for x in history]
            specific = negative_intention(item, recent, rng, pool=cfg.pool, nouns=nouns) or specific
        intentions = {
            Intention.I0: None,
            Intention.I1: vague_intention(item, rng, pool=cfg.pool, nouns=nouns),
            Intention.I2: specific,
        }
        available = {
            Preference.P0: True,
            Preference.P1: bool(history),
            Preference.P2: bool(liked or disliked or tags),
        }
        pairs = [
            (p, i)
            for p in Preference
            for i in Intention
            if available[p] and (i is Intention.I0 or intentions[i]) and Combination(p, i, Task.T3).valid
        ]
        weights = [cfg.preferences.get(p, 0.0) * cfg.intentions.get(i, 0.0) for p, i in pairs]
        if not pairs or sum(weights) <= 0:
            raise ValueError(
                "no combination is possible: no history or explicit preferences, no intention from the target's "
                "genres, tags or year, or zero weights for what is left"
            )
        preference, intention = rng.choices(pairs, weights)[0]
        task = rng.choices(list(cfg.tasks), list(cfg.tasks.values()))[0]
        wish = intentions[intention]
        if wish is not None and wish.kind is not intention:
            # A negative constraint names a category: it reads as specific whatever slot it filled.
            intention = wish.kind
        kept = tuple(history) if preference is not Preference.P0 else ()
        return Request(preference, intention, task, wish, kept)

    def render(self, request: Request, target: int, candidates: Sequence[int], *, seed: int) -> Example:
        """The instruction for `request` over the target and `candidates` (the target is dropped from them)."""
        cfg = self.config
        rng = rng_for(seed, "render-task")
        history = request.history
        negatives = list(dict.fromkeys(n for n in candidates if n != target))
        if not negatives:
            raise ValueError("at least one negative (other than the target) is needed")
        liked, disliked, tags = explicit_preferences(
            history, liked=cfg.liked, disliked=cfg.disliked, window=cfg.explicit_window
        )
        liked = [i for i in liked if i != target]
        disliked = [i for i in disliked if i != target]
        preference, intention, task = request.preference, request.intention, request.task
        wish = request.wish

        if task is Task.T0:
            candidates = [target if rng.random() < 0.5 else rng.choice(negatives)]
        else:
            k = 1 if task is Task.T1 else cfg.n_candidates - 1
            candidates = [target, *negatives[:k]]
        template = rng.choice(templates_for(Combination(preference, intention, task)))
        instruction = render(
            template,
            candidates=candidates,
            history=[x.item for x in history],
            liked=liked if preference is Preference.P2 else [],
            disliked=disliked if preference is Preference.P2 else [],
            tags=tags if preference is Preference.P2 else [],
            intention=wish.text if wish else None,
            seed=seed,
            max_history=cfg.max_history,
            max_explicit=cfg.max_explicit,
            shuffle=cfg.shuffle,
            nouns=self.dataset.nouns,
        )
        if task is Task.T0:
            answer = YES if instruction.candidates[0] == target else NO
        else:
            answer = instruction.labels[instruction.candidates.index(target)]
        return Example(instruction, target, answer, wish.text if wish else None, wish.ask if wish else Ask())

    def examples(
        self,
        histories: Sequence[Sequence[Interaction]],
        *,
        negatives: NegativeSampler | None = None,
        seed: int = 0,
        min_history: int = 1,
    ) -> Iterator[Example]:
        """An example for every position of every user's history (a split's training part, say).

        `histories[u]` belongs to dense user u; the target at position t follows the prefix history[:t].
        """
        sample = negatives or RandomNegatives(self.dataset)
        n = self.config.n_candidates - 1
        for user, history in enumerate(histories):
            for t in range(min_history, len(history)):
                example_seed = rng_for(seed, f"{user}:{t}").getrandbits(63)
                yield self.example(
                    history[:t], history[t].item, sample(user, n, example_seed), seed=example_seed
                )


def _first_safe(options: list[tuple[str, Ask]], item: Item, rng: random.Random, pool: Pool) -> Wish | None:
    """A random option that does not leak the title, sometimes phrased as a request."""
    rng.shuffle(options)
    lead_ins = LEAD_INS.pool(pool)
    for option, ask in options:
        phrase = rng.choice(lead_ins).format(option) if rng.random() < _LEAD_IN_RATE else option
        if not leaks_title(phrase, item.title):
            return Wish(phrase, ask)
    return None


def _decade(year: int) -> tuple[str, str]:
    """1995 → ("1990s", "mid-90s"); 2008 → ("2000s", "late 2000s")."""
    decade = year // 10 * 10
    short = f"{decade % 100:02d}s" if decade < 2000 else f"{decade}s"
    digit = year % 10
    period = f"early {short}" if digit < 4 else f"mid-{short}" if digit < 7 else f"late {short}"
    return f"{decade}s", period


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())
