"""Serving without a server: the wire format, the batched scorer, the export step, and the Triton client's
retry and circuit-breaker policy against a fake transport and a fake clock."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import weakref

import numpy as np
import orjson
import pytest
import torch

from instructrec.adapters.retry import RetryPolicy
from instructrec.adapters.triton import repository as triton_repository
from instructrec.adapters.triton.client import (
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    RerankerRequestError,
    RerankerUnavailable,
    TritonReranker,
)
from instructrec.adapters.triton.transports import Transport
from instructrec.artifacts import VERSION_WEIGHTS_DIR
from instructrec.config import TritonSettings
from instructrec.data.dataset import Interaction
from instructrec.instructions import Instruction, request_instruction
from instructrec.model.reranker import Reranker
from instructrec.model.scoring import fuse, score
from instructrec.serving import scorer as serving_scorer
from instructrec.serving import wire as wire_format
from instructrec.serving.heap import HeapTrimmer, libc_trim, release_heap
from instructrec.serving.options import ServingOptions
from instructrec.serving.scorer import ServingScorer
from instructrec.serving.wire import RequestError, decode_request, encode_request
from tests.models import minilm_tokenizer, tiny_bert

N_ITEMS = 40
IDS = [f"m{i}" for i in range(N_ITEMS)]
TITLES = [f"Movie number {i} part {i % 7} ({1980 + i})" for i in range(N_ITEMS)]


def instruction(user: int, n_candidates: int = 8, intention: str | None = None) -> Instruction:
    rng = random.Random(user)
    history = [
        Interaction(rng.randrange(N_ITEMS), 1000 + t, float(rng.choice([1, 3, 5]))) for t in range(4 + user)
    ]
    candidates = rng.sample(range(N_ITEMS), n_candidates)
    return request_instruction(history, candidates, intention=intention, seed=user)


def wire(ins: Instruction, **kwargs) -> bytes:
    return encode_request(ins, IDS.__getitem__, TITLES.__getitem__, **kwargs)


def mutated(ins: Instruction, change) -> bytes:
    document = orjson.loads(wire(ins))
    change(document)
    return orjson.dumps(document)


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    """A tiny BERT encoder-decoder with collaborative vectors for half the catalog (the rest: text only)."""
    known = IDS[: N_ITEMS // 2]
    torch.manual_seed(1)
    vectors = torch.randn(len(known), 8)
    return tiny_bert(minilm_tokenizer(), vectors, known)


def in_process(reranker: Reranker, instructions: list[Instruction]) -> list[np.ndarray]:
    rows = [reranker.item_row(item_id) for item_id in IDS]
    return score(reranker, instructions, TITLES.__getitem__, rows.__getitem__)


# ------------------------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("intention", [None, "something light to watch with kids"])
def test_wire_round_trip_keeps_the_instruction(intention: str | None) -> None:
    ins = instruction(3, intention=intention)
    decoded = decode_request(wire(ins))
    assert decoded.instruction.template_id == ins.template_id
    assert decoded.instruction.task is ins.task
    assert decoded.instruction.labels == ins.labels
    assert decoded.instruction.text(decoded.titles.__getitem__) == ins.text(TITLES.__getitem__)
    assert decoded.candidate_ids == tuple(IDS[c] for c in ins.candidates)
    roles = [(decoded.item_ids[m.item], m.role, m.label) for m in decoded.instruction.mentions()]
    assert roles == [(IDS[m.item], m.role, m.label) for m in ins.mentions()]
    assert decoded.retrieval_scores is None


def test_wire_round_trip_with_fusion() -> None:
    ins = instruction(1)
    scores = [float(i) for i in range(len(ins.candidates))]
    decoded = decode_request(wire(ins, retrieval_scores=scores, fusion_weight=0.3))
    assert decoded.retrieval_scores == tuple(scores)
    assert decoded.fusion_weight == 0.3


def test_encode_refuses_inconsistent_fusion_arguments() -> None:
    ins = instruction(1)
    with pytest.raises(ValueError, match="together"):
        wire(ins, retrieval_scores=[1.0] * len(ins.candidates))
    with pytest.raises(ValueError, match="retrieval scores for"):
        wire(ins, retrieval_scores=[1.0], fusion_weight=0.5)


def _set(path: list, value):
    def change(document):
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _first_mention(document) -> dict:
    return next(p for p in document["parts"] if isinstance(p, dict))


MALFORMED_CASES = {
    "not json": (lambda ins: b"{not json", "not JSON"),
    "not an object": (lambda ins: b"[1, 2]", "expected a JSON object"),
    "unknown version": (lambda ins: mutated(ins, _set(["v"], 99)), "version 99"),
    "no template": (lambda ins: mutated(ins, lambda d: d.pop("template_id")), "template_id"),
    "bad task": (lambda ins: mutated(ins, _set(["task"], "T9")), "task: 'T9'"),
    "no candidates": (lambda ins: mutated(ins, _set(["candidates"], [])), "at least one candidate"),
    "candidates not a list": (
        lambda ins: mutated(ins, _set(["candidates"], "abc")),
        "candidates: expected a list",
    ),
    "numeric item id": (
        lambda ins: mutated(ins, _set(["candidates", 0, "item_id"], 7)),
        "candidates[0].item_id",
    ),
    "missing title": (
        lambda ins: mutated(ins, lambda d: d["candidates"][1].pop("title")),
        "candidates[1].title",
    ),
    "duplicate candidate": (
        lambda ins: mutated(ins, lambda d: d["candidates"].append(dict(d["candidates"][0]))),
        "already a candidate",
    ),
    "bad role": (
        lambda ins: mutated(ins, lambda d: _first_mention(d).update(role="friend")),
        "role: 'friend'",
    ),
    "two titles": (
        lambda ins: mutated(ins, lambda d: _first_mention(d).update(item_id=d["candidates"][0]["item_id"])),
        "has two titles",
    ),
    "fusion length": (
        lambda ins: mutated(ins, _set(["fusion"], {"retrieval_scores": [1.0], "weight": 0.5})),
        "1 scores for",
    ),
    "fusion weight": (
        lambda ins: mutated(
            ins, _set(["fusion"], {"retrieval_scores": [1.0] * len(ins.candidates), "weight": -1})
        ),
        "fusion.weight",
    ),
    "too large": (lambda ins: b" " * (wire_format.MAX_REQUEST_BYTES + 1), "more than the limit"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CASES))
def test_malformed_requests_get_a_clear_error(case: str) -> None:
    make, expected = MALFORMED_CASES[case]
    with pytest.raises(RequestError) as raised:
        decode_request(make(instruction(2)))
    assert str(raised.value).startswith(wire_format.MALFORMED)
    assert expected in str(raised.value)


# ---------------------------------------------------------------------------------------------- scoring


def test_serving_scores_equal_in_process_scores(reranker: Reranker) -> None:
    instructions = [instruction(u, n_candidates=4 + u) for u in range(5)]
    served = ServingScorer(reranker).score([wire(ins) for ins in instructions])
    for got, expected in zip(served, in_process(reranker, instructions), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_batch_scores_like_one_request_at_a_time(reranker: Reranker) -> None:
    scorer = ServingScorer(reranker)
    requests = [wire(instruction(u, n_candidates=3 + 2 * u)) for u in range(6)]
    together = scorer.score(requests)
    for request, expected in zip(requests, together, strict=True):
        (alone,) = scorer.score([request])
        np.testing.assert_allclose(alone, expected, atol=1e-5)


def test_unknown_items_fall_back_to_text(reranker: Reranker) -> None:
    """An item id the model has no collaborative vector for is scored from its title, like row 0."""
    ins = instruction(4)

    def rename_every_item(document) -> None:
        for entry in [*document["candidates"], *(p for p in document["parts"] if isinstance(p, dict))]:
            entry["item_id"] = "new-" + entry["item_id"]

    renamed = mutated(ins, rename_every_item)
    (known,), (unknown,) = (
        ServingScorer(reranker).score([wire(ins)]),
        ServingScorer(reranker).score([renamed]),
    )
    text_only = score(reranker, [ins], TITLES.__getitem__, lambda i: 0)[0]
    np.testing.assert_allclose(unknown, text_only, atol=1e-5)
    assert not np.allclose(known, unknown, atol=1e-4)  # half the candidates did have vectors


def test_a_malformed_request_does_not_fail_its_batch(reranker: Reranker) -> None:
    good = [wire(instruction(u)) for u in range(3)]
    results = ServingScorer(reranker).score([good[0], b"{broken", good[1], b'{"v": 1}', good[2]])
    assert isinstance(results[1], RequestError)
    assert isinstance(results[3], RequestError)
    expected = ServingScorer(reranker).score(good)
    for got, want in zip([results[0], results[2], results[4]], expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_fusion_applies_scoring_fuse(reranker: Reranker) -> None:
    ins = instruction(5)
    retrieval = np.linspace(3.0, -1.0, len(ins.candidates))
    (fused,) = ServingScorer(reranker).score(
        [wire(ins, retrieval_scores=retrieval.tolist(), fusion_weight=0.4)]
    )
    (raw,) = in_process(reranker, [ins])
    np.testing.assert_allclose(fused, fuse(raw, retrieval, 0.4), atol=1e-5)


def test_triton_view_groups_pads_and_fails_whole_requests(reranker: Reranker) -> None:
    scorer = ServingScorer(reranker)
    a, b = wire(instruction(1, n_candidates=3)), wire(instruction(2, n_candidates=5))
    single = np.array([[a]], dtype=object)
    double = np.array([[a], [b]], dtype=object)
    broken = np.array([[b], [b"nope"]], dtype=object)
    out_single, out_double, out_broken = scorer.score_triton([single, double, broken])
    assert out_single.shape == (1, 3)
    assert out_double.shape == (2, 5)
    np.testing.assert_allclose(out_double[0, :3], out_single[0], atol=1e-5)
    assert np.isneginf(out_double[0, 3:]).all()
    assert isinstance(out_broken, RequestError) and "document 1 of 2" in str(out_broken)


def test_warmup_request_is_a_valid_request(reranker: Reranker) -> None:
    decoded = decode_request(serving_scorer.warmup_request())
    assert len(decoded.instruction.candidates) == 20
    assert len(decoded.instruction.mentions("history")) == 10
    assert serving_scorer.warm_up(ServingScorer(reranker), batch_sizes=(1,)) >= 0


def test_options_from_the_triton_model_config() -> None:
    config = {
        "parameters": {
            "quantize": {"string_value": "int8"},
            "threads": {"string_value": "2"},
            "warmup": {"string_value": "false"},
            "trim_heap_s": {"string_value": "5"},
        }
    }
    options = ServingOptions.from_triton(config, {"model_instance_kind": "CPU"})
    assert options == ServingOptions(
        quantize="int8", dtype="float32", device="cpu", threads=2, warmup=False, trim_heap_s=5.0
    )
    gpu = ServingOptions.from_triton(
        {"parameters": {"dtype": {"string_value": "float16"}}},
        {"model_instance_kind": "GPU", "model_instance_device_id": "1"},
    )
    assert (gpu.device, gpu.dtype) == ("cuda:1", "float16")
    with pytest.raises(ValueError, match="quantize"):
        ServingOptions.from_triton({"parameters": {"quantize": {"string_value": "int4"}}})
    with pytest.raises(ValueError, match="CPU"):
        ServingOptions(quantize="int8", device="cuda:0")
    with pytest.raises(ValueError, match="trim_heap_s"):
        ServingOptions(trim_heap_s=-1)


def test_the_heap_is_trimmed_at_most_every_interval() -> None:
    now, calls = [0.0], []
    trimmer = HeapTrimmer(30.0, trim=calls.append, clock=lambda: now[0])
    assert not trimmer() and calls == []  # too soon after start
    now[0] = 31.0
    assert trimmer() and calls == [0]
    now[0] = 40.0
    assert not trimmer()
    now[0] = 61.5
    assert trimmer() and calls == [0, 0]
    assert not HeapTrimmer(0, trim=calls.append, clock=lambda: 1e9)()  # 0: never


def test_releasing_the_heap_collects_garbage_then_trims_once() -> None:
    class Cycle:  # a reference cycle: only the collector frees it
        def __init__(self) -> None:
            self.me = self

    collected: list[bool] = []
    calls: list[int] = []
    gc.disable()  # so that only release_heap's collection can free it
    try:
        weakref.finalize(Cycle(), collected.append, True)
        assert not collected
        assert release_heap(trim=calls.append)
    finally:
        gc.enable()
    assert collected == [True] and calls == [0]


def test_glibc_trim_is_found_and_callable_here() -> None:
    trim = libc_trim()
    assert trim is not None  # the images and this machine run glibc
    assert trim(0) in (0, 1)  # 1: memory was released


def test_int8_keeps_the_verbalizer_head_and_scores(reranker: Reranker, tmp_path) -> None:
    reranker.save_pretrained(tmp_path / "m")
    scorer = serving_scorer.load_scorer(tmp_path / "m", ServingOptions(quantize="int8", warmup=False))
    head = scorer.reranker.seq2seq.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear)  # not quantised: the verbalizer reads its weight rows
    (scores,) = scorer.score([wire(instruction(1))])
    assert np.isfinite(scores).all()


def test_bfloat16_serving_scores_close_to_float32(reranker: Reranker, tmp_path) -> None:
    reranker.save_pretrained(tmp_path / "m")
    scorer = serving_scorer.load_scorer(tmp_path / "m", ServingOptions(dtype="bfloat16", warmup=False))
    assert next(scorer.reranker.parameters()).dtype == torch.bfloat16
    request = wire(instruction(3, n_candidates=12))
    (half,), (full,) = scorer.score([request]), ServingScorer(reranker).score([request])
    assert half.dtype == np.float32
    # Within bfloat16's resolution of these small scores; whether it keeps a real model's ranking is
    # measured on real requests by benchmarks/serving.py (Kendall tau 0.98 on the default model).
    np.testing.assert_allclose(half, full, atol=0.01)


def test_load_scorer_names_the_export_step_when_weights_are_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="export"):
        serving_scorer.load_scorer(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------- export


def test_export_writes_numbered_versions_into_a_fresh_repository(reranker: Reranker, tmp_path) -> None:
    reranker.save_pretrained(tmp_path / "saved")
    repository = tmp_path / "repository"
    first = triton_repository.export_version(tmp_path / "saved", repository)
    second = triton_repository.export_version(tmp_path / "saved", repository, link=True)
    model_dir = repository / triton_repository.MODEL_NAME
    assert (first.name, second.name) == ("1", "2")
    assert (model_dir / "config.pbtxt").is_file() and (model_dir / "configs" / "gpu.pbtxt").is_file()
    for version in (first, second):
        assert (version / "model.py").is_file()
        assert (version / VERSION_WEIGHTS_DIR / "reranker.json").is_file()
        assert json.loads((version / "version.json").read_text())["version"] == int(version.name)
    assert triton_repository.versions(repository) == [1, 2]
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]  # no partial folders left
    with pytest.raises(triton_repository.ExportError, match="immutable"):
        triton_repository.export_version(tmp_path / "saved", repository, 2)
    loaded = Reranker.from_pretrained(second / VERSION_WEIGHTS_DIR)
    ins = instruction(2)
    np.testing.assert_allclose(in_process(loaded, [ins])[0], in_process(reranker, [ins])[0], atol=1e-5)


def test_export_refuses_a_folder_that_is_not_a_saved_reranker(tmp_path) -> None:
    with pytest.raises(triton_repository.ExportError, match=r"reranker\.json"):
        triton_repository.export_version(tmp_path, tmp_path / "repository")


def test_copy_repository_leaves_weights_behind(reranker: Reranker, tmp_path) -> None:
    reranker.save_pretrained(tmp_path / "saved")
    triton_repository.export_version(tmp_path / "saved", tmp_path / "a")
    triton_repository.copy_repository(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / triton_repository.MODEL_NAME / "1" / "model.py").is_file()
    assert triton_repository.versions(tmp_path / "b") == []


# ------------------------------------------------------------------------------------- circuit breaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_fails_fast() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=10, clock=clock)
    for _ in range(2):
        breaker.acquire()
        breaker.record_failure()
    breaker.acquire()
    breaker.record_success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert breaker.state is BreakerState.CLOSED
        breaker.acquire()
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen, match=r"retry in 10\.0 s"):
        breaker.acquire()
    clock.now += 9.9
    with pytest.raises(CircuitOpen):
        breaker.acquire()


def test_breaker_half_open_lets_one_probe_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5, clock=clock)
    breaker.acquire()
    breaker.record_failure()
    clock.now += 5
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.acquire()  # the probe
    with pytest.raises(CircuitOpen, match="probe"):
        breaker.acquire()  # everyone else waits for its outcome
    breaker.record_failure()  # probe failed: open again, for a fresh cool-down
    assert breaker.state is BreakerState.OPEN
    clock.now += 4
    with pytest.raises(CircuitOpen):
        breaker.acquire()
    clock.now += 1
    breaker.acquire()
    breaker.record_success()  # probe succeeded: closed
    assert breaker.state is BreakerState.CLOSED
    breaker.acquire()


def test_breaker_release_frees_an_abandoned_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5, clock=clock)
    breaker.acquire()
    breaker.record_failure()
    clock.now += 5
    breaker.acquire()
    breaker.release()  # the probe was cancelled: no outcome
    breaker.acquire()  # the next caller probes, without another cool-down


def test_backoff_is_exponential_capped_and_jittered() -> None:
    backoff = RetryPolicy(retries=4, base_s=0.1, cap_s=0.5)
    assert [backoff.delay(n, rng=lambda: 1.0) for n in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert backoff.delay(3, rng=lambda: 0.5) == pytest.approx(0.25)


# ------------------------------------------------------------------------------ the client's policy


class FakeError(Exception):
    pass


def server_error(status: str, message: str = "boom"):
    from tritonclient.utils import InferenceServerException

    return InferenceServerException(message, status=status)


class FakeTransport(Transport):
    """Answers from a script: an exception to raise or a (scores, version) pair, one per call."""

    def __init__(self, script) -> None:
        super().__init__("fake:0")
        self.script = list(script)
        self.calls = 0

    async def infer(self, model, version, request, timeout_s):
        self.calls += 1
        outcome = self.script.pop(0) if self.script else (np.array([1.0, 2.0], dtype=np.float32), "7")
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == "hang":
            await asyncio.sleep(3600)
        return outcome

    async def is_model_ready(self, model, version, timeout_s):
        return True

    async def model_versions(self, model, timeout_s):
        return ["3", "12"]

    async def load_model(self, model, config, timeout_s):
        pass

    async def unload_model(self, model, timeout_s):
        pass

    async def close(self):
        pass


def client(script, *, retries: int = 2, threshold: int = 5, clock=None, timeout_s: float = 2.0):
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    transport = FakeTransport(script)
    breaker = CircuitBreaker(threshold, 10.0, clock or FakeClock())
    reranker = TritonReranker(
        TritonSettings(retries=retries, timeout_s=timeout_s),
        breaker=breaker,
        transport=transport,
        sleep=sleep,
        rng=lambda: 1.0,
    )
    return reranker, transport, delays


async def test_transient_errors_are_retried_with_backoff() -> None:
    unavailable = server_error("StatusCode.UNAVAILABLE")
    reranker, transport, delays = client([unavailable, ConnectionRefusedError()])
    (scores,) = await reranker.score([b"{}"])
    np.testing.assert_array_equal(scores, [1.0, 2.0])
    assert transport.calls == 3
    assert delays == pytest.approx([0.05, 0.1])
    assert reranker.model_version == "7"
    assert reranker.stats.retries == 2


async def test_retries_are_bounded() -> None:
    reranker, transport, _ = client([server_error("StatusCode.DEADLINE_EXCEEDED")] * 5, retries=1)
    with pytest.raises(RerankerUnavailable, match="after 2 attempt"):
        await reranker.score_one(b"{}")
    assert transport.calls == 2


async def test_a_slow_call_times_out_and_counts_as_transient() -> None:
    reranker, transport, _ = client(["hang"], retries=1, timeout_s=0.05)
    (scores,) = await reranker.score([b"{}"])  # the retry gets the default answer
    assert transport.calls == 2 and len(scores) == 2


async def test_a_malformed_request_is_not_retried_and_not_held_against_the_server() -> None:
    reranker, transport, _ = client(
        [server_error("StatusCode.INVALID_ARGUMENT", f"{wire_format.MALFORMED}: x")] * 10, threshold=1
    )
    for _ in range(3):
        with pytest.raises(RerankerRequestError, match="malformed"):
            await reranker.score_one(b"{}")
    assert transport.calls == 3
    assert reranker.breaker.state is BreakerState.CLOSED


async def test_server_errors_are_not_retried() -> None:
    reranker, transport, _ = client([server_error("StatusCode.NOT_FOUND", "unknown model")])
    with pytest.raises(RerankerUnavailable, match="unknown model"):
        await reranker.score_one(b"{}")
    assert transport.calls == 1


async def test_the_open_circuit_fails_fast_without_calling_the_server() -> None:
    clock = FakeClock()
    reranker, transport, _ = client([FakeError("down")] * 3, retries=0, threshold=3, clock=clock)
    for _ in range(3):
        with pytest.raises(RerankerUnavailable):
            await reranker.score_one(b"{}")
    with pytest.raises(CircuitOpen):
        await reranker.score_one(b"{}")
    assert transport.calls == 3 and reranker.stats.rejected == 1
    clock.now += 10  # cool-down over: the probe goes out, succeeds (default answer), the circuit closes
    (scores,) = await reranker.score([b"{}"])
    assert len(scores) == 2 and reranker.breaker.state is BreakerState.CLOSED


async def test_score_reports_each_failure_in_place_on_request() -> None:
    reranker, _, _ = client(
        [server_error("StatusCode.INVALID_ARGUMENT", f"{wire_format.MALFORMED}: x")], retries=0
    )
    results = await reranker.score([b"bad", b"good"], return_exceptions=True)
    assert isinstance(results[0], RerankerRequestError)
    np.testing.assert_array_equal(results[1], [1.0, 2.0])


async def test_model_version_from_metadata_and_model_control() -> None:
    reranker, _, _ = client([])
    assert reranker.model_version == ""
    assert await reranker.is_ready()
    assert await reranker.refresh_model_version() == "12"  # the newest ready version, numerically
    assert await reranker.load_model() == "12"


def test_auto_dtype_is_the_devices_native_precision(monkeypatch) -> None:
    assert serving_scorer.torch_dtype(ServingOptions(dtype="auto", device="cuda:0")) == "float16"
    assert (
        serving_scorer.torch_dtype(ServingOptions(dtype="auto", quantize="int8")) == "float32"
    )  # int8 runs over float32
    assert (
        serving_scorer.torch_dtype(ServingOptions(dtype="bfloat16")) == "bfloat16"
    )  # an explicit choice stands
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert serving_scorer.torch_dtype(ServingOptions(dtype="auto")) == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert (
        serving_scorer.torch_dtype(ServingOptions(dtype="auto")) == "float32"
    )  # emulated bfloat16 would be slow
