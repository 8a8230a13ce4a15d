"""The reranker on Triton, seen from the streaming layer: an async client with timeouts, retries and a breaker.

    reranker = TritonReranker(settings.triton)            # grpc (default) or http, from the settings
    scores = await reranker.score([encode_request(...), ...])   # one float32 array per request
    reranker.model_version                                # the version that answered last ("" until known)

Requests are sent concurrently, one Triton request each: the server's dynamic batcher gathers them into
one forward pass, so the client needs no batching of its own.

Failure handling, from the cheapest answer to the most expensive:
- a malformed request is the caller's bug: `RerankerRequestError` at once, never retried, and it does not
  count against the server's health;
- transient errors (UNAVAILABLE, DEADLINE_EXCEEDED, timeouts, refused or reset connections) are retried
  `settings.retries` times with exponential backoff and full jitter (concurrent callers do not retry in
  lock-step);
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
from typing import Any, Protocol

import numpy as np

from instructrec.config import TritonSettings
from instructrec.model.serving import MALFORMED

log = logging.getLogger(__name__)

INPUT = "REQUEST"
SCORES = "SCORES"
MODEL_VERSION = "MODEL_VERSION"

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


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base · 2ⁿ))."""

    base_s: float = 0.05
    cap_s: float = 1.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        return rng() * min(self.cap_s, self.base_s * 2**attempt)


@dataclass
class ClientStats:
    """Counters for metrics and tests."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0  # calls that ended in RerankerUnavailable
    rejected: int = 0  # refused by the open circuit without a network call
    malformed: int = 0


# ------------------------------------------------------------------------------------------- transports


class Transport(Protocol):
    """One protocol's async client, reduced to what the reranker needs. Errors propagate as raised."""

    async def infer(
        self, model: str, version: str, request: bytes, timeout_s: float
    ) -> tuple[np.ndarray, str]: ...

    async def is_model_ready(self, model: str, version: str, timeout_s: float) -> bool: ...

    async def model_versions(self, model: str, timeout_s: float) -> list[str]: ...

    async def load_model(self, model: str, config: str | None, timeout_s: float) -> None: ...

    async def unload_model(self, model: str, timeout_s: float) -> None: ...

    async def close(self) -> None: ...


def _request_array(request: bytes) -> np.ndarray:
    return np.array([[request]], dtype=np.object_)  # [batch 1, dims [1]]


def _version_of(result: Any) -> str:
    versions = result.as_numpy(MODEL_VERSION)
    if versions is None or not versions.size:
        return ""
    value = versions.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


