"""The reranker on Triton, seen from the streaming layer: an async client with timeouts, retries and a breaker.

    reranker = TritonReranker(settings.triton)            # grpc (default) or http, from the settings
    scores = await reranker.score([encode_request(...), ...])   # one float32 array per request
    reranker.model_version                                # the version that answered last ("" until known)

Requests are sent concurrently, one Triton request each: the server's dynamic batcher gathers them into
one forward pass, so the client needs no batching of its own. The protocol (gRPC or HTTP) is a transport
(`transports/`): one base class, a subclass per protocol.

Failure handling, from the cheapest answer to the most expensive:
- a malformed request is the caller's bug: `RerankerRequestError` at once, never retried, and it does not
  count against the server's health;
- transient errors (UNAVAILABLE, DEADLINE_EXCEEDED, timeouts, refused or reset connections) are retried
  `settings.retries` times under the adapters' `RetryPolicy` (exponential backoff, full jitter);
- every failed attempt counts towards the circuit breaker: after `failure_threshold` consecutive failures
  it opens and calls fail fast with `RerankerUnavailable` (no network), which the streaming layer turns into
  a degraded answer; after `reset_timeout_s` one probe call goes through (half-open) and its outcome closes
  or re-opens the circuit.

Hot swaps: `load_model` (explicit model control) loads the newest exported version while the old one keeps
serving; `model_version` follows the MODEL_VERSION output of each answer, and `refresh_model_version` asks
the server's model metadata.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from instructrec.adapters.retry import RetryPolicy
from instructrec.adapters.triton.transports import Transport, make_transport
from instructrec.config import TritonSettings
from instructrec.serving.wire import MALFORMED

log = logging.getLogger(__name__)

# gRPC codes that mean "try again": Triton answers UNAVAILABLE while the server or model is (un)loading
# and when a request times out in its queue.
_TRANSIENT_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED"}
_TRANSIENT_HTTP = {"429", "502", "503", "504"}


class RerankerUnavailable(RuntimeError):
    """The reranker cannot answer now (circuit open, retries spent, or a server error): degrade, don't drop."""


class RerankerRequestError(ValueError):
    """The server rejected this request as malformed: a bug on the calling side; retrying will not help."""


# --------------------------------------------------------------------------------------- circuit breaker


