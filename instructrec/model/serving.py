"""Serving the reranker: the wire format of a rerank request and the batched server-side scorer.

Pure: no network. The Triton backend (`deploy/triton/instructrec_reranker/1/model.py`) is a thin shell around
`ServingScorer`; the client adapter (`instructrec.triton`) and the streaming layer send what `encode_request`
makes. In-process and served scores therefore come from one implementation (`Reranker.forward`).

Wire format: one orjson document per request (version `WIRE_VERSION`)::

    {"v": 1, "template_id": "P2-I0-T3-01", "task": "T3",
     "parts": ["The user has watched ", {"item_id": "32", "role": "history", "title": "Twelve Monkeys (1995)"},
               ..., {"item_id": "1", "role": "candidate", "label": "a", "title": "Toy Story (1995)"}, ...],
     "candidates": [{"item_id": "1", "title": "Toy Story (1995)", "label": "a"}, ...],
     "fusion": {"retrieval_scores": [12.1, ...], "weight": 0.3}}          # optional

Item ids are the catalog's string ids: the server maps them to the reranker's collaborative rows
(`Reranker.item_row`) and items it does not know fall back to their title text, so a new catalog item is
scored without a model update. The answer is one float32 score per candidate, in the order sent; with
`fusion` it is `scoring.fuse(reranker scores, retrieval scores, weight)` (log-probabilities, higher is
better), without it the reranker's raw yes-minus-no logit.

The client side must stay light (a Faust agent encodes requests), so this module imports torch and the
model code only inside the functions that score.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import orjson

from instructrec.instructions import Instruction, ItemMention, Role, Task

if TYPE_CHECKING:
    from instructrec.model.reranker import Reranker

WIRE_VERSION = 1
MAX_REQUEST_BYTES = 1 << 20  # far above a real request (~5 KB); bounds what a bad client can make us parse
MAX_CANDIDATES = 256
MAX_PARTS = 4096
# Every per-request error message starts with this, so that a client can tell "your request is wrong" (do not
# retry, the server is fine) from a server failure through any protocol's error wrapping.
MALFORMED = "malformed reranker request"
WEIGHTS_DIR = "reranker"  # a model version folder holds the saved `Reranker` here

log = logging.getLogger(__name__)
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
) -> bytes:
    """The wire form of `instruction` (dense item indices resolved through `item_id_of` and `title_of`).

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
    return RerankRequest(instruction, tuple(items.ids), tuple(items.titles), retrieval, weight)


class _ItemTable:
    """Request-local dense indices for the item ids a request mentions (one index per id)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.titles: list[str] = []
        self._index: dict[str, int] = {}

    def index(self, item_id: str, title: str, where: str) -> int:
        known = self._index.get(item_id)
        if known is None:
            self._index[item_id] = known = len(self.ids)
            self.ids.append(item_id)
            self.titles.append(title)
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


# ------------------------------------------------------------------------------------------------ scoring


class ServingScorer:
    """Scores a dynamic batch of wire requests in ONE forward pass of the reranker.

    Decoding errors are per request: a malformed request gets its `RequestError` and the others their scores.
    The reranker should already be prepared for serving (`prepare`: eval mode, device, precision).
    """

    def __init__(self, reranker: Reranker, device: str = "cpu") -> None:
        self.reranker = reranker.eval()
        self.device = device
        self.tokenizer = reranker.text_tokenizer()

    def score(self, requests: Sequence[bytes | str]) -> list[np.ndarray | RequestError]:
        """float32 scores per candidate of each request (in the order sent), or that request's error."""
        decoded: list[RerankRequest | RequestError] = []
        for data in requests:
            try:
                decoded.append(decode_request(data))
            except RequestError as error:
                decoded.append(error)
        valid = [d for d in decoded if isinstance(d, RerankRequest)]
        scores = iter(self.score_decoded(valid))
        return [d if isinstance(d, RequestError) else next(scores) for d in decoded]

    def score_decoded(self, requests: Sequence[RerankRequest]) -> list[np.ndarray]:
        from instructrec.model.scoring import fuse

        if not requests:
            return []
        raw = self._forward(requests)
        out = []
        for row, request in enumerate(requests):
            scores = raw[row, : len(request.instruction.candidates)]
            if request.retrieval_scores is not None:
                scores = fuse(scores, np.asarray(request.retrieval_scores), request.fusion_weight)
            out.append(np.asarray(scores, dtype=np.float32))
        return out

    def score_triton(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray | RequestError]:
        """Triton's view: each request's REQUEST tensor ([n, 1] documents) → SCORES [n, most candidates].

        Clients send one document per Triton request; a request with several gets them padded with -inf
        (as `Reranker.forward` pads) and fails as a whole if any document is malformed.
        """
        flat = [document for tensor in inputs for document in np.asarray(tensor, dtype=object).reshape(-1)]
        results = iter(self.score(flat))
        out: list[np.ndarray | RequestError] = []
        for tensor in inputs:
            group = [next(results) for _ in range(np.asarray(tensor, dtype=object).size)]
            out.append(_stack(group))
        return out

    def _forward(self, requests: Sequence[RerankRequest]) -> np.ndarray:
        """[requests, most candidates] raw scores, every request of the batch in one collated pass."""
        import torch

        titles: list[str] = []
        rows: list[int] = []
        instructions = []
        for request in requests:
            # Shift each request's local item indices past the previous requests' items: one shared table.
            instructions.append(_shifted(request.instruction, len(titles)))
            titles.extend(request.titles)
            rows.extend(self.reranker.item_row(item_id) for item_id in request.item_ids)
        batch = self.tokenizer.collate(instructions, titles.__getitem__, rows.__getitem__)
        # On an accelerator, torch.device(...) as a context puts the masks `Batch` builds on the fly on the
        # model's device. Not on the CPU: the context is a torch function mode that every op would pay for.
        placement = torch.device(self.device) if self.device != "cpu" else contextlib.nullcontext()
        with torch.inference_mode(), placement:
            scores = self.reranker(_to_device(batch, self.device))
        return scores.float().cpu().numpy()