class GrpcTransport:
    """tritonclient.grpc.aio. The channel is created on first use, inside the running event loop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = None

    def _get(self):
        if self._client is None:
            from tritonclient.grpc.aio import InferenceServerClient

            self._client = InferenceServerClient(self.url)
        return self._client

    async def infer(
        self, model: str, version: str, request: bytes, timeout_s: float
    ) -> tuple[np.ndarray, str]:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        data = InferInput(INPUT, [1, 1], "BYTES")
        data.set_data_from_numpy(_request_array(request))
        outputs = [InferRequestedOutput(SCORES), InferRequestedOutput(MODEL_VERSION)]
        # client_timeout is the gRPC deadline: the server learns it too and can drop a request that expired.
        result = await self._get().infer(model, [data], model_version=version, outputs=outputs,
                                         client_timeout=timeout_s)  # fmt: skip
        return result.as_numpy(SCORES)[0], _version_of(result)

    async def is_model_ready(self, model: str, version: str, timeout_s: float) -> bool:
        return await self._get().is_model_ready(model, version, client_timeout=timeout_s)

    async def model_versions(self, model: str, timeout_s: float) -> list[str]:
        metadata = await self._get().get_model_metadata(model, client_timeout=timeout_s)
        return list(metadata.versions)

    async def load_model(self, model: str, config: str | None, timeout_s: float) -> None:
        await self._get().load_model(model, config=config, client_timeout=timeout_s)

    async def unload_model(self, model: str, timeout_s: float) -> None:
        await self._get().unload_model(model, client_timeout=timeout_s)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


class HttpTransport:
    """tritonclient.http.aio (aiohttp). Its calls take no per-call timeout: `TritonReranker` bounds each one."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = None

    def _get(self):
        if self._client is None:
            from tritonclient.http.aio import InferenceServerClient

            self._client = InferenceServerClient(self.url)
        return self._client

    async def infer(
        self, model: str, version: str, request: bytes, timeout_s: float
    ) -> tuple[np.ndarray, str]:
        from tritonclient.http import InferInput, InferRequestedOutput

        data = InferInput(INPUT, [1, 1], "BYTES")
        data.set_data_from_numpy(_request_array(request), binary_data=True)
        outputs = [
            InferRequestedOutput(SCORES, binary_data=True),
            InferRequestedOutput(MODEL_VERSION, binary_data=True),
        ]
        result = await self._get().infer(model, [data], model_version=version, outputs=outputs)
        return result.as_numpy(SCORES)[0], _version_of(result)

    async def is_model_ready(self, model: str, version: str, timeout_s: float) -> bool:
        return await self._get().is_model_ready(model, version)

    async def model_versions(self, model: str, timeout_s: float) -> list[str]:
        metadata = await self._get().get_model_metadata(model)
        return list(metadata.get("versions", []))

    async def load_model(self, model: str, config: str | None, timeout_s: float) -> None:
        await self._get().load_model(model, config=config)

    async def unload_model(self, model: str, timeout_s: float) -> None:
        await self._get().unload_model(model)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


def make_transport(settings: TritonSettings) -> Transport:
    return GrpcTransport(settings.url) if settings.protocol == "grpc" else HttpTransport(settings.url)


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
        backoff: Backoff = Backoff(),
        transport: Transport | None = None,
        load_timeout_s: float = 120.0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.breaker = breaker or CircuitBreaker()
        self.backoff = backoff
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
        results = await asyncio.gather(*(self.score_one(r) for r in requests), return_exceptions=True)
        if not return_exceptions:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return results

    async def score_one(self, request: bytes) -> np.ndarray:
        """One request's scores under the failure policy of the module docstring."""
        self.stats.calls += 1
        attempts = self.settings.retries + 1
        for attempt in range(1, attempts + 1):
            self._admit()
            try:
                scores, version = await self._infer(request)
            except asyncio.CancelledError:
                self.breaker.release()
                raise
            except Exception as error:  # sorted by `_after_failure`: it raises unless a retry is due
                await self._after_failure(error, attempt, attempts)
                continue
            self.breaker.record_success()
            if version:
                self._model_version = version
            return np.asarray(scores, dtype=np.float32)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _admit(self) -> None:
        try:
            self.breaker.acquire()
        except CircuitOpen:
            self.stats.rejected += 1
            self.stats.failures += 1
            raise
        self.stats.attempts += 1

    async def _after_failure(self, error: Exception, attempt: int, attempts: int) -> None:
        """Raise what the caller should see, or wait out the backoff when the error is worth a retry."""
        kind = classify(error)
        if kind == "request":
            self.breaker.record_success()  # the server answered: it is healthy, the request is not
            self.stats.malformed += 1
            raise RerankerRequestError(str(error)) from error
        self.breaker.record_failure()
        if kind == "transient" and attempt < attempts:
            self.stats.retries += 1
            await self._sleep(self.backoff.delay(attempt - 1, self._rng))
            return
        self.stats.failures += 1
        raise RerankerUnavailable(
            f"reranker call failed after {attempt} attempt(s): {_describe(error)}"
        ) from error

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

    async def unload_model(self) -> None:
        async with asyncio.timeout(self.load_timeout_s):
            await self.transport.unload_model(self.model, self.load_timeout_s)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (-1, version)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__
