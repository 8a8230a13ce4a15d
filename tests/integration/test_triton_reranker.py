"""The reranker on the REAL tritonserver (the session's server, on a temporary copy of deploy/triton).

The offline default model (untrained: served scores must equal in-process ones whatever the training) is
exported as version 1 and loaded with explicit model control; a second, differently initialised default
model becomes version 2 for the hot swap, which runs last.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from instructrec.adapters.triton import repository as triton_repository
from instructrec.adapters.triton.client import (
    BreakerState,
    RerankerRequestError,
    RerankerUnavailable,
    TritonReranker,
)
from instructrec.config import TritonSettings
from instructrec.data.dataset import Interaction
from instructrec.infra import TritonState
from instructrec.instructions import Instruction, request_instruction
from instructrec.model.reranker import Reranker, default_model
from instructrec.model.scoring import score
from instructrec.serving.wire import encode_request
from tests.conftest import LocalInfra
from tests.integration.own_infra import own_infra

pytestmark = pytest.mark.integration

MODEL = triton_repository.MODEL_NAME
N_ITEMS = 60
IDS = [str(100 + i) for i in range(N_ITEMS)]
TITLES = [
    f"The {['Red', 'Blue', 'Last', 'Silent'][i % 4]} {['Planet', 'River', 'Heist'][i % 3]} {i} ({1970 + i})"
    for i in range(N_ITEMS)
]
# Generous: on 2 shared cores a load or a training job elsewhere can slow a pass far beyond production.
TIMEOUT_S = 60.0


def instructions(n: int, candidates: int = 20) -> list[Instruction]:
    out = []
    for user in range(n):
        rng = random.Random(user)
        history = [Interaction(rng.randrange(N_ITEMS), t, float(rng.choice([1, 2, 4, 5]))) for t in range(12)]
        intention = "a tense thriller" if user % 3 == 0 else None
        out.append(
            request_instruction(
                history, rng.sample(range(N_ITEMS), candidates), intention=intention, seed=user
            )
        )
    return out


def wire(ins: Instruction) -> bytes:
    return encode_request(ins, IDS.__getitem__, TITLES.__getitem__)


def in_process(reranker: Reranker, batch: list[Instruction]) -> list[np.ndarray]:
    rows = [reranker.item_row(item_id) for item_id in IDS]
    return score(reranker, batch, TITLES.__getitem__, rows.__getitem__)


@pytest.fixture(scope="module")
def local_infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInfra]:
    """This module's own Triton: its tests pin version numbers, and the session's repository holds every
    version that earlier modules exported."""
    yield from own_infra(tmp_path_factory)


@pytest.fixture(scope="module")
def triton(local_infra: LocalInfra) -> TritonState:
    return local_infra.start_triton()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two default models: their decoders' cross-attention starts random, so they score differently."""
    root = tmp_path_factory.mktemp("rerankers")
    for name in ("v1", "v2"):
        default_model().save_pretrained(root / name)
    return {name: root / name for name in ("v1", "v2")}


@pytest.fixture(scope="module")
def served(local_infra, triton: TritonState, saved: dict[str, Path]) -> Iterator[TritonState]:
    triton_repository.export_version(saved["v1"], local_infra.model_repository, 1, link=True, overwrite=True)
    # The wire, the batching and the versions are checked for exact scores, so these tests serve float32.
    # Pinned, whatever the config's defaults: a calibrated version may serve int8, which trades exactness for
    # speed (instructrec.serving.calibration); these versions have no calibration.
    config = local_infra.model_repository / MODEL / "config.pbtxt"
    triton_repository.set_parameters(config, {"quantize": "none", "dtype": "float32"})
    state = local_infra.start_triton(
        models=[MODEL]
    )  # explicit model control: loads it into the running server
    yield state
    import tritonclient.http as httpclient

    httpclient.InferenceServerClient(state.http_url, network_timeout=TIMEOUT_S).unload_model(MODEL)


def client(state: TritonState, protocol: str, **kwargs) -> TritonReranker:
    url = state.grpc_url if protocol == "grpc" else state.http_url
    return TritonReranker(TritonSettings(url=url, protocol=protocol, timeout_s=TIMEOUT_S, **kwargs))


