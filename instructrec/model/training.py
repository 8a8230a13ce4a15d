"""Instruction tuning of the reranker over mixed tasks and templates.

Each epoch draws fresh training targets from the recent end of every user's training sequence and writes a
request for each (`Synthesizer.request`: who asks, what they say — nothing, a vague or specific intention, a
negative constraint — and the task form); the planner fetches that request's top-K candidates as serving
would (`instructrec.candidates`: the same plan, so the reranker trains on the candidate lists it will face),
the instruction is rendered, and the task's loss applies: listwise cross-entropy for matching and reranking
(T2, T3), a two-way choice for pairwise (T1) and a yes/no logistic loss for pointwise (T0). Validation
reranks planned candidates of the held-out item over the three settings (no text, vague, specific); training
stops early when validation NDCG@10 stops improving, keeping the best checkpoint.

The reranker learns a residual over the plan's collaborative scores (the prior): its logits plus
`prior_weight` × the prior's log-softmax go into the listwise loss, the same product of experts that serving
computes (`scoring.fuse`). The gradient then goes to the lists the retriever orders badly, instead of spending
a small model's capacity on relearning what the collaborative retriever already knows; validation measures the
same fused order.

Resumable: `last/` holds the latest model and `trainer.pt` the optimiser, schedule, epoch and best score.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from instructrec.artifacts import BEST_DIR, LAST_DIR, TRAINER_FILE, TRAINING_FILE
from instructrec.data.dataset import Dataset
from instructrec.data.split import LeaveOneOut, Stage
from instructrec.instructions import (
    YES,
    Example,
    Instruction,
    Intention,
    Request,
    Synthesizer,
    Task,
    request_instruction,
    specific_intention,
    vague_intention,
)
from instructrec.instructions.render import rng_for
from instructrec.model.reranker import Reranker
from instructrec.model.scoring import fuse, score


@dataclass(frozen=True)
class PlanQuery:
    """What the planner needs of a request: the user's history (items, most recent last) and its text."""

    history: Sequence[int]
    text: str | None = None


# The candidate plan, as training and validation call it: (queries, k) -> for each, the top-k candidate items
# (history excluded, the text's constraints applied) and every item's collaborative score (the prior), or None
# without a collaborative score.
Planner = Callable[[Sequence[PlanQuery], int], list[tuple[list[int], np.ndarray | None]]]


@dataclass
class TrainConfig:
    epochs: int = 6
    batch_size: int = 16
    lr: float = 1e-4
    fresh_lr: float = 1e-3  # cross-attention, LM-head transform and item projection start from scratch
    weight_decay: float = 0.01
    warmup: float = 0.05
    candidates: int = 20
    positions_per_user: int = 4  # training targets per user and epoch (at most)
    oversample: int = 4  # positions drawn per kept one: only those whose target was retrieved are kept
    recent_window: int = 40  # drawn from this many most recent training positions
    patience: int = 2
    max_minutes: float = 30.0
    seed: int = 0
    grad_clip: float = 1.0
    prior_weight: float = 1.0  # weight of the retriever's log-softmax in the trained product of experts
    random_negatives: int = (
        4  # of a list's negatives, this many are random unseen items (see training_examples)
    )


@dataclass
class TrainResult:
    best_ndcg10: float
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list[dict]


