"""Handing freed heap memory back to the system from a long-running serving process.

glibc's malloc keeps what a process frees for reuse and returns little of it to the system on its own, so a
backend instance's resident memory stays at the high-water mark of the largest batches it has scored, and
rises in steps whenever a larger one comes (benchmarks/soak.py: Triton's memory, flat between steps). After
scoring a few batches of eight, one `malloc_trim(0)` gave back about 90 MB of a 444 MB instance. `HeapTrimmer`
calls it at most every `every_s` seconds, from the thread that has just answered, so what the instance holds
follows what is live; a C library without malloc_trim (musl) leaves it off.

The fine-tune worker loads two or three models every cycle and frees them at its end, and glibc keeps that
memory the same way (benchmarks/soak.py: the worker's saw-tooth, whose lows rose cycle after cycle), so it
calls `release_heap` once per cycle.
"""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable


def libc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    """Call after each execution: trims the heap when `every_s` seconds have passed since the last trim (0: never)."""

    def __init__(
        self,
        every_s: float,
        trim: Callable[[int], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_s = every_s
        self.trim = trim if trim is not None else libc_trim()
        self.clock = clock
        self.last = clock()

    def __call__(self) -> bool:
        """Whether it trimmed now."""
        if not self.every_s or self.trim is None:
            return False
        now = self.clock()
        if now - self.last < self.every_s:
            return False
        self.last = now
        self.trim(0)
        return True


def release_heap(trim: Callable[[int], int] | None = None) -> bool:
    """Once, now: collect garbage (a model's tensors can sit in reference cycles), then trim. Whether it trimmed."""
    gc.collect()
    trim = trim if trim is not None else libc_trim()
    if trim is None:
        return False
    trim(0)
    return True
