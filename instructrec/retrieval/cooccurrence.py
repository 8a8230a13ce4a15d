"""Item-to-item retrievers: sequential co-occurrence and item-kNN.

Both keep an item × item matrix `M` and score a history by its last few items, the most recent weighted
most: score(j) = Σ_t decay^t · M[h[-1-t], j] for t < last. They differ in M:
- `CoOccurrence`: M[a, b] counts how often b followed a within `window` steps in a training sequence
  (directed: what people watch *after* a, which is what next-item prediction asks);
- `ItemKNN`: M is the cosine similarity of item columns of the binary user × item training matrix.

The defaults (DESIGN's window 5, last 5, decay 0.6) were within noise of the best of a small validation grid
on ml-latest-small; item-kNN gains most from the decay.

M is dense float32 (items² floats; scoring gathers `last` rows per user, so it costs O(users × last × items)).
On disk only its non-zeros are kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from instructrec.data.split import LeaveOneOut
from instructrec.retrieval.base import Histories, read_config, write_config


class _ItemItem:
    kind = ""

    def __init__(self, last: int = 5, decay: float = 0.6, matrix: np.ndarray | None = None) -> None:
        self.last = last
        self.decay = decay
        self.matrix = matrix

    def fit(self, split: LeaveOneOut):
        self.matrix = self.build(split.train_sequences(), split.dataset.n_items)
        return self

    def fit_sequences(self, sequences: Histories, n_items: int):
        self.matrix = self.build(sequences, n_items)
        return self

    def build(self, sequences: Histories, n_items: int) -> np.ndarray:
        raise NotImplementedError

    def score(self, histories: Histories) -> np.ndarray:
        # each history's last items, most recent first; a short history pads with item 0 at weight 0
        index = np.zeros((len(histories), self.last), dtype=np.int64)
        weight = np.zeros((len(histories), self.last), dtype=np.float32)
        for user, history in enumerate(histories):
            tail = list(history[-self.last :])[::-1]
            index[user, : len(tail)] = tail
            weight[user, : len(tail)] = self.decay ** np.arange(len(tail))
        return np.einsum("ut,utj->uj", weight, self.matrix[index]).astype(np.float32)

    def config(self) -> dict:
        return {"last": self.last, "decay": self.decay}

    def save(self, directory: str | Path) -> None:
        directory = write_config(directory, self.kind, {**self.config(), "n_items": self.matrix.shape[0]})
        rows, cols = np.nonzero(self.matrix)
        arrays = {
            "rows": rows.astype(np.int32),
            "cols": cols.astype(np.int32),
            "values": self.matrix[rows, cols],
        }
        save_file(arrays, str(directory / "arrays.safetensors"))

    @classmethod
    def load(cls, directory: str | Path):
        config = read_config(directory)
        n_items = config.pop("n_items")
        config.pop("kind")
        arrays = load_file(str(Path(directory) / "arrays.safetensors"))
        matrix = np.zeros((n_items, n_items), dtype=np.float32)
        matrix[arrays["rows"], arrays["cols"]] = arrays["values"]
        return cls(**config, matrix=matrix)


class CoOccurrence(_ItemItem):
    kind = "cooccurrence"

    def __init__(
        self, window: int = 5, last: int = 5, decay: float = 0.6, matrix: np.ndarray | None = None
    ) -> None:
        super().__init__(last, decay, matrix)
        self.window = window

    def build(self, sequences: Histories, n_items: int) -> np.ndarray:
        flat = []
        for sequence in sequences:
            s = np.asarray(sequence, dtype=np.int64)
            for offset in range(1, self.window + 1):
                flat.append(s[:-offset] * n_items + s[offset:])  # pair (earlier, later) as one flat index
        counts = (
            np.bincount(np.concatenate(flat), minlength=n_items * n_items)
            if flat
            else np.zeros(n_items * n_items)
        )
        return counts.reshape(n_items, n_items).astype(np.float32)

    def config(self) -> dict:
        return {"window": self.window, **super().config()}


class ItemKNN(_ItemItem):
    kind = "itemknn"

    def __init__(self, last: int = 5, decay: float = 0.6, matrix: np.ndarray | None = None) -> None:
        super().__init__(last, decay, matrix)

    def build(self, sequences: Histories, n_items: int) -> np.ndarray:
        interactions = np.zeros((len(sequences), n_items), dtype=np.float32)
        for user, sequence in enumerate(sequences):
            interactions[user, np.asarray(sequence, dtype=np.int64)] = 1.0
        norms = np.sqrt(interactions.sum(axis=0))
        norms[norms == 0] = 1.0
        similarity = (interactions.T @ interactions) / norms[:, None] / norms[None, :]
        np.fill_diagonal(similarity, 0.0)  # an item is not its own neighbour
        return similarity.astype(np.float32)
