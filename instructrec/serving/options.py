"""How a model version is served (precision, threads, warm-up), as Triton passes it in the model config's
`parameters`; and the one process-wide knob that must be set before torch loads (`set_omp_wait_policy`).

No torch here: the Triton backend reads its options and sets the OpenMP policy before it imports the scorer.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

log = logging.getLogger(__name__)

Quantize = Literal["none", "int8"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ServingOptions:
    """How a model version is served; Triton passes these as `parameters` of the model config."""

    quantize: Quantize = "none"  # int8: dynamic quantisation of the nn.Linear layers (CPU only)
    dtype: DType = "float32"  # auto: `scorer.native_dtype` of the device
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0: every core this process may use
    # OpenMP threads that wait at a barrier: PASSIVE sleeps at once. The default spins, and when another
    # process holds a core, every one of a forward pass's parallel regions then waits for the descheduled
    # thread's next time slice: an order of magnitude slower on shared cores (benchmarks/cpu_options.py).
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


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError(f"expected a boolean parameter, got {text!r}")
    return value in {"true", "1", "yes"}


def set_omp_wait_policy(policy: str) -> None:
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: effective only before torch's first import
    in this process (true in a fresh Triton backend stub). An explicit environment setting wins."""
    if not policy or "OMP_WAIT_POLICY" in os.environ:
        return
    if "torch" in sys.modules:
        log.warning("OMP_WAIT_POLICY=%s not applied: torch is already imported in this process", policy)
        return
    os.environ["OMP_WAIT_POLICY"] = policy
