"""Serving options chosen by measurement on the machine that serves, not by a file tuned on another.

Whether int8 or bfloat16 pays off depends on the CPU: on one 2-core machine int8 halved the forward pass, on
another of the same kind it was no faster and only cost ranking quality, and bfloat16 without native support
is several times slower. So at export (`instructrec export --calibrate ARTIFACTS`) `calibrate` tries every
precision and every thread count that fits the config's instances on this machine's cores:

1. speed: the median time of one request (a validation request of the served shape), per setting;
2. quality, only for the precisions faster than float32: the fused ranking of a validation slice (the
   reranker fused with the retriever, as served) — NDCG@10 of the chosen item and the share of requests whose
   top answer is float32's;
3. the choice: the fastest setting whose NDCG@10 is within `tolerance` of float32's and whose top-1 agreement
   is at least `min_top1`, if it beats float32 at the same threads by `min_speedup`; else float32.

The choice and its evidence are written into the version's folder (`serving.json`); the CPU config's
`calibrated` parameter makes the backend serve it (`ServingOptions.calibrated`). A version without one serves
as the config says. Latency depends on the machine and the architecture, not on the weights, so the fine-tune
worker's versions carry their predecessor's choice; the gate judges them as served in that precision.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from instructrec.serving.options import CALIBRATION_FILE, ServingOptions

PRECISIONS = (("none", "float32"), ("int8", "float32"), ("none", "bfloat16"))
BATCH = 8  # the CPU config's max_batch_size: quality is scored in the batches Triton would form


@dataclass(frozen=True)
class Trial:
    """One setting's measurements: `ndcg10`/`top1_agreement` are None where its speed ruled it out."""

    quantize: str
    dtype: str
    threads: int
    ms_p50: float
    ndcg10: float | None = None
    top1_agreement: float | None = None

    @property
    def label(self) -> str:
        precision = "int8" if self.quantize == "int8" else self.dtype
        return f"{precision}, {self.threads} thread{'s' * (self.threads > 1)}"


@dataclass(frozen=True)
class Calibration:
    quantize: str
    dtype: str
    threads: int
    reason: str
    trials: list[Trial]
    tolerance: float
    min_top1: float
    min_speedup: float
    examples: int  # validation requests the quality was measured on
    machine: dict = field(default_factory=dict)
    seconds: float = 0.0
    inherited_from: int | None = None  # a fine-tuned version carries the version it was trained from's

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        raw = json.loads(text)
        raw["trials"] = [Trial(**t) for t in raw.get("trials", [])]
        return cls(**raw)


def write_calibration(folder: str | Path, calibration: Calibration) -> Path:
    path = Path(folder) / CALIBRATION_FILE
    path.write_text(calibration.to_json())
    return path


def read_calibration(folder: str | Path) -> Calibration | None:
    path = Path(folder) / CALIBRATION_FILE
    return Calibration.from_json(path.read_text()) if path.is_file() else None


