"""Serving options chosen by measurement: the choice rule, the recorded evidence, and the backend reading it."""

from __future__ import annotations

import json
import random

import pytest
import torch

from instructrec.adapters.triton import repository as triton_repository
from instructrec.artifacts import VERSION_WEIGHTS_DIR
from instructrec.data.dataset import Interaction
from instructrec.instructions import request_instruction
from instructrec.serving.calibration import (
    Calibration,
    Trial,
    calibrate,
    choose,
    read_calibration,
    thread_counts,
    write_calibration,
)
from instructrec.serving.options import CALIBRATION_FILE, ServingOptions
from instructrec.serving.wire import encode_request
from tests.models import minilm_tokenizer, tiny_bert
from workers.finetune.publish import inherited_calibration

RULE = {"tolerance": 0.005, "min_top1": 0.9, "min_speedup": 1.1}


def trial(precision: str, threads: int, ms: float, ndcg: float | None = None, top1: float | None = None):
    quantize, dtype = ("int8", "float32") if precision == "int8" else ("none", precision)
    return Trial(quantize, dtype, threads, ms, ndcg, top1)


def test_a_faster_precision_that_keeps_the_ranking_is_chosen() -> None:
    chosen, reason = choose(
        [trial("float32", 1, 50.0, 0.40, 1.0), trial("int8", 1, 30.0, 0.398, 0.95)], **RULE
    )
    assert (chosen.quantize, chosen.threads) == ("int8", 1)
    assert "1.67× faster" in reason


def test_a_faster_precision_that_loses_ranking_quality_is_refused_and_the_reason_says_so() -> None:
    chosen, reason = choose(
        [trial("float32", 1, 50.0, 0.40, 1.0), trial("int8", 1, 30.0, 0.38, 0.95)], **RULE
    )
    assert (chosen.quantize, chosen.dtype) == ("none", "float32")
    assert "lost +0.0200 NDCG@10" in reason
    chosen, _ = choose([trial("float32", 1, 50.0, 0.40, 1.0), trial("int8", 1, 30.0, 0.40, 0.8)], **RULE)
    assert chosen.quantize == "none"  # top-1 agreement under the bar


def test_a_precision_no_faster_than_the_margin_is_not_worth_its_risk() -> None:
    chosen, _ = choose([trial("float32", 1, 50.0, 0.40, 1.0), trial("int8", 1, 48.0, 0.41, 1.0)], **RULE)
    assert chosen.quantize == "none"


def test_threads_follow_speed_and_unmeasured_precisions_never_win() -> None:
    trials = [
        trial("float32", 1, 50.0, 0.40, 1.0),
        trial("float32", 4, 20.0),
        trial("bfloat16", 1, 200.0),  # slower than float32: its quality was never measured
        trial("int8", 4, 19.0, 0.40, 1.0),  # within the margin of float32 at 4 threads
    ]
    chosen, _ = choose(trials, **RULE)
    assert (chosen.quantize, chosen.dtype, chosen.threads) == ("none", "float32", 4)
    with pytest.raises(ValueError, match="float32"):
        choose([trial("int8", 1, 10.0, 0.4, 1.0)], **RULE)


def test_thread_counts_fit_the_instances_on_the_cores() -> None:
    assert thread_counts(2, 2) == [1]  # this machine's CPU config: two single-threaded instances
    assert thread_counts(8, 2) == [1, 4]
    assert thread_counts(1, 4) == [1]


def _version(tmp_path, chosen: dict):
    folder = tmp_path / "7"
    folder.mkdir()
    (folder / CALIBRATION_FILE).write_text(json.dumps({**chosen, "reason": "measured"}))
    return folder


def test_the_backend_serves_the_versions_calibration_only_when_the_config_asks_and_on_a_cpu(tmp_path) -> None:
    folder = _version(tmp_path, {"quantize": "int8", "dtype": "float32", "threads": 2})
    config = {"parameters": {"calibrated": {"string_value": "true"}, "threads": {"string_value": "1"}}}
    options = ServingOptions.from_triton(config).for_version(folder)
    assert (options.quantize, options.dtype, options.threads) == ("int8", "float32", 2)
    uncalibrated = ServingOptions.from_triton({"parameters": {}}).for_version(folder)
    assert (uncalibrated.quantize, uncalibrated.threads) == ("none", 0)
    gpu = ServingOptions.from_triton(config, {"model_instance_kind": "GPU"}).for_version(folder)
    assert gpu.quantize == "none" and gpu.device == "cuda:0"
    empty = tmp_path / "8"
    empty.mkdir()
    bare = ServingOptions.from_triton(config).for_version(empty)
    assert (bare.quantize, bare.threads) == ("none", 1)  # no serving.json: the config's own values


