"""The one retry policy of the adapters: bounded retries, exponential backoff with full jitter.

Retry n (0-based) waits uniform(0, min(cap_s, base_s · 2ⁿ)), so concurrent callers that failed together do
not retry in lock-step. Whether an error is worth a retry is the caller's call (`transient`): a malformed
request or a schema mismatch never is. When the retries are spent, the last error propagates and the
adapter turns it into its own "unavailable" error, which the stream degrades on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def _always(error: BaseException) -> bool:
    return True


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 2  # after the first attempt
    base_s: float = 0.05
    cap_s: float = 1.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.base_s <= 0 or self.cap_s < self.base_s:
            raise ValueError("retries must be ≥ 0 and 0 < base_s ≤ cap_s")

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def delay(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        return rng() * min(self.cap_s, self.base_s * 2**retry)

    def call(
        self,
        fn: Callable[[], T],
        *,
        what: str = "call",
        transient: Callable[[BaseException], bool] = _always,
        sleep: Callable[[float], Any] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> T:
        """`fn()`, retried while it raises a transient error and retries are left."""
        for attempt in range(self.attempts):
            try:
                return fn()
            except Exception as error:
                if attempt == self.retries or not transient(error):
                    raise
                delay = self.delay(attempt, rng)
                log.warning(
                    "%s failed (%s); retry %d in %.0f ms", what, _short(error), attempt + 1, delay * 1000
                )
                sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    async def acall(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        what: str = "call",
        transient: Callable[[BaseException], bool] = _always,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> T:
        """`await fn()`, retried while it raises a transient error and retries are left."""
        for attempt in range(self.attempts):
            try:
                return await fn()
            except Exception as error:
                if attempt == self.retries or not transient(error):
                    raise
                if on_retry is not None:
                    on_retry(error)
                delay = self.delay(attempt, rng)
                log.debug(
                    "%s failed (%s); retry %d in %.0f ms", what, _short(error), attempt + 1, delay * 1000
                )
                await sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__
