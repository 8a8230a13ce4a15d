"""Rendering a template into an `Instruction`, deterministically for a seed, and choosing one for live requests.

The seed drives three independent choices, each from its own stream so that changing one (e.g. turning
shuffling off) leaves the others as they were: the template when only a combination is given, the
paraphrase alternatives, and the candidate order. Candidates are shuffled by default because LLM rankers
favour some positions; training on shuffled lists, and serving them shuffled, keeps position from carrying
signal.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from instructrec.data.dataset import MOVIES, Nouns
from instructrec.instructions.instruction import LETTERS, YES, Instruction, ItemMention, Role
from instructrec.instructions.taxonomy import Combination, Intention, Preference, Task
from instructrec.instructions.templates import NOUN_SLOTS, PLACEHOLDER, Template, get_template, templates_for
from instructrec.instructions.vocabulary import intention_kind

_ALTERNATIVES = re.compile(r"\[([^\[\]]*)\]")
_NOUN = re.compile(r"\{(" + "|".join(sorted(NOUN_SLOTS)) + r")\}")
_LIKED = ("loved {}", "rated {} highly", "enjoyed {}", "gave high ratings to {}")
_DISLIKED = ("disliked {}", "did not enjoy {}", "rated {} poorly", "gave low ratings to {}")
_TAGGED = ("tagged {items} with {{}}", "described {items} they {did} as {{}}", "used tags such as {{}}")

Part = str | ItemMention


def rng_for(seed: int, purpose: str) -> random.Random:
    """A generator for one purpose; string seeds hash the same in every process (unlike hash())."""
    return random.Random(f"{seed}:{purpose}")


def resolve(template: Template | str, seed: int = 0) -> Template:
    """A template, a template id ("P1-I0-T3-02") or a combination ("P1-I0-T3": one of its templates, by seed)."""
    if isinstance(template, Template):
        return template
    if template.count("-") == 2:
        return rng_for(seed, "template").choice(templates_for(template))
    return get_template(template)


def render(
    template: Template | str,
    *,
    candidates: Sequence[int],
    history: Sequence[int] = (),
    liked: Sequence[int] = (),
    disliked: Sequence[int] = (),
    tags: Sequence[str] = (),
    intention: str | None = None,
    seed: int = 0,
    max_history: int = 10,
    max_explicit: int = 5,
    shuffle: bool = True,
    nouns: Nouns = MOVIES,
) -> Instruction:
    """Render a template for one user and candidate list, in the catalogue's words (`nouns`).

    history, liked and disliked are item indices, most recent last, cut to the most recent `max_history`
    (history) or `max_explicit` (liked, disliked); tags are the user's own words, most important first, cut
    to `max_explicit`. Inputs the template's combination does not use are ignored.
    """
    if max_history < 1 or max_explicit < 1:
        raise ValueError("max_history and max_explicit must be at least 1")
    template = resolve(template, seed)
    combination = template.combination
    intention = _clean(intention)
    _check_inputs(
        template, candidates, len(history) > 0, len(liked) + len(disliked) + len(tags) > 0, intention
    )

    order = [int(c) for c in candidates]  # plain ints, also from numpy rows
    if shuffle:
        rng_for(seed, "shuffle").shuffle(order)
    labels = (YES,) if template.task is Task.T0 else tuple(LETTERS[: len(order)])
    paraphrase = rng_for(seed, "paraphrase")

    slots: dict[str, list[Part]] = {
        "history": _items(history[-max_history:], "history"),
        "intention": [intention] if intention else [],
        "candidates": _candidates(order, labels, template.task),
        "candidate": [ItemMention(order[0], "candidate")] if template.task is Task.T0 else [],
    }
    if combination.preference is Preference.P2:
        slots["explicit"] = _explicit(
            liked[-max_explicit:], disliked[-max_explicit:], tags[:max_explicit], paraphrase, nouns
        )

    parts: list[Part] = []
    words = {name: getattr(nouns, name) for name in NOUN_SLOTS}
    for clause in template.clauses:
        clause = _NOUN.sub(lambda m: words[m.group(1)], clause)
        clause = _ALTERNATIVES.sub(lambda m: paraphrase.choice(m.group(1).split("|")), clause)
        if any(not slots[name] for name in PLACEHOLDER.findall(clause)):
            continue  # an optional slot left empty (P2 without history): drop the clause, keep the grammar
        if parts:
            parts.append(" ")
        for i, piece in enumerate(PLACEHOLDER.split(clause)):
            # re.split with one group alternates text and placeholder names
            parts.extend(slots[piece] if i % 2 else [piece])
    return Instruction(template.id, template.task, _merge(parts), tuple(order), labels)


def choose_template(
    intention: str | None = None,
    *,
    has_history: bool = True,
    has_explicit: bool = False,
    task: Task = Task.T3,
    seed: int = 0,
) -> Template:
    """The template for a live request.

    No request text: ⟨P1 or P2, I0, T3⟩ (sequential recommendation); with text: ⟨P·, I1/I2, T3⟩ (personalised
    search), I2 when the text names a genre or a period (`intention_kind`). P2 when the user has explicit
    preferences (likes, dislikes, tags), else P1 with a history, else P0 (then a request text is required).
    """
    preference = Preference.P2 if has_explicit else Preference.P1 if has_history else Preference.P0
    combination = Combination(preference, intention_kind(intention), task)
    if not combination.valid:
        raise ValueError("no history, no explicit preferences and no request text: nothing to personalise on")
    return rng_for(seed, "template").choice(templates_for(combination))


def _clean(intention: str | None) -> str | None:
    """Collapse whitespace and drop surrounding quotes and final punctuation: templates add their own."""
    if intention is None:
        return None
    text = " ".join(intention.split()).strip("\"'“”").rstrip(".!").strip()
    return text or None


def _check_inputs(
    template: Template, candidates: Sequence[int], history: bool, explicit: bool, intention: str | None
) -> None:
    c = template.combination
    missing = [
        what
        for what, needed, given in (
            ("history", c.preference is Preference.P1, history),
            ("liked, disliked or tags", c.preference is Preference.P2, explicit),
            ("intention text", c.intention is not Intention.I0, intention),
        )
        if needed and not given
    ]
    if missing:
        raise ValueError(f"template {template.id} needs {' and '.join(missing)}")
    n = len(candidates)
    expected = {Task.T0: (1, 1), Task.T1: (2, 2)}.get(c.task, (2, len(LETTERS)))
    if not expected[0] <= n <= expected[1]:
        raise ValueError(f"{c.task.value} takes {expected[0]}..{expected[1]} candidates, got {n}")
    if len(set(candidates)) != n:
        raise ValueError("candidates repeat an item")


def _items(items: Sequence[int], role: Role) -> list[Part]:
    parts: list[Part] = []
    for i, item in enumerate(items):
        if i:
            parts.append(", ")
        parts.append(ItemMention(int(item), role))
    return parts


def _candidates(order: list[int], labels: tuple[str, ...], task: Task) -> list[Part]:
    if task is Task.T0:
        return []
    separator = " or " if task is Task.T1 else " "
    parts: list[Part] = []
    for i, (item, label) in enumerate(zip(order, labels, strict=True)):
        if i:
            parts.append(separator)
        parts.append(ItemMention(int(item), "candidate", label))
    return parts


def _explicit(liked, disliked, tags, rng: random.Random, nouns: Nouns) -> list[Part]:
    """A past-tense verb phrase ("loved A, B; disliked C; and tagged movies with 'dark'"): fits "the user" and
    "they" alike."""
    pieces: list[list[Part]] = []
    for phrases, items, role in ((_LIKED, liked, "liked"), (_DISLIKED, disliked, "disliked")):
        if items:
            before, after = rng.choice(phrases).split("{}")
            pieces.append([before, *_items(items, role), after])
    if tags:
        before, after = rng.choice(_TAGGED).format(items=nouns.items, did=nouns.did).split("{}")
        pieces.append([before + ", ".join(f"'{t}'" for t in tags) + after])
    parts: list[Part] = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append("; and " if i == len(pieces) - 1 else "; ")
        parts.extend(piece)
    return parts


def _merge(parts: list[Part]) -> tuple[Part, ...]:
    """Join neighbouring strings and drop empty ones, so parts alternate text and mentions."""
    merged: list[Part] = []
    for part in parts:
        if isinstance(part, str):
            if not part:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += part
                continue
        merged.append(part)
    return tuple(merged)
