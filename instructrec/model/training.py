"""Instruction tuning of the reranker over mixed tasks and templates.

Each epoch draws fresh training targets from the recent end of every user's training sequence, asks the
retriever for that prefix's top-K candidates (the hard negatives the reranker will face when serving),
renders an instruction from a randomly chosen task and template, and trains with the task's loss:
listwise cross-entropy for matching and reranking (T2, T3), a two-way choice for pairwise (T1) and a yes/no
logistic loss for pointwise (T0). Validation reranks each user's retrieved candidates for the held-out
item; training stops early when validation NDCG@10 stops improving, keeping the best checkpoint.

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

from instructrec.data.dataset import Dataset
from instructrec.data.split import LeaveOneOut, Stage
from instructrec.instructions import YES, Example, Instruction, Synthesizer, Task, request_instruction
from instructrec.model.reranker import Reranker
from instructrec.model.scoring import score

# Retrieval for training and validation: histories -> top-k items per history (history excluded).
Candidates = Callable[[Sequence[Sequence[int]], int], list[list[int]]]


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
    retrieve: Candidates,
    synthesizer: Synthesizer,
    config: TrainConfig,
    out: str | Path,
    resume: bool = True,
) -> TrainResult:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    title_of, row_of = item_lookups(reranker, dataset)
    tokenizer = reranker.text_tokenizer()

    steps_per_epoch = math.ceil(dataset.n_users * config.positions_per_user / config.batch_size)  # at most
    optimizer = _optimizer(reranker, config)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_linear(int(total * config.warmup), total))
    state = {"epoch": 0, "best": -1.0, "best_epoch": -1, "history": [], "seconds": 0.0}
    if resume and (out / "trainer.pt").exists():
        saved = torch.load(out / "trainer.pt", weights_only=False)
        reranker.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state = saved["state"]

    valid = validation_set(dataset, split, retrieve, synthesizer, config.candidates, "valid")
    started = time.perf_counter() - state["seconds"]
    with _progress() as progress:
        for epoch in range(state["epoch"], config.epochs):
            examples = training_examples(dataset, split, retrieve, synthesizer, config, epoch)
            task = progress.add_task(f"epoch {epoch + 1}/{config.epochs}", total=len(examples))
            reranker.train()
            losses = []
            for start in range(0, len(examples), config.batch_size):
                if time.perf_counter() - started > config.max_minutes * 60:
                    break  # the budget holds mid-epoch too: validate and keep what was learned
                chunk = examples[start : start + config.batch_size]
                batch = tokenizer.collate([e.instruction for e in chunk], title_of, row_of)
                loss = example_loss(reranker(batch, train=True), chunk)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(reranker.parameters(), config.grad_clip)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                progress.update(task, advance=len(chunk), description=f"epoch {epoch + 1} loss {np.mean(losses[-50:]):.3f}")
                if not progress.console.is_terminal and len(losses) % 50 == 0:  # logs get a line now and then
                    progress.console.print(f"epoch {epoch + 1} step {len(losses)}: loss {np.mean(losses[-50:]):.4f}")
            ndcg = rerank_ndcg10(reranker, valid, title_of, row_of)
            state["seconds"] = time.perf_counter() - started
            state["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "valid_ndcg10": ndcg,
                                     "seconds": round(state["seconds"], 1)})
            progress.console.print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}, valid NDCG@10 {ndcg:.4f}")
            state["epoch"] = epoch + 1
            if ndcg > state["best"]:
                state["best"], state["best_epoch"] = ndcg, epoch + 1
                reranker.save_pretrained(out / "best")
            reranker.save_pretrained(out / "last")
            torch.save({"model": reranker.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "state": state}, out / "trainer.pt")
            if epoch + 1 - state["best_epoch"] >= config.patience:
                progress.console.print(f"early stop: no improvement for {config.patience} epochs")
                break
            if state["seconds"] > config.max_minutes * 60:
                progress.console.print(f"time budget of {config.max_minutes} min reached")
                break
    result = TrainResult(state["best"], state["best_epoch"], state["epoch"], state["seconds"], state["history"])
    (out / "training.json").write_text(json.dumps({"config": asdict(config), "result": asdict(result)}, indent=2))
    return result


def item_lookups(reranker: Reranker, dataset: Dataset) -> tuple[Callable[[int], str], Callable[[int], int]]:
    titles = [item.display_title for item in dataset.items]
    rows = [reranker.item_row(item.id) for item in dataset.items]
    return titles.__getitem__, rows.__getitem__


def training_examples(
    dataset: Dataset,
    split: LeaveOneOut,
    retrieve: Candidates,
    synthesizer: Synthesizer,
    config: TrainConfig,
    epoch: int,
) -> list[Example]:
    """One epoch of examples: recent targets of every user, with the retriever's candidates as negatives.

    Only prefixes whose target the retriever found on its own are kept (as LlamaRec does). Inserting a
    missed target by hand would make the positive the one candidate that does not look retrieved, and the
    model learns that shortcut: it then prefers outsiders, and ranks random negatives above real targets.
    Positions are drawn `oversample` times over so that enough survive.
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
    retrieved = retrieve([dataset.sequence(u)[:t] for u, t in jobs], config.candidates)
    kept: dict[int, int] = {}
    examples = []
    for (user, t), cands in zip(jobs, retrieved, strict=True):
        train_part = split.train(user)
        target = train_part[t].item
        if target not in cands or kept.get(user, 0) >= config.positions_per_user:
            continue
        kept[user] = kept.get(user, 0) + 1
        seed = int(rng.integers(2**31))
        examples.append(synthesizer.example(train_part[:t], target, [c for c in cands if c != target], seed=seed))
    return [examples[i] for i in rng.permutation(len(examples))]


def example_loss(scores: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
    """Listwise cross-entropy for choices among candidates; logistic loss on the yes/no margin for T0."""
    losses = []
    for row, example in zip(scores, examples, strict=True):
        ins = example.instruction
        if ins.task == Task.T0:
            label = torch.tensor(1.0 if example.answer == YES else 0.0)
            losses.append(F.binary_cross_entropy_with_logits(row[0], label))
        else:
            target = torch.tensor([ins.labels.index(example.answer)])
            losses.append(F.cross_entropy(row[: len(ins.candidates)].unsqueeze(0), target))
    return torch.stack(losses).mean()


@dataclass(frozen=True)
class EvalSet:
    instructions: list[Instruction]
    targets: list[int]  # target item per user (it may be missing from the candidates)


def validation_set(
    dataset: Dataset,
    split: LeaveOneOut,
    retrieve: Candidates,
    synthesizer: Synthesizer,
    k: int,
    stage: Stage,
) -> EvalSet:
    """Sequential recommendation (no request text) over each user's retrieved top-k for `stage`, rendered as
    a live request would be."""
    retrieved = retrieve(split.histories(stage), k)
    instructions = [
        request_instruction(split.history(u, stage), cands, seed=u, max_history=synthesizer.config.max_history)
        for u, cands in enumerate(retrieved)
    ]
    return EvalSet(instructions, split.targets(stage))


def rerank_ndcg10(reranker: Reranker, evalset: EvalSet, title_of, row_of) -> float:
    scores = score(reranker, evalset.instructions, title_of, row_of)
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


def _warmup_linear(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