def train(
    reranker: Reranker,
    dataset: Dataset,
    split: LeaveOneOut,
    planner: Planner,
    synthesizer: Synthesizer,
    config: TrainConfig,
    out: str | Path,
    resume: bool = True,
    valid: EvalSet | None = None,
) -> TrainResult:
    """Instruction-tune `reranker` on `planner`'s candidates; `valid` defaults to `validation_set(..., "valid")`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    title_of, row_of, text_of = item_lookups(reranker, dataset)

    steps_per_epoch = math.ceil(dataset.n_users * config.positions_per_user / config.batch_size)  # at most
    optimizer, schedule = optimizer_for(reranker, config, steps_per_epoch * config.epochs)
    state = {"epoch": 0, "best": -1.0, "best_epoch": -1, "history": [], "seconds": 0.0}
    if resume and (out / TRAINER_FILE).exists():
        # weights_only: tensors, the optimizer's and schedule's state dicts and plain Python values, and nothing
        # that runs code when unpickled
        saved = torch.load(out / TRAINER_FILE, weights_only=True)
        reranker.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state = saved["state"]

    weight = config.prior_weight
    valid = valid or validation_set(dataset, split, planner, synthesizer, config.candidates, "valid")
    started = time.perf_counter() - state["seconds"]
    lookups = (title_of, row_of, text_of)
    with _progress() as progress:
        for epoch in range(state["epoch"], config.epochs):
            examples, priors = training_examples(dataset, split, planner, synthesizer, config, epoch)
            deadline = started + config.max_minutes * 60  # the budget holds mid-epoch too
            losses = fit_examples(
                reranker,
                examples,
                priors,
                lookups,
                optimizer,
                schedule,
                config,
                deadline,
                progress,
                f"epoch {epoch + 1}",
            )
            ndcg = rerank_ndcg10(reranker, valid, title_of, row_of, weight, text_of)
            state["seconds"] = time.perf_counter() - started
            state["history"].append(
                {
                    "epoch": epoch + 1,
                    "loss": float(np.mean(losses)),
                    "valid_ndcg10": ndcg,
                    "seconds": round(state["seconds"], 1),
                }
            )
            progress.console.print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}, valid NDCG@10 {ndcg:.4f}")
            state["epoch"] = epoch + 1
            if ndcg > state["best"]:
                state["best"], state["best_epoch"] = ndcg, epoch + 1
                reranker.save_pretrained(out / BEST_DIR)
            reranker.save_pretrained(out / LAST_DIR)
            torch.save(
                {
                    "model": reranker.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "state": state,
                },
                out / TRAINER_FILE,
            )
            if epoch + 1 - state["best_epoch"] >= config.patience:
                progress.console.print(f"early stop: no improvement for {config.patience} epochs")
                break
            if state["seconds"] > config.max_minutes * 60:
                progress.console.print(f"time budget of {config.max_minutes} min reached")
                break
    result = TrainResult(
        state["best"], state["best_epoch"], state["epoch"], state["seconds"], state["history"]
    )
    (out / TRAINING_FILE).write_text(
        json.dumps({"config": asdict(config), "result": asdict(result)}, indent=2)
    )
    return result


def fit_examples(
    reranker: Reranker,
    examples: Sequence[Example],
    priors: Sequence[np.ndarray],
    lookups: tuple[Callable[[int], str], Callable[[int], int], Callable[[int], str]],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    deadline: float | None = None,
    progress: Progress | None = None,
    label: str = "training",
) -> list[float]:
    """One pass over `examples` in batches (stopping at the `deadline`, a `time.perf_counter()` value);
    returns the batches' losses. Shared by offline training and the fine-tune worker."""
    title_of, row_of, text_of = lookups
    tokenizer = reranker.text_tokenizer()
    weight = config.prior_weight
    task = progress.add_task(label, total=len(examples)) if progress is not None else None
    reranker.train()
    losses: list[float] = []
    for start in range(0, len(examples), config.batch_size):
        if deadline is not None and time.perf_counter() > deadline:
            break  # keep what was learned
        chunk = examples[start : start + config.batch_size]
        batch = tokenizer.collate([e.instruction for e in chunk], title_of, row_of, text_of)
        loss = example_loss(
            reranker(batch, train=True), chunk, priors[start : start + config.batch_size], weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in reranker.parameters() if p.requires_grad], config.grad_clip
        )
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None and task is not None:
            progress.update(task, advance=len(chunk), description=f"{label} loss {np.mean(losses[-50:]):.3f}")
            if not progress.console.is_terminal and len(losses) % 50 == 0:  # logs get a line now and then
                progress.console.print(f"{label} step {len(losses)}: loss {np.mean(losses[-50:]):.4f}")
    return losses


def optimizer_for(
    reranker: Reranker, config: TrainConfig, total_steps: int, spent: Callable[[], float] | None = None
):
    """AdamW over the trainable parameters (fresh parts at `fresh_lr`) and a warm-up-then-linear schedule.
    `spent` (the share of a time budget used, 0 to 1) makes the decay reach zero by whichever ends first, the
    steps or the budget: a run the budget cuts short would otherwise stop partway down, never annealed."""
    optimizer = _optimizer(reranker, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear(int(total_steps * config.warmup), max(1, total_steps), spent)
    )
    return optimizer, schedule


def item_lookups(
    reranker: Reranker, dataset: Dataset
) -> tuple[Callable[[int], str], Callable[[int], int], Callable[[int], str]]:
    """Per dataset item: its title (history mentions), its collaborative row, its description (candidates)."""
    from instructrec.catalogue import describe

    titles = [item.display_title for item in dataset.items]
    rows = [reranker.item_row(item.id) for item in dataset.items]
    texts = [describe(item.display_title, item.genres, item.tags) for item in dataset.items]
    return titles.__getitem__, rows.__getitem__, texts.__getitem__


