"""The instruction layer: the P/I/T taxonomy, templates, rendering and training-instruction synthesis."""

from instructrec.instructions.instruction import LETTERS, NO, YES, Instruction, ItemMention, Role
from instructrec.instructions.intent import Ask, compliance, parse_ask
from instructrec.instructions.render import choose_template, render, resolve
from instructrec.instructions.request import request_instruction
from instructrec.instructions.synthesis import (
    Example,
    RandomNegatives,
    Request,
    SynthesisConfig,
    Synthesizer,
    Wish,
    explicit_preferences,
    negative_intention,
    specific_intention,
    vague_intention,
)
from instructrec.instructions.taxonomy import COMBINATIONS, Combination, Intention, Preference, Task
from instructrec.instructions.templates import TEMPLATES, Template, get_template, templates_for
from instructrec.instructions.vocabulary import intention_kind

__all__ = [
    "COMBINATIONS",
    "LETTERS",
    "NO",
    "TEMPLATES",
    "YES",
    "Ask",
    "Combination",
    "Example",
    "Instruction",
    "Intention",
    "ItemMention",
    "Preference",
    "RandomNegatives",
    "Request",
    "Role",
    "SynthesisConfig",
    "Synthesizer",
    "Task",
    "Template",
    "Wish",
    "choose_template",
    "compliance",
    "explicit_preferences",
    "get_template",
    "intention_kind",
    "negative_intention",
    "parse_ask",
    "render",
    "request_instruction",
    "resolve",
    "specific_intention",
    "templates_for",
    "vague_intention",
]
