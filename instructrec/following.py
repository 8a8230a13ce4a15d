"""Measuring instruction following: the three settings of the InstructRec paper on the leave-one-out test
users, each method's ranking, and what fraction of it obeys the request.

Settings (`cases`): sequential (history, no text); product search (no history, an intention: cold start);
personalised search with a vague intention, a specific one, or a negative constraint; and hand-written
requests. Synthesised intentions are written from the test item with the *held-out* phrasings
(`vocabulary.Phrasings.heldout`), so no evaluated wording was ever trained on, and each carries the `Ask`
it was written from: the gold standard of compliance and of the filtered-retriever reference.

Methods (`rank`): the collaborative retriever ignoring the text (`retriever`; popularity without a history),
the text retriever on the intention (`text`), the candidate plan (`plan`), the whole pipeline (plan →
reranker → fusion: `instructrec`), and the retriever with the gold ask applied as a hard filter
(`filtered_retriever`: what a perfect request parser would give).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from instructrec.candidates import NO_FILTER, Search
from instructrec.data.dataset import Dataset, Interaction
from instructrec.data.split import LeaveOneOut
from instructrec.instructions import Ask, request_instruction
from instructrec.instructions.render import rng_for
from instructrec.instructions.synthesis import negative_intention, specific_intention, vague_intention
from instructrec.model.reranker import Reranker
from instructrec.model.scoring import fuse, score
from instructrec.model.training import item_lookups, prior_of
from instructrec.planner import OfflinePlanner

SETTINGS = ("sequential", "product_search", "personalized_vague", "personalized_specific", "negative")
METHODS = ("retriever", "text", "plan", "instructrec", "filtered_retriever")
K = 10


@dataclass(frozen=True)
class Case:
    user: int
    history: tuple[Interaction, ...]  # what the model and the plan see (empty: a cold-start request)
    text: str | None
    ask: Ask  # what the request asks (gold)
    target: int

    @property
    def rows(self) -> list[int]:
        return [x.item for x in self.history]


def cases(dataset: Dataset, split: LeaveOneOut, setting: str, pool: str = "heldout") -> list[Case]:
    """One request per test user in `setting` (users the setting cannot be written for are left out)."""
    out = []
    for u in range(dataset.n_users):
        history = tuple(split.history(u, "test"))
        target = split.target(u, "test")
        item = dataset.items[target]
        rng = rng_for(u, f"following:{setting}")
        nouns = dataset.nouns
        if setting == "sequential":
            out.append(Case(u, history, None, Ask(), target))
            continue
        if setting == "product_search":
            write = vague_intention if u % 2 else specific_intention
            wish = write(item, rng, pool=pool, nouns=nouns)
            history = ()
        elif setting == "personalized_vague":
            wish = vague_intention(item, rng, pool=pool, nouns=nouns)
        elif setting == "personalized_specific":
            wish = specific_intention(item, rng, pool=pool, nouns=nouns)
        elif setting == "negative":
            recent = [dataset.items[x.item] for x in history]
            wish = negative_intention(item, recent, rng, pool=pool, nouns=nouns)
        else:
            raise ValueError(f"unknown setting {setting!r}; choose one of {SETTINGS}")
        if wish is not None:
            out.append(Case(u, history, wish.text, wish.ask, target))
    return out


@dataclass(frozen=True)
class Written:
    """A hand-written request and what it asks."""

    text: str
    ask: Ask

    @classmethod
    def parse(cls, raw: dict) -> Written:
        years = raw.get("years") or [None, None]
        ask = Ask(
            frozenset(raw.get("genres", ())),
            frozenset(raw.get("excluded", ())),
            years[0],
            years[1],
            bool(raw.get("any_genre", False)),
        )
        return cls(raw["text"], ask)


def written_cases(split: LeaveOneOut, request: Written, users: Sequence[int]) -> list[Case]:
    return [
        Case(u, tuple(split.history(u, "test")), request.text, request.ask, split.target(u, "test"))
        for u in users
    ]


@dataclass
class Ranking:
    """Each method's top-k catalogue rows per case."""

    top: dict[str, list[list[int]]] = field(default_factory=dict)


