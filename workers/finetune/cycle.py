"""One fine-tune cycle: the examples since the last cycle (plus a replay sample of older ones), trained into the
served model, judged against it on the newest examples, which it never saw.

    split = split_examples(store, since, config, seed)
    prepared = prepare(split.train, planner, k)
    trained = train_candidate(candidate, prepared, planner.catalogue, config, budget_s)
    judged = gate(candidate, incumbent, judged_examples(store, split, config), planner, weight_for, config)

Training starts from the version Triton serves, or from the challenger: the last cycle's rejected candidate
when it was trained from the same served version and was not clearly worse (`FinetuneSettings.carry_cycles`
bounds how many cycles it carries on), so that cycles too small to move the model past the gate add up
while the gate still judges every candidate against what is served.

`method="lora"` trains LoRA adapters (peft) on the attention projections — query and value, which in the
MiniLM encoder-decoder include the decoder's cross-attention: it started random in the offline default but
the served version has trained it, so adapters on it are meaningful — and merges them into the weights
before the candidate is saved, so every version is self-contained (no base checkpoint to keep).
`method="full"` trains every weight. `method="auto"` (the default) takes LoRA for a model over `lora_above`
parameters (a Flan-T5: memory and forgetting) and a full fine-tune below it: on the small default, a
cycle's few hundred examples through rank-8 adapters leave the ranking where it was while a full fine-tune
moves it (`benchmarks/loop.py`, its method study, measures both on the same examples: gain and examples
per second).
"""

from __future__ import annotations

import copy
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from instructrec.adapters.triton.repository import fsync_tree
from instructrec.catalogue import Catalogue
from instructrec.config import FinetuneSettings
from instructrec.data.dataset import Interaction
from instructrec.instructions import Example as Instance
from instructrec.instructions import (
    Instruction,
    Intention,
    Preference,
    Request,
    SynthesisConfig,
    Synthesizer,
    Task,
    Wish,
    intention_kind,
    request_instruction,
)
from instructrec.model.reranker import Reranker
from instructrec.model.scoring import fuse, score
from instructrec.model.training import (
    TrainConfig,
    fit_examples,
    item_lookups,
    optimizer_for,
    plan_examples,
    prior_of,
)
from instructrec.planner import OfflinePlanner
from instructrec.serving.options import ServingOptions
from instructrec.serving.scorer import prepare as prepare_for_serving
from workers.finetune.gate import Verdict, judge, ranks
from workers.finetune.store import Example, ExampleStore

log = logging.getLogger(__name__)


@dataclass
class Split:
    """A cycle's examples: to train on, to judge on (the newest, unseen), and up to which store id."""

    train: list[Example]
    holdout: list[Example]
    trained_to: int  # the newest example id trained on (the next cycle starts after it)
    new: int  # how many of `train` are new since the last cycle
    holdout_to: int  # the newest example id when the cycle split (the holdout's end)


def split_examples(store: ExampleStore, since: int, config: FinetuneSettings, seed: int) -> Split:
    """New examples (after `since`) minus the newest `holdout` — at most the newest `cycle_examples` ×
    (1 − `replay`) of them — plus a replay sample of older ones (the new ones left out among them)."""
    last = store.last_id()
    judged = store.examples(after=max(since, last - config.holdout))
    holdout = [e for _, e in judged]
    cut = judged[0][0] - 1 if judged else last
    most_fresh = max(1, round(config.cycle_examples * (1 - config.replay)))
    start = max(since, cut - most_fresh)
    fresh = [e for _, e in store.examples(after=start, upto=cut)]
    share = config.replay / max(1e-9, 1 - config.replay) if config.replay < 1 else 1.0
    wanted = min(int(len(fresh) * share), config.cycle_examples - len(fresh))
    old = store.sample(wanted, upto=start, seed=seed) if start else []
    return Split(fresh + old, holdout, cut, len(fresh), last)