class BreakerState(enum.Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls fail fast until the cool-down has passed
    HALF_OPEN = "half_open"  # one probe call is in flight; others fail fast until it reports


class CircuitOpen(RerankerUnavailable):
    """Refused without a network call: the circuit breaker is open (or its one probe is in flight)."""


class CircuitBreaker:
    """Consecutive-failure circuit breaker. Not thread-safe: one per event loop (asyncio needs no locks here
    because nothing in it awaits)."""

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or reset_timeout_s <= 0:
            raise ValueError("failure_threshold must be ≥ 1 and reset_timeout_s > 0")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0

    @property
    def state(self) -> BreakerState:
        """The state as of now: an open circuit whose cool-down has passed reads as half-open (probe allowed)."""
        if self._state is BreakerState.OPEN and self._cooled_down():
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def acquire(self) -> None:
        """Ask to make a call; raises `CircuitOpen` when the call must not go out."""
        if self._state is BreakerState.CLOSED:
            return
        if self._state is BreakerState.OPEN and self._cooled_down():
            self._state = BreakerState.HALF_OPEN  # this caller is the probe
            return
        wait = max(0.0, self._opened_at + self.reset_timeout_s - self._clock())
        detail = f"retry in {wait:.1f} s" if self._state is BreakerState.OPEN else "a probe call is in flight"
        raise CircuitOpen(f"reranker circuit open after {self._failures} consecutive failures; {detail}")

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0

    def record_failure(self) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            if self._state is not BreakerState.OPEN:
                log.warning("reranker circuit opens after %d consecutive failures", self._failures)
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()

    def release(self) -> None:
        """A call ended without an outcome (cancelled): let the next caller probe instead of blocking forever."""
        if self._state is BreakerState.HALF_OPEN:
            self._state = BreakerState.OPEN  # cool-down already passed: the next acquire probes at once

    def _cooled_down(self) -> bool:
        return self._clock() - self._opened_at >= self.reset_timeout_s


@dataclass
class ClientStats:
    """Counters for metrics and tests."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0  # calls that ended in RerankerUnavailable
    rejected: int = 0  # refused by the open circuit without a network call
    malformed: int = 0


# ------------------------------------------------------------------------------------- error classes


def classify(error: BaseException) -> str:
    """ "request" (the caller's fault), "transient" (retry) or "server" (no retry; counts as a failure)."""
    from tritonclient.utils import InferenceServerException

    if isinstance(error, InferenceServerException):
        status = str(error.status() or "")
        if MALFORMED in str(error.message() or ""):
            return "request"
        if status in _TRANSIENT_GRPC or status in _TRANSIENT_HTTP:
            return "transient"
        return "server"
    if isinstance(error, OSError):  # TimeoutError (ours), refused and reset connections
        return "transient"
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp comes with tritonclient[http]
        return "server"
    return "transient" if isinstance(error, aiohttp.ClientError) else "server"


# ------------------------------------------------------------------------------------------- the client


class TritonReranker:
    """Async client of the reranker model on Triton (see the module docstring for the failure policy)."""

    def __init__(
        self,
        settings: TritonSettings,
        *,
        breaker: CircuitBreaker | None = None,
        backoff: RetryPolicy | None = None,
        transport: Transport | None = None,
        load_timeout_s: float = 120.0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.breaker = breaker or CircuitBreaker()
        self.retry = backoff or RetryPolicy(retries=settings.retries, base_s=0.05, cap_s=1.0)
        self.transport = transport or make_transport(settings)
        self.load_timeout_s = load_timeout_s
        self.stats = ClientStats()
        self._sleep = sleep
        self._rng = rng
        self._model_version = settings.reranker_version

    @property
    def model(self) -> str:
        return self.settings.reranker_model

    @property
    def model_version(self) -> str:
        """The version that answered the latest call, or that the metadata named; "" until known."""
        return self._model_version

    @property
    def circuit_state(self) -> str:
        """ "closed", "open" or "half_open" (see `CircuitBreaker`)."""
        return self.breaker.state.value

    async def __aenter__(self) -> TritonReranker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()

    # -- scoring

    async def score(self, requests: Sequence[bytes], *, return_exceptions: bool = False) -> list[Any]:
        """Scores for each request (wire documents from `encode_request`), sent concurrently.

        If a request fails, raises its error once all have finished (`RerankerUnavailable` or
        `RerankerRequestError`); with `return_exceptions` the error takes that request's place instead.
        """
        results = await self._gather(requests, return_exceptions)
        return [r if isinstance(r, BaseException) else r[0] for r in results]

    async def score_with_versions(self, requests: Sequence[bytes]) -> list[tuple[np.ndarray, str]]:
        """Each request's scores and the model version that scored it (read from the answer itself, so a hot
        swap landing in the middle of a batch is attributed right)."""
        return await self._gather(requests, False)

    async def _gather(self, requests: Sequence[bytes], return_exceptions: bool) -> list[Any]:
        results = await asyncio.gather(*(self._score(r) for r in requests), return_exceptions=True)
        if not return_exceptions:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return results

    async def score_one(self, request: bytes) -> np.ndarray:
        """One request's scores under the failure policy of the module docstring."""
        return (await self._score(request))[0]

    async def _score(self, request: bytes) -> tuple[np.ndarray, str]:
        self.stats.calls += 1
        attempts = 0

        async def attempt() -> tuple[np.ndarray, str]:
            nonlocal attempts
            self._admit()  # raises CircuitOpen, which is not worth a retry
            attempts += 1
            try:
                result = await self._infer(request)
            except asyncio.CancelledError:
                self.breaker.release()
                raise
            except Exception as error:
                if classify(error) == "request":
                    self.breaker.record_success()  # the server answered: it is healthy, the request is not
                    self.stats.malformed += 1
                    raise RerankerRequestError(str(error)) from error
                self.breaker.record_failure()
                raise
            self.breaker.record_success()
            return result

        try:
            scores, version = await self.retry.acall(
                attempt,
                what="reranker call",
                transient=lambda error: classify(error) == "transient",
                sleep=self._sleep,
                rng=self._rng,
                on_retry=self._count_retry,
            )
        except (RerankerRequestError, CircuitOpen):
            raise
        except Exception as error:  # retries spent, or a server error: the caller degrades
            self.stats.failures += 1
            raise RerankerUnavailable(
                f"reranker call failed after {attempts} attempt(s): {_describe(error)}"
            ) from error
        if version:
            self._model_version = version
        return np.asarray(scores, dtype=np.float32), version or self._model_version

    def _count_retry(self, error: BaseException) -> None:
        self.stats.retries += 1

    def _admit(self) -> None:
        try:
            self.breaker.acquire()
        except CircuitOpen:
            self.stats.rejected += 1
            self.stats.failures += 1
            raise
        self.stats.attempts += 1

    async def _infer(self, request: bytes) -> tuple[np.ndarray, str]:
        timeout_s = self.settings.timeout_s
        # The transport's own deadline (gRPC) may not cover connecting or a stalled HTTP read: bound it here.
        async with asyncio.timeout(timeout_s):
            return await self.transport.infer(self.model, self.settings.reranker_version, request, timeout_s)

    # -- model control and state

    async def is_ready(self) -> bool:
        """Whether the configured model (and version, if pinned) is ready; False when the server is unreachable."""
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                return await self.transport.is_model_ready(
                    self.model, self.settings.reranker_version, self.settings.timeout_s
                )
        except Exception as error:  # unreachable or erroring server: not ready, with the reason logged
            log.debug("reranker readiness check failed: %s", _describe(error))
            return False

    async def refresh_model_version(self) -> str:
        """Ask the server which version serves (the newest ready one) and remember it."""
        async with asyncio.timeout(self.settings.timeout_s):
            versions = await self.transport.model_versions(self.model, self.settings.timeout_s)
        if self.settings.reranker_version:
            self._model_version = self.settings.reranker_version
        elif versions:
            self._model_version = max(versions, key=_version_key)
        return self._model_version

    async def load_model(self, config: str | None = None) -> str:
        """(Re)load the model: with a newly exported version, a hot swap (the old one serves until the new one
        is ready). `config`: a JSON model config overriding config.pbtxt. Returns the version now served."""
        async with asyncio.timeout(self.load_timeout_s):
            await self.transport.load_model(self.model, config, self.load_timeout_s)
        self.breaker.record_success()  # a freshly loaded model deserves a chance right away
        return await self.refresh_model_version()

    async def probe(self, version: int | str, request: bytes) -> np.ndarray:
        """Score `request` on exactly `version` (no retries): is a freshly loaded version answering?"""
        async with asyncio.timeout(self.settings.timeout_s * 4):
            scores, _ = await self.transport.infer(
                self.model, str(version), request, self.settings.timeout_s * 4
            )
        return np.asarray(scores, dtype=np.float32)

    async def unload_model(self) -> None:
        async with asyncio.timeout(self.load_timeout_s):
            await self.transport.unload_model(self.model, self.load_timeout_s)

    async def statistics(self) -> dict:
        """Triton's own inference statistics of the model (queueing and compute per version)."""
        async with asyncio.timeout(self.settings.timeout_s):
            return await self.transport.statistics(self.model, self.settings.timeout_s)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (-1, version)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__