def training_examples(
    dataset: Dataset,
    split: LeaveOneOut,
    planner: Planner,
    synthesizer: Synthesizer,
    config: TrainConfig,
    epoch: int,
    chunk: int = 256,
) -> tuple[list[Example], list[np.ndarray]]:
    """One epoch of examples: recent targets of every user, each with a synthesised request and the plan's
    candidates for it as the list to rank; beside each, the plan's collaborative scores of its instruction's
    candidates (in instruction order: the prior).

    Only requests whose target the plan found on its own are kept (as LlamaRec does). Inserting a missed
    target by hand would make the positive the one candidate that does not look retrieved, and the model
    learns that shortcut: it then prefers outsiders, and ranks random negatives above real targets. Positions
    are drawn `oversample` times over so that enough survive.

    Retrieved negatives alone teach a selection bias: the target is usually less popular than the other
    retrieved items, so a model trained only on them learns "prefer the obscure", which ranks random
    negatives first (below chance under the sampled protocol of `benchmarks/quality.py`). For requests without
    a text, the lowest-ranked `random_negatives` planned negatives are swapped for random items the user has
    not seen, so lists also hold items no retriever would propose (a request with a text keeps its planned
    list: a random item would break the request's constraints, which no served list does). With a prior that
    is not enough to fix the reranker *alone* (the prior already sinks random items, so the residual need
    not: the "reranker_only" row of `benchmarks/quality.py`): the product always runs fused.
    """
    rng = np.random.default_rng([config.seed, epoch])
    jobs = []  # (user, prefix length)
    for user in range(dataset.n_users):
        n = len(split.train(user))
        if n < 2:
            continue
        lo = max(1, n - config.recent_window)
        size = min(config.positions_per_user * config.oversample, n - lo)
        jobs.extend((user, int(t)) for t in rng.choice(np.arange(lo, n), size=size, replace=False))
    kept: dict[int, int] = {}
    examples: list[Example] = []
    priors: list[np.ndarray] = []
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        seeds = [int(rng.integers(2**31)) for _ in part]
        requests = [
            (
                synthesizer.request(split.train(user)[:t], split.train(user)[t].item, seed=seed),
                split.train(user)[t].item,
                seed,
            )
            for (user, t), seed in zip(part, seeds, strict=True)
        ]
        for (user, _), planned in zip(
            part, plan_examples(requests, planner, synthesizer, config, rng), strict=True
        ):
            if planned is None or kept.get(user, 0) >= config.positions_per_user:
                continue
            kept[user] = kept.get(user, 0) + 1
            examples.append(planned[0])
            priors.append(planned[1])
    order = rng.permutation(len(examples))
    return [examples[i] for i in order], [priors[i] for i in order]


def plan_examples(
    requests: Sequence[tuple[Request, int, int]],
    planner: Planner,
    synthesizer: Synthesizer,
    config: TrainConfig,
    rng: np.random.Generator,
) -> list[tuple[Example, np.ndarray] | None]:
    """Each (request, target, seed) rendered over the plan's candidates for it, with its prior; None where the
    plan did not find the target (see `training_examples` for why it is never inserted by hand)."""
    queries = [
        PlanQuery([x.item for x in r.history], r.wish.text if r.wish else None) for r, _, _ in requests
    ]
    out: list[tuple[Example, np.ndarray] | None] = []
    for (request, target, seed), (cands, scores) in zip(
        requests, planner(queries, config.candidates), strict=True
    ):
        if target not in cands:
            out.append(None)
            continue
        negatives = [c for c in cands if c != target]
        if config.random_negatives and request.wish is None:
            negatives = negatives[: max(1, len(negatives) - config.random_negatives)]
            seen = {x.item for x in request.history} | {target, *negatives}
            negatives += _unseen(rng, synthesizer.dataset.n_items, seen, config.random_negatives)
        example = synthesizer.render(request, target, negatives, seed=seed)
        out.append((example, prior_of(example.instruction.candidates, scores)))
    return out


def prior_of(candidates: Sequence[int], scores: np.ndarray | None) -> np.ndarray:
    """The collaborative scores of `candidates` (zeros without scores: a flat prior); an item the plan
    filtered out or never scored gets less than the least of the others."""
    if scores is None:
        return np.zeros(len(candidates))
    out = np.asarray([scores[c] for c in candidates], dtype=np.float64)
    finite = np.isfinite(out)
    if not finite.all():
        out[~finite] = (out[finite].min() - 1.0) if finite.any() else 0.0
    return out


def _unseen(rng: np.random.Generator, n_items: int, seen: set[int], n: int) -> list[int]:
    """`n` distinct random items outside `seen` (fewer when the catalogue has no more)."""
    out: list[int] = []
    for item in rng.permutation(n_items):
        if len(out) == n:
            break
        if int(item) not in seen:
            out.append(int(item))
    return out


