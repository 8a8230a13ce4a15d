"""The instruction for a live request (and for evaluation, which must see exactly what serving sees)."""

from __future__ import annotations

from collections.abc import Sequence

from instructrec.data.dataset import MOVIES, Interaction, Nouns
from instructrec.instructions.instruction import Instruction
from instructrec.instructions.render import choose_template, render
from instructrec.instructions.synthesis import explicit_preferences


def request_instruction(
    history: Sequence[Interaction],
    candidates: Sequence[int],
    *,
    intention: str | None = None,
    seed: int = 0,
    max_history: int = 10,
    max_explicit: int = 5,
    use_explicit: bool = True,
    shuffle: bool = True,
    nouns: Nouns = MOVIES,
) -> Instruction:
    """Choose the template (`choose_template`) and render it from the user's interactions, oldest first.

    Explicit preferences (P2) come from ratings and tags in the history, as in training
    (`explicit_preferences`); `use_explicit=False` keeps to the titles alone (P1).
    """
    liked, disliked, tags = explicit_preferences(history) if use_explicit else ([], [], [])
    template = choose_template(
        intention, has_history=bool(history), has_explicit=bool(liked or disliked or tags), seed=seed
    )
    return render(
        template,
        candidates=candidates,
        history=[x.item for x in history],
        liked=liked,
        disliked=disliked,
        tags=tags,
        intention=intention,
        seed=seed,
        max_history=max_history,
        max_explicit=max_explicit,
        shuffle=shuffle,
        nouns=nouns,
    )
