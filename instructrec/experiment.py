"""The offline pipeline end to end: fit the retrievers, tune the candidate plan, instruction-tune the reranker
on the plan's candidates, and evaluate every method under both protocols of DESIGN §5.

Artefacts of one dataset live in one folder, laid out by `instructrec.artifacts.Artifacts`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from instructrec.artifacts import Artifacts
from instructrec.candidates import PlanConfig
from instructrec.catalogue import Catalogue
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
from instructrec.instructions import (
    SynthesisConfig,
    Synthesizer,
    intention_kind,
    request_instruction,
    specific_intention,
    vague_intention,
)
from instructrec.instructions.render import rng_for
from instructrec.model.reranker import Reranker, RerankerConfig, default_model
from instructrec.model.scoring import fuse, score
from instructrec.model.training import EvalSet, TrainConfig, item_lookups, train, validation_set
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
    fusion_weight: float = (
        0.0  # weight of the retriever's log-probabilities added to the reranker's (no text)
    )
    # The same per intention kind ("I0", "I1", "I2"): a request's text changes how far to trust the prior.
    fusion_weights: dict[str, float] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)  # the candidate plan's weights, tuned on validation
    seed: int = 0  # SASRec's and the reranker's
    seconds: dict[str, float] = field(default_factory=dict)  # training wall time per model

    def weight_for(self, text: str | None) -> float:
        """The fusion weight for a request with this text (its intention kind's)."""
        return self.fusion_weights.get(intention_kind(text).value, self.fusion_weight)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> PipelineConfig:
        raw = json.loads(path.read_text())
        raw["train"] = TrainConfig(**raw["train"])
        raw["sasrec"] = SASRecConfig(**raw["sasrec"])
        raw["plan"] = PlanConfig(**raw.get("plan", {}))
        return cls(**raw)


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
    """Retrievers, the catalogue, the candidate plan's weights, then the reranker on the plan's candidates,
    then the fusion weight."""
    from instructrec.planner import OfflinePlanner

    split = LeaveOneOut(dataset)
    out.root.mkdir(parents=True, exist_ok=True)
    config.sasrec.seed = config.train.seed = config.seed
    config.seconds.update(fit_retrievers(split, out, config.sasrec, verbose))
    Catalogue.from_dataset(dataset).save(out.catalogue)
    started = time.perf_counter()
    planner = OfflinePlanner.load(out, dataset, config.retriever)
    config.plan = planner.config = tune_plan(planner, dataset, split, config.k)
    config.seconds["plan"] = time.perf_counter() - started
    retriever = planner.retriever
    reranker = build_reranker(config, dataset, retriever)
    synthesizer = Synthesizer(dataset, SynthesisConfig(n_candidates=config.k))
    valid = validation_set(dataset, split, planner, synthesizer, config.k, "valid")
    result = train(
        reranker, dataset, split, planner, synthesizer, config.train, out.reranker, resume=resume, valid=valid
    )
    config.seconds["reranker"] = result.seconds
    best = Reranker.from_pretrained(out.best_reranker)
    config.fusion_weights = tune_fusion(best, dataset, valid)
    config.fusion_weight = config.fusion_weights.get("I0", 0.0)
    config.save(out.pipeline)
    return config


PLAN_GRID = {"affinity_weight": (0.0, 0.5, 1.0, 2.0, 4.0), "text_weight": (0.0, 0.5, 1.0, 2.0)}


def tune_plan(planner, dataset: Dataset, split: LeaveOneOut, k: int = 20) -> PlanConfig:
    """The plan's weights with the best validation NDCG@10 of its own order, over requests with a text
    (vague and specific, with and without the history), written from the validation items with the training
    phrasings; with no text the plan is the retriever and these weights do not apply."""
    requests = []  # (user, with the history?, text, target)
    for u in range(dataset.n_users):
        target = split.target(u, "valid")
        for i, write in enumerate((vague_intention, specific_intention)):
            wish = write(dataset.items[target], rng_for(u, f"plan:{i}"), nouns=dataset.nouns)
            if wish is not None:
                requests += [(u, True, wish.text, target), (u, False, wish.text, target)]
    if not requests:  # nothing in the catalogue to write a request from (titles only): nothing to tune
        return planner.config
    histories = [[x.item for x in split.history(u, "valid")] for u in range(dataset.n_users)]
    retrieval = planner.retrieval(histories)
    vectors = planner.vectors([text for _, _, text, _ in requests])
    best, best_ndcg = planner.config, -1.0
    for affinity in PLAN_GRID["affinity_weight"]:
        for text_weight in PLAN_GRID["text_weight"]:
            config = replace(planner.config, affinity_weight=affinity, text_weight=text_weight)
            gains = []
            for (u, personal, text, target), vector in zip(requests, vectors, strict=True):
                history = histories[u] if personal else []
                plan, _ = planner.plan_with(
                    history, text, vector, retrieval[u] if personal else None, n=10, config=config
                )
                rows = [c.row for c in plan.candidates]
                gains.append(1.0 / np.log2(rows.index(target) + 2) if target in rows else 0.0)
            ndcg = float(np.mean(gains))
            if ndcg > best_ndcg:
                best, best_ndcg = config, ndcg
    return best


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
    title_of, row_of, text_of = item_lookups(reranker, dataset)
    instructions = [
        request_instruction(
            split.history(u, stage),
            row.tolist(),
            seed=seed + u,
            max_history=reranker.config.max_history,
            nouns=dataset.nouns,
        )
        for u, row in enumerate(candidates)
    ]
    scored = score(reranker, instructions, title_of, row_of, text_of=text_of)
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


def tune_fusion(reranker: Reranker, dataset: Dataset, valid: EvalSet) -> dict[str, float]:
    """Per intention kind of the validation set's requests, the fusion weight with the best validation
    NDCG@10 (0 means the reranker alone)."""
    title_of, row_of, text_of = item_lookups(reranker, dataset)
    scored = score(reranker, valid.instructions, title_of, row_of, text_of=text_of)
    weights: dict[str, float] = {}
    kinds = sorted({ins.combination.intention.value for ins in valid.instructions})
    for kind in kinds:
        best_weight, best = 0.0, -1.0
        for weight in FUSION_GRID:
            gains = []
            for ins, raw, prior, target in zip(
                valid.instructions, scored, valid.priors, valid.targets, strict=True
            ):
                if ins.combination.intention.value != kind:
                    continue
                if target not in ins.candidates:
                    gains.append(0.0)
                    continue
                fused = fuse(raw, prior, weight)
                rank = int((fused > fused[ins.candidates.index(target)]).sum())
                gains.append(1.0 / np.log2(rank + 2) if rank < 10 else 0.0)
            ndcg = float(np.mean(gains))
            if ndcg > best:
                best_weight, best = weight, ndcg
        weights[kind] = best_weight
    return weights


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
