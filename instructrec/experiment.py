"""The offline pipeline end to end: fit the retrievers, tune the candidate plan, instruction-tune the reranker
on the plan's candidates, and evaluate every method under both protocols of DESIGN §5.

Catalogue scores are only ever held for a chunk of users (`evaluation.protocols.score_chunks`): evaluation
keeps per-user ranks, sampled candidates' scores and top-k lists, so memory grows with users + items, not
users × items.

Artefacts of one dataset live in one folder, laid out by `instructrec.artifacts.Artifacts`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from instructrec.artifacts import Artifacts
from instructrec.candidates import PlanConfig
from instructrec.catalogue import Catalogue
from instructrec.data.dataset import Dataset
from instructrec.data.split import LeaveOneOut, Stage
from instructrec.evaluation.metrics import KS, RECALL_KS, ranking_metrics
from instructrec.evaluation.protocols import (
    per_user,
    ranks_in,
    reranked_from_ranks,
    retriever_rows,
    sample_candidates,
    sampled_ranks,
    score_chunks,
    scores_at,
    top_in,
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
FITTED = ("popularity", "cooccurrence", "itemknn", "text", "sasrec")  # fitted alone; the blend reuses three


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
    split: LeaveOneOut,
    out: Artifacts,
    sasrec: SASRecConfig,
    verbose: bool = True,
    names: tuple[str, ...] = FITTED,
    neighbours: int | None = None,
) -> dict[str, float]:
    """Fits the named retrievers and baselines (the blend's parts must be among them), then the blend;
    returns their training wall times in seconds. `neighbours`: the item-item retrievers' cap per item
    (None: uncut, see `retrieval.cooccurrence`)."""
    from instructrec.retrieval.blend import Blend
    from instructrec.retrieval.cooccurrence import CoOccurrence, ItemKNN
    from instructrec.retrieval.popularity import Popularity
    from instructrec.retrieval.text import TextRetriever

    makers = {
        "popularity": Popularity,
        "cooccurrence": lambda: CoOccurrence(neighbours=neighbours),
        "itemknn": lambda: ItemKNN(neighbours=neighbours),
        "text": TextRetriever,
        "sasrec": lambda: SASRec(copy.deepcopy(sasrec)),
    }
    seconds = {}
    fitted = {}
    for name in names:
        make = makers[name]
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


def tune_plan(
    planner, dataset: Dataset, split: LeaveOneOut, k: int = 20, chunk: int | None = None
) -> PlanConfig:
    """The plan's weights with the best validation NDCG@10 of its own order, over requests with a text
    (vague and specific, with and without the history), written from the validation items with the training
    phrasings; with no text the plan is the retriever and these weights do not apply. The retriever scores
    a chunk of users at a time."""
    requests = []  # (user, with the history?, text, target), in user order
    for u in range(dataset.n_users):
        target = split.target(u, "valid")
        for i, write in enumerate((vague_intention, specific_intention)):
            wish = write(dataset.items[target], rng_for(u, f"plan:{i}"), nouns=dataset.nouns)
            if wish is not None:
                requests += [(u, True, wish.text, target), (u, False, wish.text, target)]
    if not requests:  # nothing in the catalogue to write a request from (titles only): nothing to tune
        return planner.config
    histories = [[x.item for x in split.history(u, "valid")] for u in range(dataset.n_users)]
    vectors = planner.vectors([text for _, _, text, _ in requests])
    configs = [
        replace(planner.config, affinity_weight=affinity, text_weight=text_weight)
        for affinity in PLAN_GRID["affinity_weight"]
        for text_weight in PLAN_GRID["text_weight"]
    ]
    gains: list[list[float]] = [[] for _ in configs]  # per config, in request order
    users = np.array([u for u, _, _, _ in requests])
    for rows, retrieval in score_chunks(
        lambda rows: planner.retrieval(histories[rows]), dataset.n_users, chunk
    ):
        for r in range(*np.searchsorted(users, [rows.start, rows.stop])):
            u, personal, text, target = requests[r]
            history = histories[u] if personal else []
            scores = retrieval[u - rows.start] if personal else None
            for config, config_gains in zip(configs, gains, strict=True):
                config_gains.append(_plan_gain(planner, history, text, vectors[r], scores, target, config))
    best, best_ndcg = planner.config, -1.0
    for config, config_gains in zip(configs, gains, strict=True):
        ndcg = float(np.mean(config_gains))
        if ndcg > best_ndcg:
            best, best_ndcg = config, ndcg
    return best


def _plan_gain(planner, history, text, vector, retrieval, target: int, config: PlanConfig) -> float:
    """The NDCG@10 gain of the target in the plan's order (0 when the plan leaves it out)."""
    plan, _ = planner.plan_with(history, text, vector, retrieval, n=10, config=config)
    rows = [c.row for c in plan.candidates]
    return 1.0 / np.log2(rows.index(target) + 2) if target in rows else 0.0


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


class HeldOut(NamedTuple):
    """The test split, and each user's sampled candidates (the target and `n_negatives` shuffled)."""

    split: LeaveOneOut
    histories: list[list[int]]
    targets: list[int]
    sampled_rows: np.ndarray  # [users × (1 + n_negatives)] item rows
    positions: np.ndarray  # the target's position in each


def held_out(dataset: Dataset, seed: int = 0, n_negatives: int = 19) -> HeldOut:
    split = LeaveOneOut(dataset)
    histories, targets = split.histories("test"), split.targets("test")
    everything = [dataset.sequence(u) for u in range(dataset.n_users)]
    rows, positions = sample_candidates(targets, everything, dataset.n_items, n_negatives, seed)
    return HeldOut(split, histories, targets, rows, positions)


def retriever_pass(
    retriever: Retriever,
    histories: list[list[int]],
    targets: list[int],
    sampled_rows: np.ndarray,
    k: int | None = None,
    chunk: int | None = None,
) -> dict:
    """What evaluation keeps of one retriever, per test user, from one scoring pass a chunk at a time: the
    target's rank with the history masked ("masked") and not ("unmasked"), the sampled candidates' scores
    ("sampled"), and with `k` the top-k candidates and their scores, masked ("top") and not ("top_unmasked")."""
    reducers = {
        "masked": ranks_in(targets, histories),
        "unmasked": ranks_in(targets, histories, mask_history=False),
        "sampled": scores_at(sampled_rows),
    }
    if k is not None:
        reducers["top"] = top_in(k, histories)
        reducers["top_unmasked"] = top_in(k, histories, mask_history=False)
    return per_user(retriever_rows(retriever, histories), len(targets), reducers, chunk)


def evaluate_retrievers(
    dataset: Dataset,
    out: Artifacts,
    names: tuple[str, ...] = RETRIEVERS,
    seed: int = 0,
    n_negatives: int = 19,
    chunk: int | None = None,
) -> dict[str, dict[str, dict]]:
    """The named retrievers under full ranking (history masked, and not) and the sampled protocol, on the
    test split."""
    return _retriever_results(out, names, held_out(dataset, seed, n_negatives), chunk)


def _retriever_results(
    out: Artifacts, names: tuple[str, ...], held: HeldOut, chunk: int | None
) -> dict[str, dict[str, dict]]:
    results: dict[str, dict[str, dict]] = {"full": {}, "full_unmasked": {}, "sampled": {}}
    for name in names:
        retriever = load_retriever(out.retriever(name))
        kept = retriever_pass(retriever, held.histories, held.targets, held.sampled_rows, chunk=chunk)
        results["full"][name] = ranking_metrics(kept["masked"], KS, RECALL_KS)
        results["full_unmasked"][name] = ranking_metrics(kept["unmasked"], KS, RECALL_KS)
        results["sampled"][name] = _sampled_metrics(held, kept["sampled"])
    return results


def _sampled_metrics(held: HeldOut, scores_of_rows: np.ndarray) -> dict[str, float]:
    """Sampled-protocol metrics from each user's scores of its sampled candidates."""
    scorer = lambda u, h, c: scores_of_rows[u]  # noqa: E731
    return ranking_metrics(sampled_ranks(held.sampled_rows, held.positions, held.histories, scorer))


def evaluate(
    dataset: Dataset, out: Artifacts, seed: int = 0, n_negatives: int = 19, chunk: int | None = None
) -> dict[str, dict[str, dict]]:
    """Every method under full ranking (history masked, and not) and the sampled protocol, on the test split."""
    config = PipelineConfig.load(out.pipeline)
    held = held_out(dataset, seed, n_negatives)
    results = _retriever_results(out, RETRIEVERS, held, chunk)
    retriever = load_retriever(out.retriever(config.retriever))
    # the pipeline's retriever again, now keeping its top-k: one more pass, never its whole matrix
    first = retriever_pass(retriever, held.histories, held.targets, held.sampled_rows, config.k, chunk)
    reranker = Reranker.from_pretrained(out.best_reranker)
    results["full"]["retriever"] = results["full"][config.retriever]
    results["sampled"]["retriever"] = results["sampled"][config.retriever]
    for mask, key in ((True, "full"), (False, "full_unmasked")):
        candidates, base = first["top" if mask else "top_unmasked"]
        retriever_ranks = first["masked" if mask else "unmasked"]
        reranked = rerank(reranker, dataset, held.split, "test", candidates, seed=seed)
        fused = fuse(reranked, base, config.fusion_weight)
        results[key]["instructrec"] = ranking_metrics(
            reranked_from_ranks(retriever_ranks, candidates, fused, held.targets)
        )
        if mask:
            results[key]["reranker_only"] = ranking_metrics(
                reranked_from_ranks(retriever_ranks, candidates, reranked, held.targets)
            )
    reranked = rerank(reranker, dataset, held.split, "test", held.sampled_rows, seed=seed)
    fused = fuse(reranked, first["sampled"], config.fusion_weight)
    results["sampled"]["instructrec"] = _sampled_metrics(held, fused)
    results["sampled"]["reranker_only"] = _sampled_metrics(held, reranked)
    return results