def judged_examples(store: ExampleStore, split: Split, config: FinetuneSettings) -> list[Example]:
    """The holdout the cycle split off plus the examples that arrived while it trained (at most `holdout`
    more): all newer than anything the candidate trained on, so the gate judges on every example it can
    without looking at the candidate's own data. Only examples whose chosen item is among the candidates
    count, a few hundred per holdout in `benchmarks/loop.py`: too few to tell a cycle's gain from noise."""
    arrived = store.examples(after=split.holdout_to, upto=split.holdout_to + config.holdout)
    return split.holdout + [e for _, e in arrived]


@dataclass
class Prepared:
    """Examples rendered as the reranker trains on them (instances) with their priors, and what was left out."""

    instances: list[Instance]
    priors: list[np.ndarray]
    skipped: int  # unknown items, fewer than two candidates, or a target the plan did not find


def prepare(
    examples: Sequence[Example],
    planner: OfflinePlanner,
    k: int,
    *,
    feedback_weight: float = 1.0,
    seed: int = 0,
    corrupt: bool = False,
) -> Prepared:
    """Clicks examples the way offline training makes them (a synthesised request over the plan's candidates);
    feedback examples over what was served, with the request's own text. `corrupt` shuffles the answers (a
    deliberately wrong candidate, for testing the gate)."""
    catalogue = planner.catalogue
    synthesizer = Synthesizer(catalogue.as_dataset(), SynthesisConfig(n_candidates=k))
    config = TrainConfig(candidates=k)
    rng = np.random.default_rng(seed)
    instances: list[Instance] = []
    priors: list[np.ndarray] = []
    skipped = 0
    clicks: list[tuple[Request, int, int]] = []
    for n, example in enumerate(examples):
        rows = [catalogue.rows[i] for i in example.history if i in catalogue.rows]
        target = catalogue.rows.get(example.target)
        if target is None:
            skipped += 1
            continue
        history = [Interaction(r, 0) for r in rows]
        if example.source == "clicks":
            if not history:
                skipped += 1
                continue
            clicks.append((synthesizer.request(history, target, seed=seed * 100_003 + n), target, n))
            continue
        served = [catalogue.rows[i] for i in example.candidates if i in catalogue.rows]
        if target not in served or len(served) < 2:
            skipped += 1
            continue
        request = _served_request(history, example.text)
        retrieval = planner.retrieval([rows])[0] if rows else None
        instance = synthesizer.render(request, target, served[:k], seed=seed * 100_003 + n)
        for _ in range(max(1, round(feedback_weight))):
            instances.append(instance)
            priors.append(prior_of(instance.instruction.candidates, retrieval))
    for planned in plan_examples(clicks, planner, synthesizer, config, rng):
        if planned is None:
            skipped += 1
            continue
        instances.append(planned[0])
        priors.append(planned[1])
    if corrupt:
        instances = [_shuffled(i, random.Random(seed + n)) for n, i in enumerate(instances)]
    order = rng.permutation(len(instances))
    return Prepared([instances[i] for i in order], [priors[i] for i in order], skipped)


def _served_request(history: list[Interaction], text: str | None) -> Request:
    preference = Preference.P1 if history else Preference.P0
    intention = intention_kind(text)
    if preference is Preference.P0 and intention is Intention.I0:
        raise ValueError("a served request had neither a history nor a text")
    return Request(preference, intention, Task.T3, Wish(text) if text else None, tuple(history))


def _shuffled(instance: Instance, rng: random.Random) -> Instance:
    ins = instance.instruction
    if len(ins.labels) < 2:
        return instance
    wrong = rng.choice([label for label in ins.labels if label != instance.answer])
    return replace(instance, answer=wrong)


def resolve_method(config: FinetuneSettings, reranker: Reranker) -> str:
    """`auto`: LoRA for a model over `lora_above` parameters, every weight below."""
    if config.method != "auto":
        return config.method
    size = sum(p.numel() for p in reranker.parameters())
    return "lora" if size > config.lora_above else "full"


