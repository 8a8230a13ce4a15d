"""Where a trained pipeline lives on disk: one object names every path, so no caller spells the layout.

    artifacts/<dataset>/
        pipeline.json            which retriever feeds the reranker, K, the fusion weight, the candidate plan's
                                 settings, training wall times
        catalogue.json           the trained items' attributes (`instructrec.catalogue.Catalogue`)
        retrievers/<name>/       every retriever (`load_retriever` reads any of them back)
        retrievers/<name>/item_ids.json   row → catalogue item id (the stream maps ids to rows with it)
        reranker/best/           the reranker checkpoint (what `instructrec export` serves)
        reranker/last/, reranker/trainer.pt   resumable training state

Written by the offline pipeline (`instructrec.experiment`), read by the stream worker, the exporter, the
fine-tune worker and the benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PIPELINE_FILE = "pipeline.json"
CATALOGUE_FILE = "catalogue.json"
# A Triton model version folder holds the saved `Reranker` under this name, beside the backend's model.py.
VERSION_WEIGHTS_DIR = "reranker"
ITEM_IDS_FILE = "item_ids.json"
# Inside a reranker's training folder (`instructrec.model.training.train(out=...)`):
BEST_DIR, LAST_DIR, TRAINER_FILE, TRAINING_FILE = "best", "last", "trainer.pt", "training.json"


@dataclass(frozen=True)
class Artifacts:
    """The artefact folder of one dataset."""

    root: Path

    @classmethod
    def of(cls, base: str | Path, dataset: str) -> Artifacts:
        """`<base>/<dataset>/`: the layout `instructrec train` writes (base: `settings.model.artifacts`)."""
        return cls(Path(base) / dataset)

    @property
    def pipeline(self) -> Path:
        return self.root / PIPELINE_FILE

    @property
    def catalogue(self) -> Path:
        return self.root / CATALOGUE_FILE

    @property
    def retrievers(self) -> Path:
        return self.root / "retrievers"

    def retriever(self, name: str) -> Path:
        return self.retrievers / name

    def item_ids_file(self, retriever: str) -> Path:
        return self.retriever(retriever) / ITEM_IDS_FILE

    @property
    def reranker(self) -> Path:
        """The reranker's training folder (best/, last/, trainer.pt, training.json)."""
        return self.root / "reranker"

    @property
    def best_reranker(self) -> Path:
        return self.reranker / BEST_DIR

    @property
    def trained(self) -> bool:
        return self.pipeline.is_file()

    def pipeline_summary(self) -> dict:
        """pipeline.json as a dict ({} before training): retriever name, fusion weight, K, timings."""
        return json.loads(self.pipeline.read_text()) if self.pipeline.is_file() else {}

    def write_item_ids(self, retriever: str, item_ids: list[str]) -> None:
        self.item_ids_file(retriever).write_text(json.dumps(item_ids))

    def item_ids(self, retriever: str) -> list[str] | None:
        """Row → catalogue item id of a saved retriever; None when it was saved without them."""
        path = self.item_ids_file(retriever)
        return [str(i) for i in json.loads(path.read_text())] if path.is_file() else None
