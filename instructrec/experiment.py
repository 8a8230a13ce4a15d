"""The offline pipeline end to end: fit the retrievers, instruction-tune the reranker on the retriever's
candidates, and evaluate every method under both protocols of DESIGN §5.

Artefacts of one dataset live in one folder, laid out by `instructrec.artifacts.Artifacts`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from instructrec.artifacts import Artifacts
from instructrec.data.dataset import Dataset
from instructrec.data.split import LeaveOneOut, Stage
from instructrec.evaluation.metrics import ranking_metrics
from instructrec.evaluation.protocols import (
    evaluate_full,
    reranked_ranks,
    sample_candidates,
    sampled_ranks,
    top_k,
)
from instructrec.instructions import SynthesisConfig, Synthesizer, request_instruction
from instructrec.model.reranker import Reranker, RerankerConfig, default_model
from instructrec.model.scoring import fuse, score
from instructrec.model.training import TrainConfig, item_lookups, train
from instructrec.retrieval.base import Retriever, load_retriever
from instructrec.retrieval.sasrec import SASRec, SASRecConfig

FUSION_GRID = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
RETRIEVERS = ("popularity", "itemknn", "cooccurrence", "text", "sasrec", "blend")


@dataclass
class PipelineConfig:
    retriever: str = "blend"  # which retriever feeds the reranker
    sasrec: SASRecConfig = field(
        default_factory=lambda: SASRecConfig(epochs=60, eval_every=4, patience=3, batch_size=32, lr=2e-3)
    )
    k: int = 20  # candidates reranked per request
    checkpoint: str | None = None  # a seq2seq checkpoint; None: the offline MiniLM default
    encoder_layers: int = 4  # of the offline default (MiniLM has 6; 4 halve training and serving cost)
    decoder_layers: int = 2
    lora: bool = False  # LoRA adapters instead of a full fine-tune (for large checkpoints)
    collaborative: bool = True  # give the reranker the retriever's item vectors
    fusion_weight: float = 0.0  # weight of the retriever's log-probabilities added to the reranker's
    train: TrainConfig = field(default_factory=TrainConfig)
    seconds: dict[str, float] = field(default_factory=dict)  # training wall time per model

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> PipelineConfig:
        raw = json.loads(path.read_text())
        raw["train"] = TrainConfig(**raw["train"])
        raw["sasrec"] = SASRecConfig(**raw["sasrec"])
        return cls(**raw)


def candidates_fn(retriever: Retriever, chunk: int = 1024):
    """(histories, k) → the retriever's top-k per history, history items excluded."""

    def retrieve(histories: Sequence[Sequence[int]], k: int) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(histories), chunk):
            part = histories[start : start + chunk]
            out.extend(top_k(retriever.score(part), k, part).tolist())
        return out

    return retrieve


