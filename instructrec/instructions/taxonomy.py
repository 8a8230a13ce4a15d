"""The InstructRec instruction taxonomy (DESIGN §2): preference × intention × task form.

Member names follow the paper's codes (P0..P2, I0..I2, T0..T3); descriptive aliases read better in code
(`Task.RERANKING is Task.T3`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from itertools import product


class Preference(StrEnum):
    P0 = "P0"  # none
    P1 = "P1"  # implicit: titles the user interacted with, most recent last
    P2 = "P2"  # explicit: what the user said (likes/dislikes from ratings, tags, review text)
    NONE = "P0"
    IMPLICIT = "P1"
    EXPLICIT = "P2"


class Intention(StrEnum):
    I0 = "I0"  # none
    I1 = "I1"  # vague: a need in the user's words ("something light to watch with kids")
    I2 = "I2"  # specific: attributes ("a 1990s sci-fi thriller")
    NONE = "I0"
    VAGUE = "I1"
    SPECIFIC = "I2"


class Task(StrEnum):
    T0 = "T0"  # pointwise: will the user like X? (yes/no)
    T1 = "T1"  # pairwise: A or B?
    T2 = "T2"  # matching: which candidate is the item the user wants?
    T3 = "T3"  # reranking: order these candidates
    POINTWISE = "T0"
    PAIRWISE = "T1"
    MATCHING = "T2"
    RERANKING = "T3"


@dataclass(frozen=True, slots=True)
class Combination:
    preference: Preference
    intention: Intention
    task: Task

    @property
    def code(self) -> str:
        return f"{self.preference.value}-{self.intention.value}-{self.task.value}"

    @classmethod
    def parse(cls, code: str) -> Combination:
        """ "P1-I0-T3" (a template id's prefix) → Combination."""
        try:
            p, i, t = code.split("-")[:3]
            return cls(Preference(p), Intention(i), Task(t))
        except ValueError:
            raise ValueError(f"{code!r} is not a combination code like 'P1-I0-T3'") from None

    @property
    def valid(self) -> bool:
        # With neither a preference nor an intention there is nothing to personalise on.
        return self.preference is not Preference.P0 or self.intention is not Intention.I0


COMBINATIONS = tuple(
    c for c in (Combination(p, i, t) for p, i, t in product(Preference, Intention, Task)) if c.valid
)