@pytest.fixture(scope="module")
def version_1(saved: dict[str, Path]) -> Reranker:
    return Reranker.from_pretrained(saved["v1"])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_served_scores_equal_in_process_scores(
    served: TritonState, version_1: Reranker, protocol: str
) -> None:
    batch = instructions(4)
    async with client(served, protocol) as reranker:
        got = await reranker.score([wire(ins) for ins in batch])
        assert reranker.model_version == "1"
    for scores, expected in zip(got, in_process(version_1, batch), strict=True):
        assert scores.shape == (20,)
        np.testing.assert_allclose(scores, expected, atol=1e-4)


async def test_concurrent_requests_are_batched(served: TritonState, version_1: Reranker) -> None:
    import tritonclient.http as httpclient

    def counts() -> tuple[int, int]:
        stats = httpclient.InferenceServerClient(served.http_url).get_inference_statistics(MODEL)
        model = next(m for m in stats["model_stats"] if m["version"] == "1")
        return model["inference_count"], model["execution_count"]

    batch = instructions(16)
    inferences, executions = counts()
    async with client(served, "grpc") as reranker:
        got = await reranker.score([wire(ins) for ins in batch])
    inferences, executions = counts()[0] - inferences, counts()[1] - executions
    assert inferences == 16
    assert executions < inferences  # the dynamic batcher put several requests into one forward pass
    for scores, expected in zip(got, in_process(version_1, batch), strict=True):
        np.testing.assert_allclose(scores, expected, atol=1e-4)


async def test_the_served_version_is_reported(served: TritonState) -> None:
    async with client(served, "grpc") as reranker:
        assert await reranker.is_ready()
        assert await reranker.refresh_model_version() == "1"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_a_malformed_request_fails_alone(served: TritonState, protocol: str) -> None:
    good = wire(instructions(1)[0])
    async with client(served, protocol) as reranker:
        results = await reranker.score([good, b'{"v": 1, "template_id": "x"}', good], return_exceptions=True)
        assert isinstance(results[1], RerankerRequestError)
        assert "task" in str(results[1])
        np.testing.assert_allclose(results[0], results[2], atol=1e-6)
        (after,) = await reranker.score([good])  # the server, and the breaker, are fine
        np.testing.assert_allclose(after, results[0], atol=1e-6)
        assert reranker.breaker.state is BreakerState.CLOSED


async def test_hot_swap_to_version_2_and_unload(
    local_infra, served: TritonState, saved: dict[str, Path]
) -> None:
    """Version 2 loads while version 1 keeps answering; then unload and load again."""
    batch = instructions(3)
    triton_repository.export_version(saved["v2"], local_infra.model_repository, 2, link=True, overwrite=True)
    seen: list[str] = []
    async with client(served, "grpc") as reranker:
        loading = asyncio.create_task(reranker.load_model())
        while not loading.done():  # traffic during the swap: every request answered, by 1 or 2
            await reranker.score([wire(batch[0])])
            seen.append(reranker.model_version)
        assert await loading == "2"
        got = await reranker.score([wire(ins) for ins in batch])
        assert reranker.model_version == "2"
        assert set(seen) <= {"1", "2"} and seen[0] == "1"

        await reranker.unload_model()
        assert not await reranker.is_ready()
        with pytest.raises(RerankerUnavailable):
            await reranker.score_one(wire(batch[0]))
        assert await reranker.load_model() == "2"
        assert await reranker.is_ready()
    for scores, expected in zip(got, in_process(Reranker.from_pretrained(saved["v2"]), batch), strict=True):
        np.testing.assert_allclose(scores, expected, atol=1e-4)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_an_unreachable_server_is_retried_then_trips_the_circuit(protocol: str) -> None:
    """No server at all (a free port): transient errors, bounded retries, then the breaker fails fast."""
    from instructrec.adapters.triton.client import CircuitBreaker, CircuitOpen
    from instructrec.infra import free_port

    settings = TritonSettings(url=f"127.0.0.1:{free_port()}", protocol=protocol, timeout_s=2.0, retries=1)
    async with TritonReranker(
        settings, breaker=CircuitBreaker(failure_threshold=2, reset_timeout_s=60)
    ) as reranker:
        assert not await reranker.is_ready()
        with pytest.raises(RerankerUnavailable, match="after 2 attempt"):
            await reranker.score_one(b"{}")
        assert reranker.breaker.state is BreakerState.OPEN
        started = asyncio.get_running_loop().time()
        with pytest.raises(CircuitOpen):
            await reranker.score_one(b"{}")
        assert asyncio.get_running_loop().time() - started < 0.05  # refused without touching the network
