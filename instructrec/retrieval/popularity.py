"""Most popular first: the same list for everybody, counted over training interactions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from instructrec.data.split import LeaveOneOut
from instructrec.retrieval.base import Histories, read_config, write_config


class Popularity:
    kind = "popularity"

    def __init__(self, counts: np.ndarray | None = None) -> None:
        self.counts = counts

    def fit(self, split: LeaveOneOut) -> Popularity:
        return self.fit_sequences(split.train_sequences(), split.dataset.n_items)

    def fit_sequences(self, sequences: Histories, n_items: int) -> Popularity:
        counts = np.zeros(n_items, dtype=np.float32)
        for sequence in sequences:
            np.add.at(counts, np.asarray(sequence, dtype=np.int64), 1.0)
        self.counts = counts
        return self

    def score(self, histories: Histories) -> np.ndarray:
        return np.tile(self.counts, (len(histories), 1))

    def save(self, directory: str | Path) -> None:
        directory = write_config(directory, self.kind, {"n_items": len(self.counts)})
        save_file({"counts": self.counts}, str(directory / "arrays.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> Popularity:
        read_config(directory)
        return cls(load_file(str(Path(directory) / "arrays.safetensors"))["counts"])
