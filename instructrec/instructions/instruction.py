"""What a rendered instruction is: text fragments interleaved with item mentions, plus the candidates to score.

The model tokenises each part, cuts every title to its token budget and may attach item-level features at
the mention positions; `Instruction.text` gives the same instruction as one string (logs, Triton requests,
the paper-style view).

Verbalizer convention (how a candidate's score is read from the model):
- T2 matching, T3 reranking: candidates are shown as "(a) Title (b) Title ..." and `labels` holds their
  letters ("a".."z", at most 26); a candidate's score is the logit of its letter.
- T1 pairwise: two candidates, labels ("a", "b"), scored the same way.
- T0 pointwise: one candidate, labels ("yes",): its score is logit("yes") − logit("no").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from instructrec.instructions.taxonomy import Combination, Task

Role = Literal["history", "liked", "disliked", "candidate"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
YES, NO = "yes", "no"


@dataclass(frozen=True, slots=True)
class ItemMention:
    item: int  # dense item index
    role: Role
    label: str | None = None  # a candidate's letter, shown as "(a) " before its title

    def text(self, title: str) -> str:
        return f"({self.label}) {title}" if self.label else title


@dataclass(frozen=True, slots=True)
class Instruction:
    template_id: str
    task: Task
    parts: tuple[str | ItemMention, ...]
    candidates: tuple[int, ...]  # dense item indices, in the order presented
    labels: tuple[str, ...]  # verbalizer token per candidate (see the module docstring)

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.candidates):
            raise ValueError(f"{len(self.candidates)} candidates but {len(self.labels)} labels")

    @property
    def combination(self) -> Combination:
        return Combination.parse(self.template_id)

    def mentions(self, role: Role | None = None) -> tuple[ItemMention, ...]:
        return tuple(p for p in self.parts if isinstance(p, ItemMention) and (role is None or p.role == role))

    def text(self, title_of: Callable[[int], str]) -> str:
        return "".join(p.text(title_of(p.item)) if isinstance(p, ItemMention) else p for p in self.parts)
