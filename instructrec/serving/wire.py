"""The wire format of a rerank request: what the stream sends to Triton and the backend decodes.

Pure and light (orjson and numpy, no torch): the client side (a Faust agent) encodes requests with it, the
Triton backend (`instructrec.serving.scorer`) decodes them. One orjson document per request (version
`WIRE_VERSION`)::

    {"v": 1, "template_id": "P2-I0-T3-01", "task": "T3",
     "parts": ["The user has watched ", {"item_id": "32", "role": "history", "title": "Twelve Monkeys (1995)"},
               ..., {"item_id": "1", "role": "candidate", "label": "a", "title": "Toy Story (1995)"}, ...],
     "candidates": [{"item_id": "1", "title": "Toy Story (1995)", "label": "a",
                     "text": "Toy Story (1995) · adventure, animation · pixar"}, ...],
     "fusion": {"retrieval_scores": [12.1, ...], "weight": 0.3}}          # optional

A candidate's optional "text" is how the reranker reads it (title, categories, a few tags:
`catalogue.describe`); without it, its title. Item ids are the catalog's string ids: the server maps them to
the reranker's collaborative rows
(`Reranker.item_row`) and items it does not know fall back to their title text, so a new catalog item is
scored without a model update. The answer is one float32 score per candidate, in the order sent; with
`fusion` it is `scoring.fuse(reranker scores, retrieval scores, weight)` (log-probabilities, higher is
better), without it the reranker's raw yes-minus-no logit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import orjson

from instructrec.instructions import Instruction, ItemMention, Role, Task

WIRE_VERSION = 1
MAX_REQUEST_BYTES = 1 << 20  # far above a real request (~5 KB); bounds what a bad client can make us parse
MAX_CANDIDATES = 256
MAX_PARTS = 4096
MAX_TEXT_CHARS = 2048  # a candidate's description
# Every per-request error message starts with this, so that a client can tell "your request is wrong" (do not
# retry, the server is fine) from a server failure through any protocol's error wrapping.
MALFORMED = "malformed reranker request"

_ROLES = frozenset(get_args(Role))
_TASKS = frozenset(task.value for task in Task)


class RequestError(ValueError):
    """One request cannot be scored; the message names the offending field. The rest of its batch is answered."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{MALFORMED}: {reason}")
        self.reason = reason


# ------------------------------------------------------------------------------------------- wire format


@dataclass(frozen=True)
class RerankRequest:
    """A decoded request. The instruction's item indices point into `item_ids` and `titles` (request-local)."""

    instruction: Instruction
    item_ids: tuple[str, ...]
    titles: tuple[str, ...]
    retrieval_scores: tuple[float, ...] | None = None
    fusion_weight: float = 0.0
    texts: tuple[str, ...] = ()  # per item: how a candidate reads to the model ("" or absent: its title)

    def text(self, index: int) -> str:
        return (self.texts[index] if index < len(self.texts) else "") or self.titles[index]

    @property
    def candidate_ids(self) -> tuple[str, ...]:
        return tuple(self.item_ids[c] for c in self.instruction.candidates)


def encode_request(
    instruction: Instruction,
    item_id_of: Callable[[int], str],
    title_of: Callable[[int], str],
    *,
    retrieval_scores: Sequence[float] | None = None,
    fusion_weight: float | None = None,
    text_of: Callable[[int], str] | None = None,
) -> bytes:
    """The wire form of `instruction` (dense item indices resolved through `item_id_of` and `title_of`;
    `text_of`: the candidates' descriptions).

    `retrieval_scores` (one per candidate, in the instruction's candidate order) and `fusion_weight` come
    together or not at all: with them the server answers fused scores.
    """
    if (retrieval_scores is None) != (fusion_weight is None):
        raise ValueError("pass retrieval_scores and fusion_weight together (or neither)")
    parts: list[Any] = []
    for part in instruction.parts:
        if isinstance(part, ItemMention):
            mention = {"item_id": str(item_id_of(part.item)), "role": part.role, "title": title_of(part.item)}
            if part.label is not None:
                mention["label"] = part.label
            parts.append(mention)
        else:
            parts.append(part)
    document: dict[str, Any] = {
        "v": WIRE_VERSION,
        "template_id": instruction.template_id,
        "task": str(instruction.task),
        "parts": parts,
        "candidates": [
            {"item_id": str(item_id_of(c)), "title": title_of(c), "label": label}
            | ({"text": text_of(c)} if text_of is not None else {})
            for c, label in zip(instruction.candidates, instruction.labels, strict=True)
        ],
    }
    if retrieval_scores is not None:
        scores = [float(s) for s in retrieval_scores]
        if len(scores) != len(instruction.candidates):
            raise ValueError(f"{len(scores)} retrieval scores for {len(instruction.candidates)} candidates")
        document["fusion"] = {"retrieval_scores": scores, "weight": float(fusion_weight)}
    return orjson.dumps(document)


