"""What every retriever looks like, and saving/loading them by kind.

A retriever is fitted on the training part of a split and scores the whole catalogue for a batch of
histories: `score(histories) -> float32 [len(histories), n_items]`, higher is better, history items not
masked (the protocols and the serving layer mask). Vector retrievers also expose `item_vectors()` and
`query_vectors(histories)` with `score == query_vectors @ item_vectors.T`: the streaming layer puts the item
vectors into Qdrant and searches with the query vector under the dot product (`Distance.DOT`).

A retriever's own state grows with items (item-to-item neighbours are capped per item) and its parameters,
never with users × items; callers bound what `score` returns by passing a chunk of histories at a time
(`evaluation.protocols.score_chunks`).

On disk a retriever is a directory holding `config.json` (with its `kind`) and its arrays in
`arrays.safetensors` (or `model.safetensors` for a torch model); `load_retriever` reads any of them back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from instructrec.data.split import LeaveOneOut

Histories = Sequence[Sequence[int]]

# kind -> "module:Class", imported lazily so loading a popularity model never imports torch
KINDS = {
    "popularity": "instructrec.retrieval.popularity:Popularity",
    "cooccurrence": "instructrec.retrieval.cooccurrence:CoOccurrence",
    "itemknn": "instructrec.retrieval.cooccurrence:ItemKNN",
    "sasrec": "instructrec.retrieval.sasrec:SASRec",
    "blend": "instructrec.retrieval.blend:Blend",
    "text": "instructrec.retrieval.text:TextRetriever",
}


@runtime_checkable
class Retriever(Protocol):
    kind: str

    def fit(self, split: LeaveOneOut) -> Retriever: ...

    def score(self, histories: Histories) -> np.ndarray: ...

    def save(self, directory: str | Path) -> None: ...


@runtime_checkable
class VectorRetriever(Retriever, Protocol):
    def item_vectors(self) -> np.ndarray: ...

    def query_vectors(self, histories: Histories) -> np.ndarray: ...


def write_config(directory: str | Path, kind: str, config: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"kind": kind, **config}, indent=2))
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text())


def load_retriever(directory: str | Path) -> Retriever:
    """Load whatever retriever was saved in `directory`."""
    kind = read_config(directory)["kind"]
    module, name = KINDS[kind].split(":")
    return getattr(import_module(module), name).load(directory)
