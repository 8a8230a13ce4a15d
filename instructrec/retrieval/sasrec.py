"""SASRec (Kang & McAuley 2018) trained with full-softmax cross-entropy (or, for large catalogues, a
sampled softmax corrected by log Q: `negatives`).

A causal Transformer reads a user's item sequence and, at every position, predicts the next item. Two choices
matter more than the architecture:
- the loss is cross-entropy over *all* items at every position, not SASRec's one-negative BCE ("Turning Dross
  Into Gold Loss", Klenitskiy & Vasilev 2023: CE is far better and the catalogue here is small enough);
- embeddings start at N(0, 0.02) (PyTorch's N(0, 1) default did not learn when we planned this).
Input and output item embeddings are tied, so the last hidden state is a query vector and the scores are its
dot products with the item embeddings: the item vectors can go straight into a vector index (Distance.DOT).

Sequences are right-padded (item index + 1, 0 = padding) and positions count from the first item shown, so a
causal mask alone keeps real positions from ever seeing padding. Longer sequences keep their last `max_len`.

On ml-latest-small the defaults stop early, in minutes on one CPU thread; `benchmarks/quality.py` reports the
training time and the "sasrec" row. On a shared CPU use torch.set_num_threads(1): threads spin-waiting
against other processes run many times slower.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file
from torch import nn

from instructrec.data.split import LeaveOneOut
from instructrec.evaluation.metrics import ndcg
from instructrec.evaluation.protocols import chunked_ranks, retriever_rows, sample_users
from instructrec.retrieval.base import Histories, read_config, write_config

logger = logging.getLogger(__name__)


@dataclass
class SASRecConfig:
    """Defaults tuned on ml-latest-small validation (full ranking, history masked) within a ~10 min CPU
    budget: d 128, dropout 0.3 or 0.5, last-window-only training and a constant learning rate all did worse."""

    n_items: int = 0  # set by fit()
    max_len: int = 200
    d: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.2  # on embeddings and residual branches
    attn_dropout: float = (
        0.0  # on attention weights; off by default: on CPU it forces the slow attention path
    )
    lr: float = 2e-3  # peak learning rate
    cosine: bool = True  # decay the learning rate to 0 over `epochs` after a linear warm-up
    warmup_epochs: int = 2
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 60  # the schedule's length; early stopping usually ends training first (~30-45 epochs)
    eval_every: int = 4  # epochs between validation NDCG@10 evaluations
    patience: int = 4  # evaluations without improvement before stopping
    all_windows: bool = True  # train on every max_len window of long sequences, not just the last one
    valid_users: int | None = 10_000  # early stopping's validation users: a seeded sample when more
    # 0: cross-entropy over every item. N: a sampled softmax over N negatives shared by a batch, drawn by
    # item frequency and corrected by log Q (Yi et al. 2019), for catalogues whose full softmax costs more
    # than the budget (benchmarks/scale.py --negatives measures what it costs in NDCG@10)
    negatives: int = 0
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------
# the network


class CausalSelfAttention(nn.Module):
    def __init__(self, c: SASRecConfig) -> None:
        super().__init__()
        self.heads, self.dropout = c.heads, c.attn_dropout
        self.qkv = nn.Linear(c.d, 3 * c.d)
        self.proj = nn.Linear(c.d, c.d)
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    """Pre-norm Transformer block (attention, then a GELU feed-forward), each with a residual."""

    def __init__(self, c: SASRecConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.d), nn.LayerNorm(c.d)
        self.attn = CausalSelfAttention(c)
        self.mlp = nn.Sequential(
            nn.Linear(c.d, 4 * c.d), nn.GELU(), nn.Linear(4 * c.d, c.d), nn.Dropout(c.dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SASRecNet(nn.Module):
    def __init__(self, c: SASRecConfig) -> None:
        super().__init__()
        self.item = nn.Embedding(c.n_items + 1, c.d, padding_idx=0)  # row 0 is padding
        self.position = nn.Embedding(c.max_len, c.d)
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.blocks))
        self.ln_f = nn.LayerNorm(c.d)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.blocks))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] padded item tokens -> [B, T, d] hidden states (the query vector for the next item)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.dropout(self.item(tokens) + self.position(positions))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.item.weight[1:].T  # tied output embeddings, padding row excluded


# ---------------------------------------------------------------------------------------------------------
# batching


def _pad(sequences: list[list[int]], length: int) -> torch.Tensor:
    """Right-pad item indices (shifted by +1, 0 is padding) into a [len(sequences), length] tensor."""
    out = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, s in enumerate(sequences):
        out[row, : len(s)] = torch.as_tensor(s, dtype=torch.long) + 1
    return out


def _training_windows(sequences: Histories, max_len: int, all_windows: bool) -> list[list[int]]:
    """Chunks of ≤ max_len + 1 items (inputs are a chunk without its last item, labels without its first).

    A long sequence gives its last window, and with `all_windows` also the windows before it (sharing
    one item at the joins so that no transition is lost).
    """
    windows = []
    for s in sequences:
        s = list(s)
        end = len(s)
        while end >= 2:
            windows.append(s[max(0, end - max_len - 1) : end])
            if not all_windows:
                break
            end -= max_len
    return windows


def _batches(windows: list[list[int]], batch_size: int, rng: np.random.Generator) -> list[list[list[int]]]:
    """Shuffled batches of similar-length windows: a shuffle, then sorting within groups of 16 batches, so
    that padding (which costs as much compute as real items in the Transformer) stays small."""
    order = rng.permutation(len(windows))
    group = 16 * batch_size
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: len(windows[i]))
        batches += [[windows[i] for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _log_proposal(windows: list[list[int]], n_items: int) -> torch.Tensor:
    """log Q: how often each item is a label in the training windows, plus one so that every item can be
    drawn as a negative."""
    labels = np.fromiter((item for w in windows for item in w[1:]), dtype=np.int64)
    counts = np.bincount(labels, minlength=n_items).astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum()).astype(np.float32))


def _lr_lambda(c: SASRecConfig, steps_per_epoch: int):
    """Learning-rate multiplier per step: linear warm-up, then cosine decay to 0 at `epochs` (or constant).

    A fixed epoch budget is the constraint on a CPU, and decaying within it is what settles the noisy
    validation curve a constant rate leaves."""
    warmup, total = c.warmup_epochs * steps_per_epoch, c.epochs * steps_per_epoch

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not c.cosine:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return multiplier


# ---------------------------------------------------------------------------------------------------------
# the retriever


@dataclass
class SASRec:
    config: SASRecConfig = field(default_factory=SASRecConfig)
    net: SASRecNet | None = None
    log: dict = field(default_factory=dict)  # training wall time, best epoch, validation curve
    kind = "sasrec"

    def fit(self, split: LeaveOneOut, verbose: bool = False) -> SASRec:
        """Train on the split's training sequences; early-stop on validation NDCG@10 (full ranking, history masked)."""
        return self.fit_sequences(
            split.train_sequences(),
            split.dataset.n_items,
            split.histories("valid"),
            split.targets("valid"),
            verbose,
        )

    def fit_sequences(
        self,
        sequences: Histories,
        n_items: int,
        valid_histories: Histories | None = None,
        valid_targets: list[int] | None = None,
        verbose: bool = False,
    ) -> SASRec:
        c = self.config
        c.n_items = n_items
        if valid_targets is not None:
            users = sample_users(len(valid_targets), c.valid_users, c.seed)
            valid_histories = [valid_histories[u] for u in users]
            valid_targets = [valid_targets[u] for u in users]
        torch.manual_seed(c.seed)
        rng = np.random.default_rng(c.seed)
        self.net = SASRecNet(c)
        optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.98)
        )
        windows = _training_windows(sequences, c.max_len, c.all_windows)
        log_q = _log_proposal(windows, n_items) if 0 < c.negatives < n_items else None
        steps_per_epoch = len(_batches(windows, c.batch_size, np.random.default_rng(0)))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(c, steps_per_epoch))
        best, best_state, best_epoch, stale, curve = -1.0, None, 0, 0, []
        started, started_cpu = time.perf_counter(), time.process_time()
        columns = (
            TextColumn("sasrec {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, disable=not verbose, transient=False) as progress:
            task = progress.add_task("", total=c.epochs)
            for epoch in range(1, c.epochs + 1):
                loss = self._epoch(windows, optimizer, schedule, rng, log_q)
                entry = {"epoch": epoch, "loss": round(loss, 4)}
                if valid_targets is not None and (epoch % c.eval_every == 0 or epoch == c.epochs):
                    scores = retriever_rows(self, valid_histories)  # a chunk of users at a time
                    ranks = chunked_ranks(scores, valid_targets, valid_histories)
                    entry["valid_ndcg10"] = round(float(ndcg(ranks, 10).mean()), 5)
                    if entry["valid_ndcg10"] > best:
                        best, best_epoch, stale = entry["valid_ndcg10"], epoch, 0
                        best_state = copy.deepcopy(self.net.state_dict())
                    else:
                        stale += 1
                curve.append(entry)
                if "valid_ndcg10" in entry:
                    logger.info("sasrec %s (%.0f s)", entry, time.perf_counter() - started)
                progress.update(
                    task, advance=1, description=f"loss {loss:.3f} best valid NDCG@10 {max(best, 0):.4f}"
                )
                if stale >= c.patience:
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.log = {
            "train_seconds": round(time.perf_counter() - started, 1),
            # CPU seconds of this process: on a shared machine wall time also measures the neighbours
            "train_cpu_seconds": round(time.process_time() - started_cpu, 1),
            "epochs_run": len(curve),
            "best_epoch": best_epoch or len(curve),
            "best_valid_ndcg10": best if best >= 0 else None,
            "curve": curve,
        }
        self.net.eval()
        return self

    def _epoch(
        self,
        windows: list[list[int]],
        optimizer,
        schedule,
        rng: np.random.Generator,
        log_q: torch.Tensor | None,
    ) -> float:
        self.net.train()
        total, count = 0.0, 0
        for batch in _batches(windows, self.config.batch_size, rng):
            length = max(len(w) for w in batch) - 1
            inputs, labels = _pad([w[:-1] for w in batch], length), _pad([w[1:] for w in batch], length)
            hidden = self.net(inputs)
            real = labels > 0
            # logits only where there is a next item: padding would waste most of the [T × n_items] product
            if log_q is None:
                loss = F.cross_entropy(self.net.logits(hidden[real]), labels[real] - 1)
            else:
                loss = self._sampled_loss(hidden[real], labels[real] - 1, log_q)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * int(real.sum())
            count += int(real.sum())
        return total / max(count, 1)

    def _sampled_loss(self, hidden: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each target against `negatives` items drawn from the proposal Q for the whole
        batch, every logit less log Q of its item, so that the expected gradient approaches the full
        softmax's. A negative that is the row's own target is masked out."""
        negatives = torch.multinomial(log_q.exp(), self.config.negatives, replacement=True)
        weight = self.net.item.weight[1:]
        positive = (hidden * weight[targets]).sum(-1, keepdim=True) - log_q[targets].unsqueeze(1)
        negative = hidden @ weight[negatives].T - log_q[negatives]
        negative = negative.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
        logits = torch.cat([positive, negative], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long))

    # -- inference ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def query_vectors(self, histories: Histories, batch_size: int = 256) -> np.ndarray:
        """[n, d] last hidden state per history; an empty history gets the zero vector (scores all 0)."""
        self.net.eval()
        c = self.config
        out = np.zeros((len(histories), c.d), dtype=np.float32)
        for start in range(0, len(histories), batch_size):
            tails = [list(h[-c.max_len :]) for h in histories[start : start + batch_size]]
            lengths = torch.tensor([len(t) for t in tails])
            if int(lengths.max()) == 0:
                continue
            hidden = self.net(_pad(tails, int(lengths.max())))
            last = hidden[torch.arange(len(tails)), (lengths - 1).clamp(min=0)]
            last[lengths == 0] = 0.0
            out[start : start + len(tails)] = last.numpy()
        return out

    @torch.no_grad()
    def item_vectors(self) -> np.ndarray:
        """[n_items, d] output embeddings; score = query · item (dot product, not cosine)."""
        return self.net.item.weight[1:].detach().numpy().astype(np.float32, copy=True)

    def score(self, histories: Histories) -> np.ndarray:
        return self.query_vectors(histories) @ self.item_vectors().T

    # -- persistence ----------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        directory = write_config(directory, self.kind, {"config": asdict(self.config), "log": self.log})
        save_file(
            {k: v.contiguous() for k, v in self.net.state_dict().items()},
            str(directory / "model.safetensors"),
        )

    @classmethod
    def load(cls, directory: str | Path) -> SASRec:
        saved = read_config(directory)
        config = SASRecConfig(**saved["config"])
        net = SASRecNet(config)
        net.load_state_dict(load_file(str(Path(directory) / "model.safetensors")))
        net.eval()
        return cls(config=config, net=net, log=saved.get("log", {}))

    def __repr__(self) -> str:
        return f"SASRec({json.dumps(asdict(self.config))})"
