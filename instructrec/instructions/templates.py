"""Instruction templates over the valid ⟨preference, intention, task⟩ combinations, in the paper's style.

A template is a few clauses. Clauses hold placeholders and paraphrase alternatives:
- `{history}` the user's recent titles (P1 requires it; P2 may use it, the clause is dropped when empty),
  `{explicit}` likes/dislikes/tags as a past-tense verb phrase (P2), `{intention}` the request text (I1/I2),
  `{candidates}` the lettered candidates (T1–T3) or `{candidate}` the single one (T0);
- `[x|y]` one of x or y, chosen by the render seed;
- `{item}`, `{items}`, `{did}`, `{do}`, `{person}`, `{activity}`: the catalogue's words (`data.Nouns`:
  movie/movies/watched/watch/viewer/viewing for films, game/games/played/play/player/playing for games, ...).
Ids are "<combination>-<nn>", numbered in the order below. They are logged with every recommendation and
baked into trained models: append new templates at the end of their combination, never renumber.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from instructrec.instructions.taxonomy import Combination, Intention, Preference, Task

PLACEHOLDER = re.compile(r"\{(\w+)\}")
NOUN_SLOTS = frozenset({"item", "items", "did", "do", "person", "activity"})  # filled from `data.Nouns`

# (combination, clauses) in id order within each combination.
_SOURCE: tuple[tuple[str, tuple[str, ...]], ...] = (
    # ---- sequential recommendation: history only (the live default without a request) ----
    (
        "P1-I0-T3",
        (
            "The user has {did} the following {items} in order: {history}.",
            "Rank the candidate {items} by how likely the user is to {do} each one next: {candidates}.",
            "Answer with the letters of the candidates, best first.",
        ),
    ),
    (
        "P1-I0-T3",
        (
            "Here is a {person}'s [{do} history|{activity} history], oldest to newest: {history}.",
            "Which of these should we recommend next? {candidates}.",
            "Order the options from best to worst and reply with their letters.",
        ),
    ),
    (
        "P1-I0-T3",
        (
            "A user recently {did} {history}, in that order.",
            "Based on [these {activity} habits|this history], rank the following candidates: {candidates}.",
            "Give the letter of the most fitting {item} first.",
        ),
    ),
    (
        "P1-I0-T3",
        (
            "Given the sequence of {items} a user has {did} ({history}), predict which candidate they "
            "will {do} next and rank all of them: {candidates}.",
            "Respond with candidate letters only.",
        ),
    ),
    (
        "P1-I0-T2",
        (
            "The user has {did} the following {items} in order: {history}.",
            "Which of these candidates will they {do} next? {candidates}.",
            "Answer with the letter of that {item}.",
        ),
    ),
    (
        "P1-I0-T2",
        (
            "Having {did} {history}, a {person} picks one more {item}.",
            "Which one is it? {candidates}.",
            "Reply with its letter.",
        ),
    ),
    (
        "P1-I0-T1",
        (
            "The user has {did} the following {items} in order: {history}.",
            "Which would they rather {do} next: {candidates}?",
            "Answer a or b.",
        ),
    ),
    (
        "P1-I0-T0",
        (
            "The user has {did} the following {items} in order: {history}.",
            "Would they [enjoy|want to {do}] {candidate} next?",
            "Answer yes or no.",
        ),
    ),
    # ---- explicit preferences, no request ----
    (
        "P2-I0-T3",
        (
            "The user has {did} {history}.",
            "[From their ratings and tags|From what they told us], the user {explicit}.",
            "Rank these candidates by how well they match the user's taste: {candidates}.",
            "Answer with the letters, best first.",
        ),
    ),
    (
        "P2-I0-T3",
        (
            "Here is what we know about a {person}'s taste: they {explicit}.",
            "Recently they {did} {history}.",
            "Rank the following {items} for them: {candidates}.",
            "Reply with the candidate letters in order of preference.",
        ),
    ),
    (
        "P2-I0-T3",
        (
            "A user {explicit}.",
            "Their latest {items} were {history}.",
            "Which of these candidates would they enjoy most? {candidates}.",
            "Rank all of them and answer with letters.",
        ),
    ),
    (
        "P2-I0-T2",
        (
            "A user {explicit}.",
            "Their [most recent|latest] {items} were {history}.",
            "Which of these will they pick next? {candidates}.",
            "Answer with its letter.",
        ),
    ),
    (
        "P2-I0-T1",
        (
            "The user {explicit}.",
            "They recently {did} {history}.",
            "Which would they prefer: {candidates}?",
            "Answer a or b.",
        ),
    ),
    (
        "P2-I0-T0",
        (
            "The user {explicit}.",
            "They recently {did} {history}.",
            "Will they like {candidate}?",
            "Answer yes or no.",
        ),
    ),
    # ---- history and a vague request ----
    (
        "P1-I1-T3",
        (
            "The user has {did} the following {items} in order: {history}.",
            'Now they [say|tell us]: "{intention}".',
            "Rank the candidates by how well they fit this request and the user's taste: {candidates}.",
            "Answer with the letters, best first.",
        ),
    ),
    (
        "P1-I1-T3",
        (
            "A {person} who recently {did} {history} is looking for something new.",
            'Their request: "{intention}".',
            "Order these options from best to worst match: {candidates}.",
            "Reply with candidate letters.",
        ),
    ),
    (
        "P1-I1-T2",
        (
            "The user has {did} {history}.",
            'They ask for "{intention}".',
            "Which candidate fits best? {candidates}.",
            "Answer with its letter.",
        ),
    ),
    (
        "P1-I1-T1",
        (
            'The user has {did} {history} and now wants "{intention}".',
            "Which suits them better: {candidates}?",
            "Answer a or b.",
        ),
    ),
    (
        "P1-I1-T0",
        (
            "The user has {did} {history}.",
            'They are [in the mood for|looking for] "{intention}".',
            "Is {candidate} a good recommendation?",
            "Answer yes or no.",
        ),
    ),
    # ---- history and a specific request ----
    (
        "P1-I2-T3",
        (
            "The user has {did} {history}, in that order.",
            'They are searching for "{intention}".',
            "Rank the candidates by how well they match both the description and the user's history: "
            "{candidates}.",
            "Answer with the letters, best first.",
        ),
    ),
    (
        "P1-I2-T3",
        (
            "Viewing history (oldest first): {history}.",
            'Request: "{intention}".',
            "Rank [these candidates|the following {items}] for this user: {candidates}.",
            "Give the letters in order.",
        ),
    ),
    (
        "P1-I2-T2",
        (
            'A user who {did} {history} wants "{intention}".',
            "Which candidate is the {item} they are after? {candidates}.",
            "Answer with its letter.",
        ),
    ),
    (
        "P1-I2-T1",
        (
            "The user has {did} {history}.",
            'They want "{intention}".',
            "Which is the better match: {candidates}?",
            "Answer a or b.",
        ),
    ),
    (
        "P1-I2-T0",
        (
            'The user has {did} {history} and asks for "{intention}".',
            "Does {candidate} fit [the request|what they want]?",
            "Answer yes or no.",
        ),
    ),
    # ---- explicit preferences and a vague request ----
    (
        "P2-I1-T3",
        (
            "The user {explicit}.",
            "They recently {did} {history}.",
            'Today they [say|write]: "{intention}".',
            "Rank these candidates for them: {candidates}.",
            "Answer with the letters, best first.",
        ),
    ),
    (
        "P2-I1-T3",
        (
            "Here is a user's taste: they {explicit}.",
            'Their request: "{intention}".',
            "Order the options from best to worst: {candidates}.",
            "Reply with candidate letters.",
        ),
    ),
    (
        "P2-I1-T2",
        (
            "A user {explicit}.",
            'They ask for "{intention}".',
            "Which candidate should we recommend? {candidates}.",
            "Answer with its letter.",
        ),
    ),
    (
        "P2-I1-T1",
        (
            "The user {explicit}.",
            'Now they want "{intention}".',
            "Which suits them better: {candidates}?",
            "Answer a or b.",
        ),
    ),
    (
        "P2-I1-T0",
        (
            "The user {explicit}.",
            'They are [in the mood for|asking for] "{intention}".',
            "Would they enjoy {candidate}?",
            "Answer yes or no.",
        ),
    ),
    # ---- explicit preferences and a specific request ----
    (
        "P2-I2-T3",
        (
            "The user {explicit}.",
            "They recently {did} {history}.",
            'They are looking for "{intention}".',
            "Rank the candidates by how well they fit: {candidates}.",
            "Answer with the letters, best first.",
        ),
    ),
    (
        "P2-I2-T3",
        (
            "User taste: they {explicit}.",
            'Request: "{intention}".',
            "Rank [these candidates|the following {items}]: {candidates}.",
            "Give the letters in order.",
        ),
    ),
    (
        "P2-I2-T2",
        (
            "A user {explicit}.",
            'They want "{intention}".',
            "Which candidate is it? {candidates}.",
            "Answer with its letter.",
        ),
    ),
    (
        "P2-I2-T1",
        (
            "The user {explicit}.",
            'They ask for "{intention}".',
            "Which is the better match: {candidates}?",
            "Answer a or b.",
        ),
    ),
    (
        "P2-I2-T0",
        (
            "The user {explicit}.",
            'They want "{intention}".',
            "Does {candidate} match?",
            "Answer yes or no.",
        ),
    ),
    # ---- a request and nothing known about the user (cold start search) ----
    (
        "P0-I1-T3",
        (
            'A user [asks for|is looking for] "{intention}".',
            "Rank these {items} by how well they match the request: {candidates}.",
            "Answer with the letters, best first.",
        ),
    ),
    (
        "P0-I1-T3",
        (
            'Request: "{intention}".',
            "Order the following candidates from best to worst match: {candidates}.",
            "Reply with their letters.",
        ),
    ),
    (
        "P0-I1-T2",
        (
            'A user says: "{intention}".',
            "Which of these {items} do they want? {candidates}.",
            "Answer with its letter.",
        ),
    ),
    (
        "P0-I1-T1",
        (
            'A user wants "{intention}".',
            "Which fits better: {candidates}?",
            "Answer a or b.",
        ),
    ),
    (
        "P0-I1-T0",
        (
            'A user wants "{intention}".',
            "Is {candidate} a good fit?",
            "Answer yes or no.",
        ),
    ),
    (
        "P0-I2-T3",
        (
            'Find {items} matching this description: "{intention}".',
            "Rank the candidates: {candidates}.",
            "Answer with the letters, best first.",
        ),
    ),
    (
        "P0-I2-T3",
        (
            'A user is searching for "{intention}".',
            "Rank [these candidates|the following {items}] by how well they match: {candidates}.",
            "Give the letters in order.",
        ),
    ),
    (
        "P0-I2-T2",
        (
            'Which of these {items} is "{intention}"? {candidates}.',
            "Answer with its letter.",
        ),
    ),
    (
        "P0-I2-T1",
        (
            'A user searches for "{intention}".',
            "Which matches better: {candidates}?",
            "Answer a or b.",
        ),
    ),
    (
        "P0-I2-T0",
        (
            'Does {candidate} match the description "{intention}"?',
            "Answer yes or no.",
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class Template:
    id: str
    combination: Combination
    clauses: tuple[str, ...]

    @property
    def task(self) -> Task:
        return self.combination.task

    @property
    def placeholders(self) -> frozenset[str]:
        """The slots the template fills with the request's parts (the catalogue's words are not counted)."""
        return frozenset(PLACEHOLDER.findall(" ".join(self.clauses))) - NOUN_SLOTS


def check(template: Template) -> None:
    """Raise ValueError unless the placeholders are exactly what the combination calls for."""
    c, used = template.combination, template.placeholders
    required = {"candidate"} if c.task is Task.T0 else {"candidates"}
    allowed = set(required)
    if c.preference is Preference.P1:
        required.add("history")
    if c.preference is Preference.P2:
        required.add("explicit")
        allowed.add("history")  # optional: the clause is dropped when there is no history
    if c.intention is not Intention.I0:
        required.add("intention")
    allowed |= required
    if not c.valid or not required <= used <= allowed:
        raise ValueError(
            f"template {template.id} uses {sorted(used)}; {c.code} needs {sorted(required)}, "
            f"allows {sorted(allowed)}"
        )
    names = [n for n in PLACEHOLDER.findall(" ".join(template.clauses)) if n not in NOUN_SLOTS]
    if len(names) != len(used):
        raise ValueError(f"template {template.id} uses a placeholder twice: {names}")


def _build() -> dict[str, Template]:
    counts: dict[str, int] = defaultdict(int)
    templates: dict[str, Template] = {}
    for code, clauses in _SOURCE:
        counts[code] += 1
        template = Template(f"{code}-{counts[code]:02d}", Combination.parse(code), clauses)
        check(template)
        templates[template.id] = template
    return templates


TEMPLATES: dict[str, Template] = _build()
_BY_COMBINATION: dict[str, list[Template]] = defaultdict(list)
for _template in TEMPLATES.values():
    _BY_COMBINATION[_template.combination.code].append(_template)


def templates_for(combination: Combination | str) -> list[Template]:
    """The templates of a combination ("P1-I0-T3" or a `Combination`), in id order."""
    code = combination if isinstance(combination, str) else combination.code
    if code not in _BY_COMBINATION:
        raise KeyError(f"no template for {code!r}")
    return list(_BY_COMBINATION[code])


def get_template(template_id: str) -> Template:
    try:
        return TEMPLATES[template_id]
    except KeyError:
        raise KeyError(f"unknown template id {template_id!r}") from None