def test_a_calibration_that_names_an_impossible_setting_fails_loudly(tmp_path) -> None:
    folder = _version(tmp_path, {"quantize": "int4", "dtype": "float32", "threads": 1})
    with pytest.raises(ValueError, match="quantize"):
        ServingOptions(calibrated=True).for_version(folder)


# ------------------------------------------------------------------------------- measured, in process

N_ITEMS = 30
IDS = [f"m{i}" for i in range(N_ITEMS)]
TITLES = [f"Film {i} of the series {i % 5} ({1990 + i})" for i in range(N_ITEMS)]


@pytest.fixture(scope="module")
def saved_reranker(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_bert(minilm_tokenizer(), torch.randn(N_ITEMS, 8), IDS)
    folder = tmp_path_factory.mktemp("reranker")
    model.save_pretrained(folder)
    return folder


def requests(n: int = 12) -> tuple[list[bytes], list[int]]:
    out, targets = [], []
    for user in range(n):
        rng = random.Random(user)
        history = [Interaction(rng.randrange(N_ITEMS), t) for t in range(5)]
        candidates = rng.sample(range(N_ITEMS), 6)
        ins = request_instruction(history, candidates, seed=user)
        prior = [rng.random() for _ in ins.candidates]
        out.append(
            encode_request(
                ins, IDS.__getitem__, TITLES.__getitem__, retrieval_scores=prior, fusion_weight=0.5
            )
        )
        targets.append(rng.randrange(len(ins.candidates)))
    return out, targets


def test_calibrate_measures_every_setting_and_records_its_evidence(saved_reranker, tmp_path) -> None:
    slice_, targets = requests()
    measured = calibrate(saved_reranker, slice_, targets, instances=2, cores=2, latency_requests=4)
    labels = [t.label for t in measured.trials]
    assert labels == ["float32, 1 thread", "int8, 1 thread", "bfloat16, 1 thread"]
    reference = measured.trials[0]
    assert reference.ndcg10 is not None and reference.top1_agreement == 1.0  # float32 against itself
    for t in measured.trials[1:]:
        assert (t.ndcg10 is None) == (t.ms_p50 >= reference.ms_p50)  # quality only where speed could win
    assert measured.examples == len(slice_) and measured.machine["cores"] == 2
    assert (measured.quantize, measured.dtype, measured.threads) in {
        (t.quantize, t.dtype, t.threads) for t in measured.trials
    }
    write_calibration(tmp_path, measured)
    assert read_calibration(tmp_path) == measured
    served = ServingOptions(calibrated=True).for_version(tmp_path)
    assert (served.quantize, served.dtype, served.threads) == (measured.quantize, measured.dtype, 1)


def test_an_exported_version_carries_its_calibration_and_its_successor_inherits_it(
    saved_reranker, tmp_path
) -> None:
    repository = tmp_path / "repository"
    chosen = Calibration("int8", "float32", 1, "measured", [], 0.005, 0.9, 1.1, 12)
    first = triton_repository.export_version(saved_reranker, repository, calibration=chosen.to_json())
    assert read_calibration(first) == chosen
    assert (first / VERSION_WEIGHTS_DIR).is_dir()
    carried = Calibration.from_json(inherited_calibration(repository, 1))
    assert carried.inherited_from == 1 and carried.quantize == "int8"
    second = triton_repository.export_version(saved_reranker, repository, calibration=carried.to_json())
    assert Calibration.from_json(inherited_calibration(repository, int(second.name))).inherited_from == 1
    plain = triton_repository.export_version(saved_reranker, repository)
    assert inherited_calibration(repository, int(plain.name)) is None
    assert inherited_calibration(repository, None) is None


def test_instance_count_reads_the_configs_instance_groups(tmp_path) -> None:
    config = triton_repository.default_repository() / triton_repository.MODEL_NAME / "config.pbtxt"
    assert triton_repository.instance_count(config) == 2
    (tmp_path / "c.pbtxt").write_text('name: "x"\nbackend: "python"\n')
    assert triton_repository.instance_count(tmp_path / "c.pbtxt") == 1


def test_calibration_without_validation_requests_says_so(saved_reranker) -> None:
    with pytest.raises(ValueError, match="validation requests"):
        calibrate(saved_reranker, [], [], instances=2)