def decode_request(data: bytes | str) -> RerankRequest:
    """Parse and validate one request; raises `RequestError` naming the first problem found."""
    if len(data) > MAX_REQUEST_BYTES:
        raise RequestError(f"{len(data)} bytes, more than the limit of {MAX_REQUEST_BYTES}")
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise RequestError(f"not JSON ({error})") from None
    if not isinstance(document, dict):
        raise RequestError(f"expected a JSON object, got {type(document).__name__}")
    if document.get("v") != WIRE_VERSION:
        raise RequestError(
            f"v: wire format version {document.get('v')!r} is not supported (expected {WIRE_VERSION})"
        )
    template_id = _string(document, "template_id")
    task = _string(document, "task")
    if task not in _TASKS:
        raise RequestError(f"task: {task!r} is not one of {sorted(_TASKS)}")

    items = _ItemTable()
    candidates, labels = _candidates(document.get("candidates"), items)
    parts = _parts(document.get("parts"), items)
    retrieval, weight = _fusion(document.get("fusion"), len(candidates))
    try:
        instruction = Instruction(template_id, Task(task), parts, candidates, labels)
    except ValueError as error:
        raise RequestError(str(error)) from None
    return RerankRequest(
        instruction, tuple(items.ids), tuple(items.titles), retrieval, weight, tuple(items.texts)
    )


class _ItemTable:
    """Request-local dense indices for the item ids a request mentions (one index per id)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.titles: list[str] = []
        self.texts: list[str] = []
        self._index: dict[str, int] = {}

    def index(self, item_id: str, title: str, where: str) -> int:
        known = self._index.get(item_id)
        if known is None:
            self._index[item_id] = known = len(self.ids)
            self.ids.append(item_id)
            self.titles.append(title)
            self.texts.append("")
        elif self.titles[known] != title:
            raise RequestError(
                f"{where}: item {item_id!r} has two titles, {self.titles[known]!r} and {title!r}"
            )
        return known


def _string(obj: Mapping[str, Any], key: str, where: str = "", *, empty: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or (not empty and not value):
        raise RequestError(f"{where}{key}: expected a non-empty string, got {value!r}"[:300])
    return value


def _list(value: Any, where: str, limit: int) -> list:
    if not isinstance(value, list):
        raise RequestError(f"{where}: expected a list, got {type(value).__name__}")
    if len(value) > limit:
        raise RequestError(f"{where}: {len(value)} entries, more than the limit of {limit}")
    return value


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise RequestError(f"{where}: expected an object, got {value!r}"[:300])
    return value


def _candidates(value: Any, items: _ItemTable) -> tuple[tuple[int, ...], tuple[str, ...]]:
    entries = _list(value, "candidates", MAX_CANDIDATES)
    if not entries:
        raise RequestError("candidates: at least one candidate is needed")
    indices, labels = [], []
    for i, entry in enumerate(entries):
        where = f"candidates[{i}]."
        entry = _object(entry, where[:-1])
        index = items.index(
            _string(entry, "item_id", where), _string(entry, "title", where, empty=True), where
        )
        if index in indices:
            raise RequestError(f"{where}item_id: {items.ids[index]!r} is already a candidate")
        text = entry.get("text")
        if text is not None:
            if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
                raise RequestError(f"{where}text: expected a string of at most {MAX_TEXT_CHARS} characters")
            items.texts[index] = text
        indices.append(index)
        labels.append(_string(entry, "label", where))
    return tuple(indices), tuple(labels)


def _parts(value: Any, items: _ItemTable) -> tuple[str | ItemMention, ...]:
    parts: list[str | ItemMention] = []
    for i, part in enumerate(_list(value, "parts", MAX_PARTS)):
        if isinstance(part, str):
            parts.append(part)
            continue
        where = f"parts[{i}]."
        part = _object(part, where[:-1])
        role = _string(part, "role", where)
        if role not in _ROLES:
            raise RequestError(f"{where}role: {role!r} is not one of {sorted(_ROLES)}")
        label = part.get("label")
        if label is not None and not isinstance(label, str):
            raise RequestError(f"{where}label: expected a string or nothing, got {label!r}"[:300])
        index = items.index(_string(part, "item_id", where), _string(part, "title", where, empty=True), where)
        parts.append(ItemMention(index, role, label))  # type: ignore[arg-type]  # role checked above
    return tuple(parts)


def _fusion(value: Any, n_candidates: int) -> tuple[tuple[float, ...] | None, float]:
    if value is None:
        return None, 0.0
    fusion = _object(value, "fusion")
    scores = _list(fusion.get("retrieval_scores"), "fusion.retrieval_scores", MAX_CANDIDATES)
    if len(scores) != n_candidates:
        raise RequestError(f"fusion.retrieval_scores: {len(scores)} scores for {n_candidates} candidates")
    if not all(_finite(s) for s in scores):
        raise RequestError("fusion.retrieval_scores: every score must be a finite number")
    weight = fusion.get("weight")
    if not _finite(weight) or weight < 0:
        raise RequestError(f"fusion.weight: expected a finite number ≥ 0, got {weight!r}")
    return tuple(float(s) for s in scores), float(weight)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