def rank(
    cases_: Sequence[Case],
    dataset: Dataset,
    planner: OfflinePlanner,
    reranker: Reranker | None,
    fusion_weight: Callable[[str | None], float],
    k: int = 20,
    methods: Sequence[str] = METHODS,
    progress: Callable[[int], None] | None = None,
) -> Ranking:
    """Every method's top-10 for every case (the pipeline reranks the plan's top-`k`, fused with the prior
    at `fusion_weight(text)`)."""
    ranking = Ranking({m: [] for m in methods})
    catalogue = planner.catalogue
    histories = [c.rows for c in cases_]
    with_history = [i for i, h in enumerate(histories) if h]
    retrieval = dict(zip(with_history, planner.retrieval([histories[i] for i in with_history]), strict=True))
    texts = [c.text for c in cases_ if c.text]
    vectors = dict(zip(texts, planner.vectors(texts), strict=True)) if texts else {}
    plans, priors = [], []
    for i, case in enumerate(cases_):
        consumed = frozenset(catalogue.item_ids[r] for r in case.rows)
        base = replace(NO_FILTER, exclude_ids=consumed)
        collaborative = retrieval.get(i)
        vector = vectors.get(case.text) if case.text else None
        if "retriever" in methods:
            ranking.top["retriever"].append(_top(collaborative, planner.popularity, base.mask(catalogue)))
        if "filtered_retriever" in methods:
            gold = base.with_ask(case.ask).mask(catalogue)
            ranking.top["filtered_retriever"].append(_top(collaborative, planner.popularity, gold))
        if "text" in methods:
            hits = planner.index.search(Search(vector, K, base)) if vector is not None else []
            ranking.top["text"].append([catalogue.rows[h.item_id] for h in hits])
        plan, scores = planner.plan_with(case.rows, case.text, vector, collaborative, n=max(k, K))
        plans.append(plan)
        priors.append(scores)
        if "plan" in methods:
            ranking.top["plan"].append([c.row for c in plan.candidates[:K]])
        if progress is not None:
            progress(1)
    if "instructrec" in methods:
        ranking.top["instructrec"] = _reranked(cases_, dataset, plans, priors, reranker, fusion_weight, k)
    return ranking


def _top(collaborative: np.ndarray | None, popularity: np.ndarray, mask: np.ndarray) -> list[int]:
    scores = np.asarray(
        collaborative if collaborative is not None else np.log1p(popularity), dtype=np.float64
    ).copy()
    scores[~mask] = -np.inf
    order = np.argsort(-scores, kind="stable")[:K]
    return [int(r) for r in order if np.isfinite(scores[r])]


def _reranked(cases_, dataset, plans, priors, reranker, fusion_weight, k) -> list[list[int]]:
    """The plan's top-k reranked and fused with the collaborative prior; the plan's order tops up."""
    title_of, row_of, text_of = item_lookups(reranker, dataset)
    jobs, instructions = [], []
    for i, (case, plan) in enumerate(zip(cases_, plans, strict=True)):
        rows = [c.row for c in plan.candidates[:k] if c.row is not None]
        if len(rows) < 2 or not (case.history or case.text):
            continue
        instructions.append(
            request_instruction(
                list(case.history),
                rows,
                intention=case.text,
                seed=case.user,
                max_history=reranker.config.max_history,
                nouns=dataset.nouns,
            )
        )
        jobs.append(i)
    scored = dict(zip(jobs, score(reranker, instructions, title_of, row_of, text_of=text_of), strict=True))
    by_job = dict(zip(jobs, instructions, strict=True))
    out = []
    for i, plan in enumerate(plans):
        order = [c.row for c in plan.candidates]
        if i in scored:
            ins = by_job[i]
            fused = fuse(scored[i], prior_of(ins.candidates, priors[i]), fusion_weight(cases_[i].text))
            head = [ins.candidates[j] for j in np.argsort(-fused, kind="stable")]
            reranked = set(head)
            order = head + [r for r in order if r not in reranked]
        loose = {c.row for c in plan.candidates if c.relaxed}
        order.sort(key=lambda row: row in loose)  # as served: what satisfies the request first
        out.append(order[:K])
    return out


def metrics(cases_: Sequence[Case], top: Sequence[Sequence[int]], dataset: Dataset) -> dict[str, float]:
    """NDCG@10 and Recall@10 of the target, compliance of the top-10 with the case's ask (mean over cases
    that ask something), and the standard error of NDCG@10."""
    gains, hits, shares = [], [], []
    for case, rows in zip(cases_, top, strict=True):
        rows = list(rows)[:K]
        if case.target in rows:
            position = rows.index(case.target)
            gains.append(1.0 / np.log2(position + 2))
            hits.append(1.0)
        else:
            gains.append(0.0)
            hits.append(0.0)
        if not case.ask.empty and rows:
            items = [dataset.items[r] for r in rows]
            shares.append(sum(case.ask.satisfied_by(i.genres, i.year) for i in items) / len(items))
    n = max(1, len(gains))
    out = {
        "NDCG@10": float(np.mean(gains)) if gains else 0.0,
        "Recall@10": float(np.mean(hits)) if hits else 0.0,
        "NDCG@10_se": float(np.std(gains) / np.sqrt(n)) if gains else 0.0,
        "cases": len(cases_),
    }
    if shares:
        out["compliance"] = float(np.mean(shares))
    return out
