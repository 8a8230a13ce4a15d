"""Training instructions from real signals (no teacher LLM; one can replace the intention writers later).

For a history prefix and the item the user chose next (the target):
- implicit preference (P1): the prefix's titles;
- explicit preference (P2): liked (rating ≥ 4) and disliked (rating ≤ 2) items and the user's own tags;
- vague intention (I1): a mood phrase for one of the target's genres, or one of its tags ("something
  scary", "something atmospheric"); specific intention (I2): genres with a year or decade ("a 1990s sci-fi
  thriller", "a comedy from around 1995"). An intention never contains the target's title;
- a mixture over tasks and combinations (configurable weights) and uniformly over each combination's
  templates. Negatives come from the caller (hard negatives from a retriever); `RandomNegatives` is the
  fallback. Everything is deterministic for a seed.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from instructrec.data.dataset import Dataset, Interaction, Item
from instructrec.instructions.instruction import NO, YES, Instruction
from instructrec.instructions.render import render, rng_for
from instructrec.instructions.taxonomy import Combination, Intention, Preference, Task
from instructrec.instructions.templates import templates_for
from instructrec.instructions.vocabulary import genre_words, intention_kind

# (user, how many, seed) -> negative item indices
NegativeSampler = Callable[[int, int, int], Sequence[int]]

_LEAD_INS = ("I'd like {}", "show me {}", "I'm in the mood for {}", "looking for {}", "any ideas for {}?")
_LEAD_IN_RATE = 0.35  # how often a phrase is wrapped as a request, as live queries are
# Bookkeeping tags that say nothing about a movie (MovieLens users keep watch lists in tags).
_NOT_A_NEED = re.compile(r"netflix|dvd|bd-r|imdb|queue|\bseen\b|download|\bowned?\b")
_ADJECTIVE = re.compile(r"^[a-z-]+(ic|al|ous|ful|y|ive|ing|ed|ish|less|able|ible|ant|ent)$")


@dataclass(frozen=True, slots=True)
class Example:
    instruction: Instruction
    target: int  # the item the user chose next
    answer: str  # the verbalizer token to predict: the target's letter (T1–T3), "yes"/"no" (T0)
    intention: str | None = None  # the synthesised request text, when the instruction has one


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
    n_candidates: int = 20  # T2/T3 list length, target included
    max_history: int = 10
    max_explicit: int = 5
    liked: float = 4.0  # rating at or above: liked
    disliked: float = 2.0  # rating at or below: disliked
    explicit_window: int = 100  # explicit preferences come from this many most recent interactions
    shuffle: bool = True


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


def vague_intention(item: Item, rng: random.Random) -> str | None:
    """A need in a user's words, from the item's genres (mood phrases) and tags; None when it has neither."""
    options = [mood for genre in item.genres if (words := genre_words(genre)) for mood in words.moods]
    for tag in item.tags:
        # Tags naming a genre or a year would read as specific; tags with digits are mostly lists ("top 250").
        if (
            len(tag) < 3
            or any(ch.isdigit() for ch in tag)
            or _NOT_A_NEED.search(tag)
            or intention_kind(tag) is not Intention.I1
        ):
            continue
        if " " not in tag and _ADJECTIVE.match(tag):
            options += [f"something {tag}", f"{_a(tag)} {tag} movie"]
        else:
            options += [f"something involving {tag}", f"something people describe as '{tag}'"]
    return _first_safe(options, item, rng)


def specific_intention(item: Item, rng: random.Random) -> str | None:
    """Attributes from the item's genres and year ("a 1990s sci-fi thriller"); None when it has neither."""
    genres = [w for g in item.genres if (w := genre_words(g)) and g != "IMAX"]
    rng.shuffle(genres)
    year = item.year
    options: list[str] = []
    if genres:
        one = genres[0].noun
        two = f"{genres[0].modifier} {genres[1].noun}" if len(genres) > 1 else one
        if year:
            decade, period = _decade(year)
            options += [
                f"{_a(decade)} {decade} {two}",
                f"{_a(decade)} {decade} {one}",
                f"{_a(one)} {one} from around {year}",
                f"{_a(two)} {two} from the {period}",
                f"{_a(one)} {one} released in {year}",
                f"{_a(two)} {two} from the {decade}",
            ]
        else:
            options += [f"{_a(two)} {two}", f"{_a(one)} {one}"]
    elif year:
        decade, period = _decade(year)
        options += [f"a movie from {year}", f"something from the {decade}", f"a film from the {period}"]
    return _first_safe(options, item, rng)


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
        """One training instruction for `target`, chosen after `history` (time-ordered, oldest first)."""
        cfg = self.config
        rng = rng_for(seed, "synthesis")
        item = self.dataset.items[target]
        negatives = list(dict.fromkeys(n for n in negatives if n != target))
        if not negatives:
            raise ValueError("at least one negative (other than the target) is needed")

        liked, disliked, tags = explicit_preferences(
            history, liked=cfg.liked, disliked=cfg.disliked, window=cfg.explicit_window
        )
        liked = [i for i in liked if i != target]
        disliked = [i for i in disliked if i != target]
        intentions = {
            Intention.I0: None,
            Intention.I1: vague_intention(item, rng),
            Intention.I2: specific_intention(item, rng),
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
            liked=liked,
            disliked=disliked,
            tags=tags,
            intention=intentions[intention],
            seed=seed,
            max_history=cfg.max_history,
            max_explicit=cfg.max_explicit,
            shuffle=cfg.shuffle,
        )
        if task is Task.T0:
            answer = YES if instruction.candidates[0] == target else NO
        else:
            answer = instruction.labels[instruction.candidates.index(target)]
        return Example(instruction, target, answer, intentions[intention])

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


def _first_safe(options: list[str], item: Item, rng: random.Random) -> str | None:
    """A random option that does not leak the title, sometimes phrased as a request."""
    rng.shuffle(options)
    for option in options:
        phrase = rng.choice(_LEAD_INS).format(option) if rng.random() < _LEAD_IN_RATE else option
        if not leaks_title(phrase, item.title):
            return phrase
    return None


def _decade(year: int) -> tuple[str, str]:
    """1995 → ("1990s", "mid-90s"); 2008 → ("2000s", "late 2000s")."""
    decade = year // 10 * 10
    short = f"{decade % 100:02d}s" if decade < 2000 else f"{decade}s"
    digit = year % 10
    period = f"early {short}" if digit < 4 else f"mid-{short}" if digit < 7 else f"late {short}"
    return f"{decade}s", period


def _a(phrase: str) -> str:
    """The indefinite article as spoken: "an animated film", "an 80s film", "a 1990s film"."""
    return "an" if phrase[:1].lower() in "aeiou" or phrase.startswith(("8", "18")) else "a"


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())
