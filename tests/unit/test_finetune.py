"""The fine-tune worker's parts without a broker or a server: the store, ingestion, the gate, the repository's
staging and retirement."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from instructrec.adapters.triton import repository as repo
from instructrec.config import FinetuneSettings
from instructrec.events import ClickEvent, FeedbackEvent, encode
from instructrec.model.training import warmup_linear
from workers.finetune.cycle import (
    carries_on,
    challenger,
    judged_examples,
    resolve_method,
    split_examples,
    sweep,
)
from workers.finetune.gate import Verdict, judge, ranks
from workers.finetune.ingest import ingest
from workers.finetune.store import Batch, Example, ExampleStore, peek


def example(n: int, user: str = "u", source: str = "clicks") -> Example:
    return Example(user, (f"h{n}",), f"t{n}", float(n), source)


def record(topic: str, offset: int, event, partition: int = 0):
    return SimpleNamespace(
        topic=topic,
        partition=partition,
        offset=offset,
        value=encode(event) if not isinstance(event, bytes) else event,
    )


# ---- the store


def test_examples_and_positions_commit_together_and_survive_a_reopen(tmp_path: Path) -> None:
    store = ExampleStore(tmp_path / "s.db")
    store.commit(Batch([example(1), example(2)], {"u": ["a", "b"]}, {("clicks", 0): 7}))
    store.close()
    again = ExampleStore(tmp_path / "s.db")
    assert again.count() == 2 and again.positions() == {("clicks", 0): 7} and again.history("u") == ["a", "b"]
    assert [e.target for _, e in again.examples()] == ["t1", "t2"]


def test_peek_reads_zeros_until_the_schema_exists_then_the_counts(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with contextlib.closing(sqlite3.connect(path)) as db:  # the file before its tables
        db.execute("PRAGMA journal_mode=WAL")
    assert peek(path) == {"examples": 0, "cycles": 0, "running": False}
    store = ExampleStore(path)
    store.commit(Batch([example(1), example(2)], {}, {("clicks", 0): 2}))
    assert peek(path) == {"examples": 2, "cycles": 0, "running": False}
    store.close()


def test_a_failed_commit_stores_nothing(tmp_path: Path) -> None:
    store = ExampleStore(tmp_path / "s.db")
    broken = Batch([example(1)], {}, {("clicks", 0): 1})
    broken.histories = {"u": object()}  # not serialisable: the transaction fails after the examples went in
    with pytest.raises(TypeError):
        store.commit(broken)
    assert store.count() == 0 and store.positions() == {}


def test_the_store_is_bounded_and_keeps_a_replay_reservoir(tmp_path: Path) -> None:
    store = ExampleStore(tmp_path / "s.db", max_examples=50, replay_size=10)
    for n in range(0, 300, 10):
        store.commit(Batch([example(n + i) for i in range(10)], {}, {("clicks", 0): n + 10}))
    live = store.examples(replay=False)
    kept = store.examples(replay=True)
    assert len(live) == 50 and [e.target for _, e in live][-1] == "t299"
    assert len(kept) == 10 and all(int(e.target[1:]) < 250 for _, e in kept)  # older ones, for replay
    assert len({e.target for _, e in kept}) == 10


def test_a_cycle_trains_on_new_examples_and_judges_on_the_newest(tmp_path: Path) -> None:
    store = ExampleStore(tmp_path / "s.db")
    store.commit(Batch([example(n) for n in range(100)], {}, {}))
    config = FinetuneSettings(holdout=20, replay=0.5)
    first = split_examples(store, 0, config, seed=1)
    assert [e.target for e in first.holdout] == [f"t{n}" for n in range(80, 100)]
    assert len(first.train) == 80 and first.trained_to == 80
    store.commit(Batch([example(n) for n in range(100, 140)], {}, {}))
    second = split_examples(store, first.trained_to, config, seed=1)
    new = {e.target for e in second.train if int(e.target[1:]) >= 80}
    assert new == {f"t{n}" for n in range(80, 120)}  # everything after the last cycle but the new holdout
    assert len(second.train) == 80 and all(int(e.target[1:]) < 120 for e in second.train)  # + 40 replayed
    assert max(int(e.target[1:]) for e in second.train) < min(int(e.target[1:]) for e in second.holdout)


def test_the_gate_also_judges_what_arrived_while_the_candidate_trained_up_to_one_more_holdout(
    tmp_path: Path,
) -> None:
    store = ExampleStore(tmp_path / "s.db")
    store.commit(Batch([example(n) for n in range(100)], {}, {}))
    config = FinetuneSettings(holdout=20)
    split = split_examples(store, 0, config, seed=1)
    assert [e.target for e in judged_examples(store, split, config)] == [f"t{n}" for n in range(80, 100)]
    store.commit(Batch([example(n) for n in range(100, 130)], {}, {}))  # while it trained
    judged = [int(e.target[1:]) for e in judged_examples(store, split, config)]
    assert judged == list(range(80, 120)) and min(judged) > max(int(e.target[1:]) for e in split.train)


def test_a_late_cycle_takes_the_newest_it_can_train_and_replays_the_rest(tmp_path: Path) -> None:
    store = ExampleStore(tmp_path / "s.db")
    store.commit(Batch([example(n) for n in range(1000)], {}, {}))
    config = FinetuneSettings(holdout=100, replay=0.5, cycle_examples=200)
    split = split_examples(store, 0, config, seed=1)
    fresh = [int(e.target[1:]) for e in split.train[: split.new]]
    assert fresh == list(range(800, 900)) and split.trained_to == 900  # the newest 200 × (1 − 0.5)
    replayed = [int(e.target[1:]) for e in split.train[split.new :]]
    assert len(replayed) == 100 and max(replayed) < 800  # new ones left out are the replay's pool


# ---- ingestion


def test_clicks_become_next_item_examples_and_feedback_keeps_what_was_served() -> None:
    histories: dict[str, list[str]] = {"u1": ["a"]}
    clicks = [
        ClickEvent(event_id=f"c{i}", user_id="u1", item_id=item, kind="click", ts=float(i))
        for i, item in enumerate(["b", "c"])
    ]
    low = ClickEvent(event_id="c9", user_id="u1", item_id="d", kind="rating", rating=1.0, ts=9.0)
    feedback = FeedbackEvent(
        user_id="u1",
        request_id="r1",
        instruction="...",
        candidate_item_ids=("x", "c", "y"),
        positive_item_ids=("c",),
        negative_item_ids=("x",),
        template_id="P1-I1-T3-01",
        model_version="3",
        intention="something funny",
    )
    records = [record("clicks", i, c) for i, c in enumerate([*clicks, low])]
    records += [record("feedback", 0, feedback), record("clicks", 4, b"not json")]
    batch, invalid = ingest(
        records, clicks_topic="clicks", feedback_topic="feedback", history_of=histories.get, history_size=10
    )
    assert invalid == 1 and batch.positions == {("clicks", 0): 5, ("feedback", 0): 1}
    by_source = {e.source: e for e in batch.examples if e.target == "c"}
    assert [e.target for e in batch.examples if e.source == "clicks"] == ["b", "c"]  # not the low rating
    assert by_source["clicks"].history == ("a", "b")
    fb = by_source["feedback"]
    assert fb.candidates == ("x", "c", "y") and fb.negatives == ("x",) and fb.text == "something funny"
    assert "c" not in fb.history and batch.histories["u1"] == ["a", "b", "c", "d"]


# ---- the gate


def test_the_gate_accepts_a_real_gain_and_rejects_noise_and_losses() -> None:
    rng = np.random.default_rng(0)
    incumbent = rng.integers(0, 20, size=300)
    better = np.maximum(0, incumbent - rng.integers(0, 4, size=300))  # ranks move up a little
    noise = rng.permutation(incumbent)  # the same ranks, shuffled among examples: no paired gain
    worse = incumbent + 5
    assert judge(better, incumbent, min_margin=0.002, confidence=0.9).accepted
    assert not judge(worse, incumbent, min_margin=0.002, confidence=0.9).accepted
    assert not judge(noise, incumbent, min_margin=0.02, confidence=0.9).accepted
    assert not judge(np.array([]), np.array([]), min_margin=0, confidence=0.5).accepted


def test_a_rejected_candidate_carries_on_unless_clearly_worse_or_carried_long_enough() -> None:
    config = FinetuneSettings(carry_cycles=3, confidence=0.9)
    unsure = Verdict(False, "below the margin", {"p_better": 0.8})
    assert carries_on(unsure, 1, config) and carries_on(unsure, 2, config)
    assert not carries_on(unsure, 3, config)  # three cycles in: the next starts from the served version
    assert not carries_on(Verdict(False, "a loss", {"p_better": 0.05}), 1, config)
    assert not carries_on(Verdict(False, "nothing judged", {}), 1, config)
    assert not carries_on(Verdict(True, "better", {"p_better": 0.99}), 1, config)  # it serves now
    assert not carries_on(unsure, 1, FinetuneSettings(carry_cycles=1))


def test_the_challenger_is_what_the_last_finished_cycle_kept_for_the_version_served_now(
    tmp_path: Path,
) -> None:
    store = ExampleStore(tmp_path / "examples.db")
    work = tmp_path / "candidates"
    for name in ("cycle-1", "cycle-2"):
        (work / name).mkdir(parents=True)
    assert challenger(store.last_cycle(), "1", work) == (None, 0)
    first = store.begin_cycle(0.0, 10)
    store.end_cycle(first, 1.0, {"incumbent": "1", "challenger": "cycle-1", "carried": 2})
    store.begin_cycle(2.0, 20)  # killed mid-training: never finished, so it names nothing
    assert challenger(store.last_cycle(), "1", work) == (work / "cycle-1", 2)
    assert challenger(store.last_cycle(), "2", work) == (None, 0)  # a swap or a rollback since: stale
    sweep(work, store.last_cycle())
    assert sorted(p.name for p in work.iterdir()) == ["cycle-1"]  # the killed cycle's folder is gone
    third = store.begin_cycle(3.0, 30)
    store.end_cycle(third, 4.0, {"incumbent": "1", "challenger": None, "carried": 3})
    assert challenger(store.last_cycle(), "1", work) == (None, 0)
    sweep(work, store.last_cycle())
    assert list(work.iterdir()) == []
    store.close()


def test_the_learning_rate_reaches_zero_by_the_budget_when_the_budget_ends_before_the_steps() -> None:
    spent = [0.0]
    factor = warmup_linear(10, 110, spent=lambda: spent[0])
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)  # half the steps, the budget barely touched
    spent[0] = 0.9
    assert factor(60) == pytest.approx(0.1)  # nine tenths of the budget gone: the budget's decay rules
    spent[0] = 1.0
    assert factor(20) == 0.0
    assert warmup_linear(10, 110)(110) == 0.0 and warmup_linear(10, 110)(60) == pytest.approx(0.5)


def test_auto_trains_lora_only_above_the_size_bound() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000, bias=False), torch.nn.Linear(10, 1))  # 1,000,011
    assert resolve_method(FinetuneSettings(lora_above=1_000_000), model) == "lora"
    assert resolve_method(FinetuneSettings(lora_above=1_000_011), model) == "full"
    assert resolve_method(FinetuneSettings(method="lora", lora_above=10**9), model) == "lora"
    assert resolve_method(FinetuneSettings(method="full", lora_above=0), model) == "full"


def test_ranks_are_pessimistic_on_ties() -> None:
    assert ranks([np.array([1.0, 3.0, 3.0]), np.array([5.0, 1.0])], [1, 0]).tolist() == [1, 0]


# ---- the repository: staging outside the model's folder


def saved_reranker(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "reranker.json").write_text('{"config": {}, "item_ids": [], "base": null}')
    (path / "weights.bin").write_bytes(os.urandom(1024))
    return path


def test_exports_stage_beside_the_repository_and_retire_the_same_way(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    saved = saved_reranker(tmp_path / "saved")
    seen: list[list[str]] = []
    original = repo.fsync_tree

    def watch(root: Path) -> None:  # mid-export: the model's folder holds nothing new yet
        seen.append(sorted(p.name for p in (repository / repo.MODEL_NAME).iterdir()))
        original(root)

    repo.fsync_tree = watch
    try:
        for _ in range(4):
            repo.export_version(saved, repository)
    finally:
        repo.fsync_tree = original
    model_dir = repository / repo.MODEL_NAME
    assert all(all(n.isdigit() or n in ("config.pbtxt", "configs") for n in names) for names in seen)
    assert repo.versions(repository) == [1, 2, 3, 4]
    assert repo.prune_versions(repository, 2, protect=(1,)) == [2]
    assert repo.versions(repository) == [1, 3, 4]
    repo.retire_version(repository, 4)
    assert repo.versions(repository) == [1, 3]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "3", "config.pbtxt", "configs"]
    assert not list(repo.staging_dir(repository).iterdir())  # nothing left half-done in staging either