def example_loss(
    scores: torch.Tensor,
    examples: Sequence[Example],
    priors: Sequence[np.ndarray | None] | None = None,
    prior_weight: float = 0.0,
) -> torch.Tensor:
    """Listwise cross-entropy for choices among candidates; logistic loss on the yes/no margin for T0.

    A choice among candidates with a prior is scored as the product of experts `logits + prior_weight ×
    log_softmax(prior)`; T0 (one candidate, nothing to compare) always stands alone."""
    losses = []
    priors = priors if priors is not None else [None] * len(examples)
    for row, example, prior in zip(scores, examples, priors, strict=True):
        ins = example.instruction
        if ins.task == Task.T0:
            label = torch.tensor(1.0 if example.answer == YES else 0.0, device=row.device)
            losses.append(F.binary_cross_entropy_with_logits(row[0], label))
            continue
        logits = row[: len(ins.candidates)]
        if prior is not None and prior_weight:
            logits = logits + prior_weight * torch.log_softmax(
                torch.as_tensor(prior, dtype=logits.dtype, device=logits.device), dim=0
            )
        target = torch.tensor([ins.labels.index(example.answer)], device=logits.device)
        losses.append(F.cross_entropy(logits.unsqueeze(0), target))
    return torch.stack(losses).mean()


@dataclass(frozen=True)
class EvalSet:
    instructions: list[Instruction]
    targets: list[int]  # target item per user (it may be missing from the candidates)
    priors: list[np.ndarray] | None = None  # the plan's collaborative scores of each instruction's candidates


SETTINGS = (Intention.I0, Intention.I1, Intention.I2)  # validation cycles through them, user by user


def validation_set(
    dataset: Dataset,
    split: LeaveOneOut,
    planner: Planner,
    synthesizer: Synthesizer,
    k: int,
    stage: Stage,
) -> EvalSet:
    """Each user's held-out item for `stage`, requested in one of the three settings in turn (no text; a vague
    or a specific intention written from the item with the training phrasings), over the plan's top-k for
    that request and rendered as a live request would be."""
    queries, texts = [], []
    for u in range(dataset.n_users):
        history = split.history(u, stage)
        target = dataset.items[split.target(u, stage)]
        rng = rng_for(u, f"validation:{stage}")
        setting = SETTINGS[u % len(SETTINGS)]
        wish = None
        if setting is Intention.I1:
            wish = vague_intention(target, rng, pool=synthesizer.config.pool, nouns=dataset.nouns)
        elif setting is Intention.I2:
            wish = specific_intention(target, rng, pool=synthesizer.config.pool, nouns=dataset.nouns)
        texts.append(wish.text if wish else None)
        queries.append(PlanQuery([x.item for x in history], texts[-1]))
    planned = planner(queries, k)
    instructions, priors = [], []
    for u, (query, (cands, scores)) in enumerate(zip(queries, planned, strict=True)):
        instruction = request_instruction(
            split.history(u, stage),
            cands,
            intention=query.text,
            seed=u,
            max_history=synthesizer.config.max_history,
            nouns=dataset.nouns,
        )
        instructions.append(instruction)
        priors.append(prior_of(instruction.candidates, scores))
    return EvalSet(instructions, split.targets(stage), priors)


def rerank_ndcg10(
    reranker: Reranker, evalset: EvalSet, title_of, row_of, prior_weight: float = 0.0, text_of=None
) -> float:
    """NDCG@10 of the reranked candidates (fused with the prior when a weight and priors are given)."""
    scores = score(reranker, evalset.instructions, title_of, row_of, text_of=text_of)
    if prior_weight and evalset.priors is not None:
        scores = [fuse(s, p, prior_weight) for s, p in zip(scores, evalset.priors, strict=True)]
    gains = []
    for ins, s, target in zip(evalset.instructions, scores, evalset.targets, strict=True):
        if target not in ins.candidates:
            gains.append(0.0)
            continue
        rank = int((s > s[ins.candidates.index(target)]).sum())
        gains.append(1.0 / math.log2(rank + 2) if rank < 10 else 0.0)
    return float(np.mean(gains))


def _optimizer(reranker: Reranker, config: TrainConfig) -> torch.optim.Optimizer:
    # Parts the offline default starts from scratch (a Flan-T5 checkpoint has none but the item projection).
    fresh_markers = ("crossattention", "cls.predictions", "item_proj")
    fresh, pretrained = [], []
    for name, p in reranker.named_parameters():
        if p.requires_grad:
            (fresh if any(m in name for m in fresh_markers) else pretrained).append(p)
    groups = [{"params": pretrained, "lr": config.lr}, {"params": fresh, "lr": config.fresh_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)


def warmup_linear(
    warmup: int, total: int, spent: Callable[[], float] | None = None
) -> Callable[[int], float]:
    """The learning-rate factor at a step: up linearly over `warmup` steps, then down linearly to zero at
    `total` steps — or sooner, as `spent()` (a share of a time budget) says."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        done = (step - warmup) / max(1, total - warmup)
        if spent is not None:
            done = max(done, spent())
        return max(0.0, 1.0 - done)

    return factor


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