def prior_fn(retriever: Retriever, chunk: int = 1024):
    """(histories, candidate lists) → the retriever's scores of those candidates: the prior the reranker is
    trained against, on the same scale as the scores `tune_fusion` and the evaluation fuse with."""

    def prior(histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for start in range(0, len(histories), chunk):
            scores = retriever.score(histories[start : start + chunk])
            out.extend(
                row[list(cands)] for row, cands in zip(scores, candidates[start : start + chunk], strict=True)
            )
        return out

    return prior


# -- fitting -----------------------------------------------------------------------------------------


def fit_retrievers(
    split: LeaveOneOut, out: Artifacts, sasrec: SASRecConfig, verbose: bool = True
) -> dict[str, float]:
    """Fits every retriever and baseline; returns their training wall times in seconds."""
    from instructrec.retrieval.blend import Blend
    from instructrec.retrieval.cooccurrence import CoOccurrence, ItemKNN
    from instructrec.retrieval.popularity import Popularity
    from instructrec.retrieval.text import TextRetriever

    seconds = {}
    fitted = {}
    for name, make in (
        ("popularity", Popularity),
        ("cooccurrence", CoOccurrence),
        ("itemknn", ItemKNN),
        ("text", TextRetriever),
        ("sasrec", lambda: SASRec(copy.deepcopy(sasrec))),
    ):
        started = time.perf_counter()
        model = make()
        model.fit(split, verbose=verbose) if name == "sasrec" else model.fit(split)
        seconds[name] = time.perf_counter() - started
        model.save(out.retriever(name))
        # the stream maps catalogue ids to the retriever's rows with this
        out.write_item_ids(name, [item.id for item in split.dataset.items])
        fitted[name] = model
    started = time.perf_counter()
    # item-kNN adds on validation what neither sequence model sees (the blend's weights are tuned there)
    parts = ("sasrec", "cooccurrence", "itemknn")
    blend = Blend([fitted[name] for name in parts]).fit(split, fit_components=False)
    seconds["blend"] = time.perf_counter() - started + sum(seconds[name] for name in parts)
    blend.save(out.retriever("blend"))
    out.write_item_ids("blend", [item.id for item in split.dataset.items])
    return seconds


def collaborative_vectors(retriever: Retriever) -> torch.Tensor | None:
    """Item vectors of the retriever, or of the first vector retriever inside a blend."""
    for candidate in [retriever, *getattr(retriever, "components", [])]:
        if hasattr(candidate, "item_vectors"):
            return torch.from_numpy(np.asarray(candidate.item_vectors(), dtype=np.float32))
    return None


def build_reranker(config: PipelineConfig, dataset: Dataset, retriever: Retriever) -> Reranker:
    item_ids = [item.id for item in dataset.items]
    vectors = collaborative_vectors(retriever) if config.collaborative else None
    rconfig = RerankerConfig()
    if config.checkpoint is None:
        model = default_model(
            config.encoder_layers,
            config.decoder_layers,
            rconfig,
            item_ids if vectors is not None else (),
            vectors,
        )
    else:
        base = Reranker.from_pretrained(config.checkpoint)
        model = Reranker(
            base.seq2seq, base.tokenizer, rconfig, item_ids if vectors is not None else (), vectors
        )
        if config.lora:
            model.add_lora(config.checkpoint)
    return model


def fit(
    dataset: Dataset, out: Artifacts, config: PipelineConfig, resume: bool = True, verbose: bool = True
) -> PipelineConfig:
    """Retrievers, then the reranker on the chosen retriever's candidates, then the fusion weight."""
    split = LeaveOneOut(dataset)
    out.root.mkdir(parents=True, exist_ok=True)
    config.seconds.update(fit_retrievers(split, out, config.sasrec, verbose))
    retriever = load_retriever(out.retriever(config.retriever))
    reranker = build_reranker(config, dataset, retriever)
    synthesizer = Synthesizer(dataset, SynthesisConfig(n_candidates=config.k))
    result = train(
        reranker,
        dataset,
        split,
        candidates_fn(retriever),
        synthesizer,
        config.train,
        out.reranker,
        resume=resume,
        prior=prior_fn(retriever),
    )
    config.seconds["reranker"] = result.seconds
    best = Reranker.from_pretrained(out.best_reranker)
    config.fusion_weight = tune_fusion(best, dataset, split, retriever, config.k)
    config.save(out.pipeline)
    return config


def method_seconds(config: PipelineConfig) -> dict[str, float]:
    """Training wall time per reported method (the pipeline counts its retriever and its reranker)."""
    seconds = dict(config.seconds)
    seconds["retriever"] = seconds.get(config.retriever, 0.0)
    seconds["instructrec"] = seconds["retriever"] + seconds.get("reranker", 0.0)
    seconds["reranker_only"] = seconds["instructrec"]
    return seconds


def summary(config: PipelineConfig) -> str:
    # the blend reuses SASRec, co-occurrence and item-kNN, so it is not counted twice
    total = sum(v for k, v in config.seconds.items() if k != "blend")
    return (
        f"retriever: {config.retriever}, K={config.k}, fusion weight {config.fusion_weight}; "
        f"every model trained in {total / 60:.1f} min on this machine"
    )


# -- evaluation --------------------------------------------------------------------------------------


def rerank(
    reranker: Reranker,
    dataset: Dataset,
    split: LeaveOneOut,
    stage: Stage,
    candidates: np.ndarray,
    seed: int = 0,
) -> np.ndarray:
    """Reranker scores [users × K] of each user's candidate row, as a live request would render it."""
    title_of, row_of = item_lookups(reranker, dataset)
    instructions = [
        request_instruction(
            split.history(u, stage), row.tolist(), seed=seed + u, max_history=reranker.config.max_history
        )
        for u, row in enumerate(candidates)
    ]
    scored = score(reranker, instructions, title_of, row_of)
    # back to the candidates' row order (instructions present them shuffled)
    out = np.empty(candidates.shape, dtype=np.float64)
    for u, (ins, s) in enumerate(zip(instructions, scored, strict=True)):
        position = {item: i for i, item in enumerate(ins.candidates)}
        out[u] = [s[position[item]] for item in candidates[u]]
    return out


def rerank_top_k(
    reranker: Reranker,
    dataset: Dataset,
    split: LeaveOneOut,
    stage: Stage,
    retrieval: np.ndarray,
    k: int,
    mask_history: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pipeline on `stage`: from the retriever's catalogue scores [users × items], each user's top-k
    candidates, the reranker's scores of them, and the retriever's own (the two sides `fuse` combines)."""
    candidates = top_k(retrieval, k, split.histories(stage), mask_history=mask_history)
    reranked = rerank(reranker, dataset, split, stage, candidates, seed=seed)
    return candidates, reranked, np.take_along_axis(retrieval, candidates, axis=1)


def tune_fusion(
    reranker: Reranker, dataset: Dataset, split: LeaveOneOut, retriever: Retriever, k: int
) -> float:
    """The fusion weight with the best validation NDCG@10 (0 means the reranker alone)."""
    histories, targets = split.histories("valid"), split.targets("valid")
    retrieval = retriever.score(histories)
    candidates, reranked, first = rerank_top_k(reranker, dataset, split, "valid", retrieval, k)
    best_weight, best = 0.0, -1.0
    for weight in FUSION_GRID:
        fused = fuse(reranked, first, weight)
        ndcg = ranking_metrics(reranked_ranks(retrieval, candidates, fused, targets, histories))["NDCG@10"]
        if ndcg > best:
            best_weight, best = weight, ndcg
    return best_weight


def evaluate(
    dataset: Dataset, out: Artifacts, seed: int = 0, n_negatives: int = 19
) -> dict[str, dict[str, dict]]:
    """Every method under full ranking (history masked, and not) and the sampled protocol, on the test split."""
    split = LeaveOneOut(dataset)
    config = PipelineConfig.load(out.pipeline)
    histories, targets = split.histories("test"), split.targets("test")
    everything = [dataset.sequence(u) for u in range(dataset.n_users)]
    sampled_rows, positions = sample_candidates(targets, everything, dataset.n_items, n_negatives, seed)
    results: dict[str, dict[str, dict]] = {"full": {}, "full_unmasked": {}, "sampled": {}}

    def sampled(scores_of_rows: np.ndarray) -> dict:
        return ranking_metrics(
            sampled_ranks(sampled_rows, positions, histories, lambda u, h, c: scores_of_rows[u])
        )

    retriever_scores = {}
    for name in RETRIEVERS:
        scores = load_retriever(out.retriever(name)).score(histories)
        retriever_scores[name] = scores
        results["full"][name] = evaluate_full(scores, targets, histories)
        results["full_unmasked"][name] = evaluate_full(scores, targets, histories, mask_history=False)
        results["sampled"][name] = sampled(np.take_along_axis(scores, sampled_rows, axis=1))

    reranker = Reranker.from_pretrained(out.best_reranker)
    first = retriever_scores[config.retriever]
    results["full"]["retriever"] = results["full"][config.retriever]
    results["sampled"]["retriever"] = results["sampled"][config.retriever]
    for mask in (True, False):
        candidates, reranked, base = rerank_top_k(
            reranker, dataset, split, "test", first, config.k, mask, seed
        )
        fused = fuse(reranked, base, config.fusion_weight)
        key = "full" if mask else "full_unmasked"
        results[key]["instructrec"] = ranking_metrics(
            reranked_ranks(first, candidates, fused, targets, histories, mask)
        )
        if mask:
            results[key]["reranker_only"] = ranking_metrics(
                reranked_ranks(first, candidates, reranked, targets, histories, mask)
            )
    reranked = rerank(reranker, dataset, split, "test", sampled_rows, seed=seed)
    base = np.take_along_axis(first, sampled_rows, axis=1)
    results["sampled"]["instructrec"] = sampled(fuse(reranked, base, config.fusion_weight))
    results["sampled"]["reranker_only"] = sampled(reranked)
    return results
