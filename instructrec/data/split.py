"""Leave-one-out split: per user the last item is the test target, the second-last the validation target,
and everything before them is training data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from instructrec.data.dataset import Dataset, Interaction

Stage = Literal["valid", "test"]


@dataclass(frozen=True, slots=True)
class LeaveOneOut:
    dataset: Dataset

    def __post_init__(self) -> None:
        short = [u for u, h in enumerate(self.dataset.histories) if len(h) < 3]
        if short:
            raise ValueError(f"{len(short)} users have fewer than 3 interactions; filter the dataset first")

    def train(self, user: int) -> list[Interaction]:
        """The interactions a model may learn from for this user."""
        return self.dataset.histories[user][:-2]

    def history(self, user: int, stage: Stage) -> list[Interaction]:
        """What the model sees when predicting `stage`'s target (validation items are history at test time)."""
        return self.dataset.histories[user][: -2 if stage == "valid" else -1]

    def target(self, user: int, stage: Stage) -> int:
        return self.dataset.histories[user][-2 if stage == "valid" else -1].item

    def train_sequences(self) -> list[list[int]]:
        return [[x.item for x in self.train(u)] for u in range(self.dataset.n_users)]

    def histories(self, stage: Stage) -> list[list[int]]:
        return [[x.item for x in self.history(u, stage)] for u in range(self.dataset.n_users)]

    def targets(self, stage: Stage) -> list[int]:
        return [self.target(u, stage) for u in range(self.dataset.n_users)]
