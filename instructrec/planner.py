"""The candidate plan over a trained pipeline, in-process: what evaluation, training and the fine-tune worker
call. It composes `instructrec.candidates` exactly as the stream does, with the search run over the same item
text vectors in numpy instead of Qdrant.

    planner = OfflinePlanner.load(artifacts, dataset)           # retriever, popularity, text vectors, catalogue
    plan = planner.plan(history_rows, "a 1990s crime film", n=20)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from instructrec.artifacts import Artifacts
from instructrec.candidates import (
    NO_FILTER,
    CandidateFilter,
    GenreAffinity,
    Plan,
    PlanConfig,
    PlanRequest,
    TextIndex,
    collaborative_scores,
    merge,
    prepare,
)
from instructrec.catalogue import Catalogue
from instructrec.data.dataset import Dataset
from instructrec.model.training import PlanQuery
from instructrec.retrieval.base import Retriever, load_retriever
from instructrec.retrieval.popularity import Popularity
from instructrec.retrieval.text import TextRetriever


@dataclass
class OfflinePlanner:
    catalogue: Catalogue
    retriever: Retriever
    popularity: np.ndarray  # interaction counts per catalogue row
    text: TextRetriever  # item text vectors and the sentence encoder
    config: PlanConfig = field(default_factory=PlanConfig)
    chunk: int = 256
    index: TextIndex = field(init=False)
    affinity: GenreAffinity = field(init=False)
    _vectors: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = TextIndex(self.catalogue, self.text.item_vectors())
        self.affinity = GenreAffinity.build(self.text.encoder.encode, self.catalogue)

    @classmethod
    def load(
        cls,
        artifacts: Artifacts,
        dataset: Dataset | None = None,
        retriever: str | None = None,
        config: PlanConfig | None = None,
    ) -> OfflinePlanner:
        """From a trained pipeline's artefacts (`retriever`: which one is collaborative; default the pipeline's).
        The catalogue is the artefacts' own; `dataset` stands in for it only in pipelines trained before it."""
        name = retriever or artifacts.pipeline_summary().get("retriever", "blend")
        if artifacts.catalogue.is_file():
            catalogue = Catalogue.load(artifacts.catalogue)
        elif dataset is not None:
            catalogue = Catalogue.from_dataset(dataset)
        else:
            raise FileNotFoundError(f"{artifacts.catalogue} is missing: retrain, or pass the dataset")
        text = load_retriever(artifacts.retriever("text"))
        popularity = load_retriever(artifacts.retriever("popularity"))
        assert isinstance(text, TextRetriever) and isinstance(popularity, Popularity)
        return cls(
            catalogue,
            load_retriever(artifacts.retriever(name)),
            np.asarray(popularity.counts),
            text,
            config or PlanConfig(),
        )

    # -- text vectors, remembered (phrasings repeat across epochs and users)

    def vectors(self, texts: Sequence[str]) -> list[np.ndarray]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            for text, vector in zip(missing, self.text.encoder.encode(missing), strict=True):
                self._vectors[text] = np.asarray(vector, dtype=np.float32)
        return [self._vectors[t] for t in texts]

    # -- planning

    def plan(
        self,
        history: Sequence[int],
        text: str | None = None,
        *,
        n: int = 20,
        flt: CandidateFilter = NO_FILTER,
        retrieval: np.ndarray | None = None,
        config: PlanConfig | None = None,
    ) -> Plan:
        """One request's plan (`history`: catalogue rows, most recent last; its items are left out)."""
        scores = (
            retrieval if retrieval is not None else (self.retrieval([history])[0] if len(history) else None)
        )
        vector = self.vectors([text])[0] if text else None
        return self.plan_with(history, text, vector, scores, n=n, flt=flt, config=config)[0]

    def plan_with(
        self,
        history: Sequence[int],
        text: str | None,
        vector: np.ndarray | None,
        retrieval: np.ndarray | None,
        *,
        n: int,
        flt: CandidateFilter = NO_FILTER,
        config: PlanConfig | None = None,
    ) -> tuple[Plan, np.ndarray | None]:
        """The plan, and every catalogue item's collaborative score under its filter (-inf where excluded):
        training takes its priors from it."""
        config = config or self.config
        consumed = frozenset(self.catalogue.item_ids[r] for r in history)
        request = PlanRequest(history, text, replace(flt, exclude_ids=flt.exclude_ids | consumed), n)
        prepared = prepare(request, self.catalogue, config)
        leaning = self.affinity.of_items(vector, self.catalogue) if vector is not None else None
        scores, source = collaborative_scores(
            prepared,
            self.catalogue,
            retrieval=retrieval,
            popularity=self.popularity,
            affinity=leaning,
            config=config,
        )
        search = prepared.search(vector, config)
        hits = self.index.search(search) if search is not None else []
        return merge(
            prepared, self.catalogue, collaborative=scores, source=source, hits=hits, config=config
        ), scores

    def retrieval(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """The collaborative retriever's scores of the whole catalogue per history, in chunks."""
        out = []
        for start in range(0, len(histories), self.chunk):
            out.append(
                np.asarray(self.retriever.score(histories[start : start + self.chunk]), dtype=np.float32)
            )
        return np.concatenate(out) if out else np.zeros((0, len(self.catalogue)), dtype=np.float32)

    def __call__(self, queries: Sequence[PlanQuery], k: int) -> list[tuple[list[int], np.ndarray | None]]:
        """The `training.Planner` protocol: each query's top-k candidate rows and collaborative scores."""
        with_history = [i for i, q in enumerate(queries) if len(q.history)]
        retrieval = dict(
            zip(with_history, self.retrieval([queries[i].history for i in with_history]), strict=True)
        )
        texts = [q.text for q in queries if q.text]
        vectors = dict(zip(texts, self.vectors(texts), strict=True)) if texts else {}
        out = []
        for i, query in enumerate(queries):
            plan, scores = self.plan_with(
                query.history,
                query.text,
                vectors.get(query.text) if query.text else None,
                retrieval.get(i),
                n=k,
            )
            out.append(([c.row for c in plan.candidates if c.row is not None], scores))
        return out
