"""Scoring on the server: a dynamic batch of wire requests in ONE forward pass of the reranker, and loading a
model version for serving (precision, threads, warm-up).

The Triton backend (`deploy/triton/instructrec_reranker/1/model.py`) is a thin shell around `ServingScorer`,
so in-process and served scores come from one implementation (`Reranker.forward`).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from instructrec.instructions import Instruction, ItemMention, Task
from instructrec.model.reranker import Reranker
from instructrec.model.scoring import fuse
from instructrec.serving.options import ServingOptions
from instructrec.serving.wire import RequestError, RerankRequest, decode_request, encode_request


class ServingScorer:
    """Scores a dynamic batch of wire requests in ONE forward pass of the reranker.

    Decoding errors are per request: a malformed request gets its `RequestError` and the others their scores.
    The reranker should already be prepared for serving (`prepare`: eval mode, device, precision).
    """

    def __init__(self, reranker: Reranker) -> None:
        self.reranker = reranker.eval()  # on its device: it moves each batch there
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
        titles: list[str] = []
        texts: list[str] = []
        rows: list[int] = []
        instructions = []
        for request in requests:
            # Shift each request's local item indices past the previous requests' items: one shared table.
            instructions.append(_shifted(request.instruction, len(titles)))
            titles.extend(request.titles)
            texts.extend(request.text(i) for i in range(len(request.titles)))
            rows.extend(self.reranker.item_row(item_id) for item_id in request.item_ids)
        batch = self.tokenizer.collate(instructions, titles.__getitem__, rows.__getitem__, texts.__getitem__)
        with torch.inference_mode():  # the reranker moves the batch to its device; its masks are built there
            scores = self.reranker(batch)
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


def native_dtype(device: str) -> str:
    """The fastest precision that keeps the ranking on `device`: float16 on a GPU; bfloat16 on a CPU with
    native bfloat16 matmuls (AVX512-BF16 or AMX; `benchmarks/serving.py` measures its speed and ranking
    agreement); float32 elsewhere, where bfloat16 would be emulated."""
    if device.startswith("cuda"):
        return "float16"
    # torch 2.13 answers these only through private helpers; the one private torch API of this module.
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native_bf16 else "float32"


def torch_dtype(options: ServingOptions) -> str:
    """The dtype the model runs in: `options.dtype`, with auto resolved for the device (int8 keeps float32)."""
    if options.dtype != "auto":
        return options.dtype
    return "float32" if options.quantize == "int8" else native_dtype(options.device)


def load_scorer(weights: str | Path, options: ServingOptions | None = None) -> ServingScorer:
    """Load a saved reranker folder once, prepare it for serving and warm it up.

    The OpenMP wait policy must be set before this module is imported (`options.set_omp_wait_policy`): torch
    reads it when it loads."""
    options = options or ServingOptions()
    weights = Path(weights)
    if not weights.is_dir():
        raise FileNotFoundError(
            f"no reranker weights at {weights}: export a model version first (`instructrec export`, "
            "instructrec.adapters.triton.repository.export_version)"
        )
    set_threads(options.threads)
    scorer = ServingScorer(prepare(Reranker.from_pretrained(weights), options))
    if options.warmup:
        warm_up(scorer)
    return scorer


def set_threads(threads: int = 0) -> int:
    """Intra-op threads for this process: `threads`, or every core it may run on. Inter-op parallelism is
    off: one forward pass at a time is what a backend instance runs, and extra pools only contend."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set, or inter-op work has started: keep what is there
        torch.set_num_interop_threads(1)
    return n


def prepare(reranker: Reranker, options: ServingOptions) -> Reranker:
    """Eval mode on the serving device in the serving precision (in place; returns the reranker)."""
    reranker.eval().to(device=options.device, dtype=getattr(torch, torch_dtype(options)))
    if options.quantize == "int8":
        quantize_int8(reranker)
    return reranker


def quantize_int8(reranker: Reranker) -> Reranker:
    """Dynamic int8 quantisation of every nn.Linear except the LM head (in place).

    The LM head is skipped because the verbalizer reads two rows of its weight directly (`head.weight[ids]`),
    which a quantised module does not expose; it costs nothing anyway since only those two rows are used.
    """
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