def _shifted(instruction: Instruction, offset: int) -> Instruction:
    if offset == 0:
        return instruction
    parts = tuple(
        replace(p, item=p.item + offset) if isinstance(p, ItemMention) else p for p in instruction.parts
    )
    return replace(instruction, parts=parts, candidates=tuple(c + offset for c in instruction.candidates))


def _stack(group: list[np.ndarray | RequestError]) -> np.ndarray | RequestError:
    for i, result in enumerate(group):
        if isinstance(result, RequestError):
            return (
                result if len(group) == 1 else RequestError(f"document {i} of {len(group)}: {result.reason}")
            )
    out = np.full((len(group), max(len(s) for s in group)), -np.inf, dtype=np.float32)
    for i, scores in enumerate(group):
        out[i, : len(scores)] = scores
    return out


def _to_device(batch, device: str):
    if device == "cpu":
        return batch
    from dataclasses import fields

    return type(batch)(**{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})


# ---------------------------------------------------------------------------------------- loading a model


Quantize = Literal["none", "int8"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ServingOptions:
    """How a model version is served; Triton passes these as `parameters` of the model config."""

    quantize: Quantize = "none"  # int8: dynamic quantisation of the nn.Linear layers (CPU only)
    dtype: DType = "float32"  # auto: `native_dtype` of the device
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0: every core this process may use
    # OpenMP threads that wait at a barrier: PASSIVE sleeps at once. The default spins, and when another
    # process holds a core, every one of a forward pass's ~400 parallel regions then waits for the
    # descheduled thread's next time slice: 1.5 s instead of 80 ms per request measured here on 2 shared cores.
    omp_wait_policy: Literal["PASSIVE", "ACTIVE", ""] = "PASSIVE"  # "": leave the environment as it is
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.omp_wait_policy not in ("PASSIVE", "ACTIVE", ""):
            raise ValueError(f"omp_wait_policy: {self.omp_wait_policy!r} is not PASSIVE, ACTIVE or empty")
        if self.quantize not in get_args(Quantize):
            raise ValueError(f"quantize: {self.quantize!r} is not one of {get_args(Quantize)}")
        if self.dtype not in get_args(DType):
            raise ValueError(f"dtype: {self.dtype!r} is not one of {get_args(DType)}")
        if self.quantize == "int8" and (self.device != "cpu" or self.dtype not in ("float32", "auto")):
            raise ValueError("int8 dynamic quantisation runs on the CPU over float32 activations only")

    @property
    def torch_dtype(self) -> str:
        """The dtype the model runs in: `dtype`, with auto resolved for the device (int8 keeps float32)."""
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.quantize == "int8" else native_dtype(self.device)

    @classmethod
    def from_triton(
        cls, model_config: Mapping[str, Any], args: Mapping[str, str] | None = None
    ) -> ServingOptions:
        """From the Python backend's `initialize` arguments: the parsed model config and the instance kind."""
        parameters = {
            key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()
        }
        args = args or {}
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        return cls(
            quantize=parameters.get("quantize") or "none",  # type: ignore[arg-type]  # checked in __post_init__
            dtype=parameters.get("dtype") or "float32",  # type: ignore[arg-type]
            device=device,
            threads=int(parameters.get("threads") or 0),
            omp_wait_policy=parameters.get("omp_wait_policy", "PASSIVE").upper(),  # type: ignore[arg-type]
            warmup=_flag(parameters.get("warmup") or "true"),
        )


def native_dtype(device: str) -> str:
    """The fastest precision that keeps the ranking on `device`: float16 on a GPU; bfloat16 on a CPU with
    native bfloat16 matmuls (AVX512-BF16 or AMX: 1.5x faster on the dev machine, Kendall tau .98 against
    float32 on real requests, benchmarks/serving.py); float32 elsewhere, where bfloat16 would be emulated."""
    import torch

    if device.startswith("cuda"):
        return "float16"
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native_bf16 else "float32"


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError(f"expected a boolean parameter, got {text!r}")
    return value in {"true", "1", "yes"}


def load_scorer(weights: str | Path, options: ServingOptions = ServingOptions()) -> ServingScorer:
    """Load a saved reranker folder once, prepare it for serving and warm it up."""
    set_omp_wait_policy(options.omp_wait_policy)  # before torch loads OpenMP
    from instructrec.model.reranker import Reranker

    weights = Path(weights)
    if not weights.is_dir():
        raise FileNotFoundError(
            f"no reranker weights at {weights}: export a model version first (`instructrec export`, "
            "instructrec.triton_repository.export_version)"
        )
    set_threads(options.threads)
    scorer = ServingScorer(prepare(Reranker.from_pretrained(weights), options), options.device)
    if options.warmup:
        warm_up(scorer)
    return scorer


def set_omp_wait_policy(policy: str) -> None:
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: effective only before torch's first import
    in this process (true in a fresh Triton backend stub). An explicit environment setting wins."""
    if not policy or "OMP_WAIT_POLICY" in os.environ:
        return
    if "torch" in sys.modules:
        log.warning("OMP_WAIT_POLICY=%s not applied: torch is already imported in this process", policy)
        return
    os.environ["OMP_WAIT_POLICY"] = policy


def set_threads(threads: int = 0) -> int:
    """Intra-op threads for this process: `threads`, or every core it may run on. Inter-op parallelism is
    off: one forward pass at a time is what a backend instance runs, and extra pools only contend."""
    import torch

    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set, or inter-op work has started: keep what is there
        torch.set_num_interop_threads(1)
    return n


def prepare(reranker: Reranker, options: ServingOptions) -> Reranker:
    """Eval mode on the serving device in the serving precision (in place; returns the reranker)."""
    import torch

    reranker.eval().to(device=options.device, dtype=getattr(torch, options.torch_dtype))
    if options.quantize == "int8":
        quantize_int8(reranker)
    return reranker


def quantize_int8(reranker: Reranker) -> Reranker:
    """Dynamic int8 quantisation of every nn.Linear except the LM head (in place).

    The LM head is skipped because the verbalizer reads two rows of its weight directly (`head.weight[ids]`),
    which a quantised module does not expose; it costs nothing anyway since only those two rows are used.
    """
    import torch
    from torch import nn
    from torch.ao.quantization import quantize_dynamic

    head = reranker.seq2seq.get_output_embeddings()
    names = {
        name
        for name, module in reranker.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }
    with warnings.catch_warnings():
        # torch.ao's eager-mode quantisation warns that it will move to torchao; it still works as documented.
        warnings.simplefilter("ignore")
        quantize_dynamic(reranker, names, dtype=torch.qint8, inplace=True)
    return reranker


def warmup_request(candidates: int = 20, history: int = 10) -> bytes:
    """A request shaped like a live one (10 history titles, 20 candidates) to warm a freshly loaded model."""
    titles = [f"Warm-up movie number {i}: the sequel (19{50 + i % 50})" for i in range(history + candidates)]
    parts: list[str | ItemMention] = ["The user has watched "]
    for i in range(history):
        parts += [ItemMention(i, "history"), ", "]
    parts.append(". Rank these candidates by how well they match the user's taste: ")
    labels = tuple(chr(ord("a") + i % 26) for i in range(candidates))
    for i, label in enumerate(labels):
        parts += [ItemMention(history + i, "candidate", label), " "]
    instruction = Instruction(
        "P1-I0-T3-01", Task.T3, tuple(parts), tuple(range(history, history + candidates)), labels
    )
    return encode_request(instruction, lambda i: f"warm-up-{i}", titles.__getitem__)


def warm_up(scorer: ServingScorer, batch_sizes: Sequence[int] = (1, 1, 4)) -> float:
    """Run a few forward passes so that the first real request does not pay for lazy initialisation
    (allocator growth, oneDNN/fbgemm kernel selection); returns the seconds spent."""
    start = time.perf_counter()
    request = warmup_request()
    for size in batch_sizes:
        scorer.score([request] * size)
    return time.perf_counter() - start
