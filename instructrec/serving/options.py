"""How a model version is served (precision, threads, warm-up), as Triton passes it in the model config's
`parameters`; and the one process-wide knob that must be set before torch loads (`set_omp_wait_policy`).

No torch here: the Triton backend reads its options and sets the OpenMP policy before it imports the scorer.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

log = logging.getLogger(__name__)

# A version's own serving choice, measured on the machine that serves (instructrec.serving.calibration).
CALIBRATION_FILE = "serving.json"

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
    # Seconds between giving freed heap memory back to the system (instructrec.serving.heap); 0: never.
    trim_heap_s: float = 30.0
    # Serve the precision and threads the version's calibration chose (its serving.json), on a CPU; a version
    # without one serves the fields above.
    calibrated: bool = False

    def __post_init__(self) -> None:
        if self.omp_wait_policy not in ("PASSIVE", "ACTIVE", ""):
            raise ValueError(f"omp_wait_policy: {self.omp_wait_policy!r} is not PASSIVE, ACTIVE or empty")
        if self.trim_heap_s < 0:
            raise ValueError(f"trim_heap_s: {self.trim_heap_s} is negative (0 turns trimming off)")
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
            trim_heap_s=float(parameters.get("trim_heap_s") or 30.0),
            calibrated=_flag(parameters.get("calibrated") or "false"),
        )

    def for_version(self, folder: str | Path) -> ServingOptions:
        """These options for the version in `folder`: with `calibrated`, on a CPU, the precision and threads its
        calibration chose; otherwise (or without one) unchanged."""
        path = Path(folder) / CALIBRATION_FILE
        if not self.calibrated or self.device != "cpu":
            return self
        if not path.is_file():
            log.info("%s has no %s: serving the config's options", folder, CALIBRATION_FILE)
            return self
        chosen = json.loads(path.read_text())
        options = replace(
            self, quantize=chosen["quantize"], dtype=chosen["dtype"], threads=int(chosen["threads"])
        )
        log.info(
            "serving the calibrated choice: quantize %s, dtype %s, %d thread(s) (%s)",
            options.quantize,
            options.dtype,
            options.threads,
            chosen.get("reason", ""),
        )
        return options


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