def thread_counts(cores: int, instances: int) -> list[int]:
    """Threads per instance worth trying: 1, and each instance's share of the cores when that is more
    (more threads than that would have the instances contend for cores under load)."""
    share = max(1, cores // max(1, instances))
    return sorted({1, share})


def choose(
    trials: Sequence[Trial], *, tolerance: float, min_top1: float, min_speedup: float
) -> tuple[Trial, str]:
    """The setting to serve and why (see the module docstring); float32 whenever nothing else qualifies."""
    float32 = [t for t in trials if t.quantize == "none" and t.dtype == "float32"]
    if not float32:
        raise ValueError("calibration needs float32 trials: they are the reference")
    reference = next((t.ndcg10 for t in float32 if t.ndcg10 is not None), None)
    best = min(float32, key=lambda t: t.ms_p50)
    reason = f"float32 is the reference; {best.threads} thread(s) was fastest for it"
    for trial in sorted(trials, key=lambda t: t.ms_p50):
        if trial in float32 or trial.ndcg10 is None or reference is None:
            continue
        same_threads = next(t for t in float32 if t.threads == trial.threads)
        speedup = same_threads.ms_p50 / trial.ms_p50
        loss = reference - trial.ndcg10
        if speedup < min_speedup or trial.ms_p50 >= best.ms_p50:
            continue
        if loss > tolerance or (trial.top1_agreement or 0.0) < min_top1:
            reason += (
                f"; {trial.label} was {speedup:.2f}× faster but lost {loss:+.4f} NDCG@10 "
                f"(top-1 agreement {trial.top1_agreement:.3f})"
            )
            continue
        return trial, (
            f"{trial.label}: {speedup:.2f}× faster than float32, NDCG@10 {trial.ndcg10:.4f} against "
            f"{reference:.4f} (tolerance {tolerance}), top-1 agreement {trial.top1_agreement:.3f}"
        )
    return best, reason


def calibrate(
    weights: str | Path,
    requests: Sequence[bytes],
    targets: Sequence[int],
    *,
    instances: int,
    cores: int | None = None,
    tolerance: float = 0.005,
    min_top1: float = 0.9,
    min_speedup: float = 1.1,
    latency_requests: int = 30,
    progress=None,
) -> Calibration:
    """Measure every setting on this machine and choose (module docstring). `requests`: validation requests
    in wire form carrying their retrieval scores (fused answers, as served); `targets`: each request's
    chosen candidate, by position."""
    from instructrec.serving.scorer import load_scorer

    if not requests or len(requests) != len(targets):
        raise ValueError(f"calibration needs validation requests with a target each ({len(requests)} given)")
    started = time.perf_counter()
    cores = cores or len(os.sched_getaffinity(0))
    timed = list(requests[:latency_requests])
    trials: list[Trial] = []
    rankings: dict[tuple[str, str], list[np.ndarray]] = {}
    fastest_float32 = float("inf")
    for quantize, dtype in PRECISIONS:
        for threads in thread_counts(cores, instances):
            options = ServingOptions(quantize=quantize, dtype=dtype, threads=threads, omp_wait_policy="")
            scorer = load_scorer(weights, options)  # warmed up
            ms = _median_ms(scorer, timed)
            if progress:
                progress(f"{quantize}/{dtype}, {threads} thread(s): {ms:.1f} ms")
            if quantize == "none" and dtype == "float32":
                fastest_float32 = min(fastest_float32, ms)
            needs_quality = (quantize, dtype) not in rankings and (
                (quantize, dtype) == ("none", "float32") or ms < fastest_float32
            )
            if needs_quality:
                rankings[(quantize, dtype)] = _scores(scorer, requests)
            trials.append(Trial(quantize, dtype, threads, round(ms, 2)))
    reference = rankings[("none", "float32")]
    measured = []
    for trial in trials:
        scores = rankings.get((trial.quantize, trial.dtype))
        if scores is None:
            measured.append(trial)
            continue
        agreement = np.mean(
            [int(np.argmax(s)) == int(np.argmax(r)) for s, r in zip(scores, reference, strict=True)]
        )
        measured.append(
            Trial(
                trial.quantize,
                trial.dtype,
                trial.threads,
                trial.ms_p50,
                round(ndcg10(scores, targets), 4),
                round(float(agreement), 4),
            )
        )
    chosen, reason = choose(measured, tolerance=tolerance, min_top1=min_top1, min_speedup=min_speedup)
    return Calibration(
        chosen.quantize,
        chosen.dtype,
        chosen.threads,
        reason,
        measured,
        tolerance,
        min_top1,
        min_speedup,
        len(requests),
        machine(cores),
        round(time.perf_counter() - started, 1),
    )


def ndcg10(scores: Sequence[np.ndarray], targets: Sequence[int]) -> float:
    """Mean NDCG@10 of each target position among its request's scores (ties: pessimistic)."""
    gains = []
    for s, t in zip(scores, targets, strict=True):
        rank = int((s >= s[t]).sum()) - 1
        gains.append(1.0 / np.log2(rank + 2) if rank < 10 else 0.0)
    return float(np.mean(gains)) if gains else 0.0


def machine(cores: int) -> dict:
    """What the figures were measured on: they hold for machines like it."""
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": cores, "torch": torch.__version__}


def _median_ms(scorer, requests: Sequence[bytes]) -> float:
    times = []
    for request in requests:
        begun = time.perf_counter()
        scorer.score([request])
        times.append((time.perf_counter() - begun) * 1000)
    return statistics.median(times)


def _scores(scorer, requests: Sequence[bytes]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for start in range(0, len(requests), BATCH):
        for result in scorer.score(requests[start : start + BATCH]):
            if isinstance(result, Exception):
                raise ValueError(f"a calibration request did not decode: {result}")
            out.append(np.asarray(result))
    return out