@dataclass(frozen=True)
class Trained:
    method: str  # what was trained: "lora" or "full"
    seconds: float
    steps: int
    examples: int
    examples_per_s: float
    loss_first: float
    loss_last: float


def train_candidate(
    reranker: Reranker,
    prepared: Prepared,
    catalogue: Catalogue,
    config: FinetuneSettings,
    budget_s: float,
    progress=None,
) -> Trained:
    """Fine-tune `reranker` in place on the prepared examples (LoRA merged afterwards, or every weight)."""
    lookups = catalogue_lookups(reranker, catalogue)
    train_config = TrainConfig(batch_size=16, lr=config.lr, fresh_lr=config.lr, warmup=0.1, candidates=20)
    method = resolve_method(config, reranker)
    if method == "lora":
        reranker.add_lora("served", r=config.lora_r, alpha=2 * config.lora_r, targets=["query", "value"])
        train_config = replace(train_config, lr=config.lora_lr, fresh_lr=config.lora_lr)
    steps = max(1, -(-len(prepared.instances) // train_config.batch_size)) * config.epochs
    started = time.perf_counter()
    deadline = started + budget_s
    optimizer, schedule = optimizer_for(
        reranker, train_config, steps, spent=lambda: (time.perf_counter() - started) / max(budget_s, 1e-9)
    )
    losses: list[float] = []
    seen = 0
    for epoch in range(config.epochs):
        epoch_losses = fit_examples(
            reranker,
            prepared.instances,
            prepared.priors,
            lookups,
            optimizer,
            schedule,
            train_config,
            deadline,
            progress,
            f"fine-tune epoch {epoch + 1}",
        )
        losses += epoch_losses
        seen += min(len(prepared.instances), len(epoch_losses) * train_config.batch_size)
        if time.perf_counter() > deadline:
            break
    reranker.merge_lora()
    reranker.eval()
    seconds = time.perf_counter() - started
    ends = max(1, min(10, len(losses) // 2))  # first and last steps, never overlapping
    return Trained(
        method,
        seconds,
        len(losses),
        seen,
        seen / seconds if seconds > 0 else 0.0,
        float(np.mean(losses[:ends])) if losses else float("nan"),
        float(np.mean(losses[-ends:])) if losses else float("nan"),
    )


def challenger(last_cycle: dict | None, incumbent: str, work: Path) -> tuple[Path | None, int]:
    """The candidate the last finished cycle kept to carry on, if it challenges the version served now (a swap
    or a rollback since makes it stale), and how many cycles of examples it has trained on (0: none)."""
    verdict = (last_cycle or {}).get("verdict") or {}
    name = verdict.get("challenger")
    if not name or verdict.get("incumbent") != incumbent or not (work / name).is_dir():
        return None, 0
    return work / name, int(verdict.get("carried", 1))


def carries_on(verdict: Verdict, carried: int, config: FinetuneSettings) -> bool:
    """A rejected candidate carries on unless it is clearly worse (P(gain > 0) under the mirror of the gate's
    confidence) or has trained on `carry_cycles` cycles already: then the next starts from the served one."""
    worse = verdict.metrics.get("p_better", 0.0) < 1 - config.confidence
    return not verdict.accepted and not worse and carried < config.carry_cycles


def sweep(work: Path, last_cycle: dict | None) -> None:
    """Every candidate folder under `work` but the challenger the last finished cycle names."""
    kept = ((last_cycle or {}).get("verdict") or {}).get("challenger")
    if work.is_dir():
        for folder in work.iterdir():
            if folder.name != kept:
                shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Judged:
    verdict: Verdict
    candidate_ranks: np.ndarray
    incumbent_ranks: np.ndarray


@dataclass(frozen=True)
class Judgeable:
    """Held-out examples rendered as served: each request over its candidates, the chosen one's position, the
    retriever's scores to fuse with (and the request's text, which sets the fusion weight)."""

    instructions: list[Instruction]
    targets: list[int]
    priors: list[np.ndarray]
    texts: list[str | None]
    examples: list[int]  # which of the examples given each one renders

    def ranks_under(
        self, model: Reranker, catalogue: Catalogue, weight_for: Callable[[str | None], float]
    ) -> np.ndarray:
        """Each chosen item's 0-based rank under `model`, fused with the prior at the served weight."""
        title_of, row_of, text_of = catalogue_lookups(model, catalogue)
        raw = score(model, self.instructions, title_of, row_of, text_of=text_of)
        fused = [fuse(r, p, weight_for(t)) for r, p, t in zip(raw, self.priors, self.texts, strict=True)]
        return ranks(fused, self.targets)


def judgeable(
    examples: Sequence[Example],
    planner: OfflinePlanner,
    k: int = 20,
    seed: int = 0,
    max_history: int = 10,
) -> Judgeable:
    """The examples a reranker can be judged on — those whose chosen item is among the candidates (served
    ones for feedback, the plan's for clicks) — rendered as the stream renders a request."""
    catalogue = planner.catalogue
    out = Judgeable([], [], [], [], [])
    for n, example in enumerate(examples):
        rows = [catalogue.rows[i] for i in example.history if i in catalogue.rows]
        target = catalogue.rows.get(example.target)
        if target is None or not (rows or example.text):
            continue
        if example.source == "feedback":
            cands = [catalogue.rows[i] for i in example.candidates if i in catalogue.rows]
            scores = planner.retrieval([rows])[0] if rows else None
        else:
            plan, scores = planner.plan_with(rows, None, None, planner.retrieval([rows])[0], n=k)
            cands = [c.row for c in plan.candidates if c.row is not None]
        if target not in cands or len(cands) < 2:
            continue  # the gate judges the reranker: only lists that hold the chosen item
        history = [Interaction(r, 0) for r in rows]
        ins = request_instruction(
            history,
            cands[:k],
            intention=example.text,
            seed=seed + n,
            max_history=max_history,
            nouns=catalogue.nouns,
        )
        out.instructions.append(ins)
        out.targets.append(ins.candidates.index(target))
        out.priors.append(prior_of(ins.candidates, scores))
        out.texts.append(example.text)
        out.examples.append(n)
    return out


def gate(
    candidate: Reranker,
    incumbent: Reranker,
    holdout: Sequence[Example],
    planner: OfflinePlanner,
    weight_for: Callable[[str | None], float],
    config: FinetuneSettings,
    k: int = 20,
    seed: int = 0,
) -> Judged:
    """Both models on the held-out examples, as served: the request rendered over its candidates (served ones
    for feedback, the plan's for clicks), fused with the prior at the served weight."""
    held = judgeable(holdout, planner, k, seed)
    cand = held.ranks_under(candidate, planner.catalogue, weight_for)
    inc = held.ranks_under(incumbent, planner.catalogue, weight_for)
    verdict = judge(cand, inc, min_margin=config.min_margin, confidence=config.confidence, seed=seed)
    return Judged(verdict, cand, inc)


def as_served(reranker: Reranker, options: ServingOptions) -> Reranker:
    """The model as Triton serves it under `options` (a calibrated precision): a prepared copy, so that the
    float32 weights trained here are the ones saved; the model itself where nothing changes."""
    if options.quantize == "none" and options.dtype == "float32":
        return reranker
    return prepare_for_serving(copy.deepcopy(reranker), options)


def training_device(choice: str) -> str:
    """`auto`: the GPU when torch sees one, else the CPU."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def catalogue_lookups(reranker: Reranker, catalogue: Catalogue):
    """`training.item_lookups` over a catalogue instead of a dataset."""
    return item_lookups(reranker, catalogue.as_dataset())


def save_candidate(reranker: Reranker, out: Path) -> Path:
    """Saved and fsynced: a challenger outlives the cycle, and the store records it only once it is whole."""
    out.mkdir(parents=True, exist_ok=True)
    reranker.save_pretrained(out)
    fsync_tree(out)
    return out
