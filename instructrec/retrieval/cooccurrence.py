"""Item-to-item retrievers: sequential co-occurrence and item-kNN.

Both keep an item × item matrix `M` and score a history by its last few items, the most recent weighted
most: score(j) = Σ_t decay^t · M[h[-1-t], j] for t < last. They differ in M:
- `CoOccurrence`: M[a, b] counts how often b followed a within `window` steps in a training sequence
  (directed: what people watch *after* a, which is what next-item prediction asks);
- `ItemKNN`: M is the cosine similarity of item columns of the binary user × item training matrix.

The defaults (DESIGN's window 5, last 5, decay 0.6) were within noise of the best of a small validation grid
on ml-latest-small; item-kNN gains most from the decay.

M is sparse (scipy CSR, float32) and keeps, per item, only its `neighbours` largest entries (ties: lower item
index first; None keeps every one), so it grows with items × neighbours, not items². It is built a block of
item rows at a time as a sparse product (`left[rows] @ right`), each block cut to its neighbours before the
next, with blocks sized by the multiply-adds they cost: no dense items × items (nor users × items) matrix
ever exists. A history is a sparse row of its weighted last items, so scoring costs one sparse product.
The cap is off by default (None: the uncut sparse matrix equals the earlier dense one exactly), because it
costs item-kNN on ml-latest-small (610 users): 200 neighbours against the uncut matrix, validation / test
NDCG@10, co-occurrence .0837 / .0735 against .0849 / .0730, item-kNN .0728 / .0629 against .0739 / .0645
(test Recall@10 .1082 against .1213); no item-kNN cap from 50 to 1000 came closer on validation than 200.
A large catalogue passes one (`experiment.fit_retrievers(neighbours=...)`; benchmarks/scale.py: `NEIGHBOURS`).

On disk M is its non-zeros (rows, cols, values), the format of the earlier dense matrix, which therefore
loads as it is (uncut: its config has no `neighbours`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from scipy import sparse

from instructrec.data.split import LeaveOneOut
from instructrec.retrieval.base import Histories, read_config, write_config

NEIGHBOURS = 200  # the cap for large catalogues (module docstring)
BLOCK_PRODUCTS = 4_000_000  # multiply-adds per block of item rows: bounds a block's unpruned entries


class _ItemItem:
    kind = ""

    def __init__(
        self,
        last: int = 5,
        decay: float = 0.6,
        neighbours: int | None = None,
        matrix: sparse.csr_array | None = None,
    ) -> None:
        self.last = last
        self.decay = decay
        self.neighbours = neighbours
        self.matrix = matrix

    def fit(self, split: LeaveOneOut):
        return self.fit_sequences(split.train_sequences(), split.dataset.n_items)

    def fit_sequences(self, sequences: Histories, n_items: int):
        self.matrix = self.build(sequences, n_items)
        return self

    def build(self, sequences: Histories, n_items: int) -> sparse.csr_array:
        raise NotImplementedError

    def score(self, histories: Histories) -> np.ndarray:
        rows, cols, weights = [], [], []
        for user, history in enumerate(histories):
            tail = np.asarray(history[-self.last :], dtype=np.int64)[::-1]  # most recent first
            rows.append(np.full(len(tail), user))
            cols.append(tail)
            weights.append(self.decay ** np.arange(len(tail)))
        n_items = self.matrix.shape[0]
        # a repeated item adds up its weights, as the sum over the tail does
        queries = _csr(_concat(weights, np.float32), _concat(rows), _concat(cols), (len(histories), n_items))
        return (queries @ self.matrix).toarray()

    def config(self) -> dict:
        return {"last": self.last, "decay": self.decay, "neighbours": self.neighbours}

    def save(self, directory: str | Path) -> None:
        directory = write_config(directory, self.kind, {**self.config(), "n_items": self.matrix.shape[0]})
        matrix = self.matrix.tocoo()
        arrays = {
            "rows": matrix.row.astype(np.int32),
            "cols": matrix.col.astype(np.int32),
            "values": matrix.data.astype(np.float32),
        }
        save_file(arrays, str(directory / "arrays.safetensors"))

    @classmethod
    def load(cls, directory: str | Path):
        config = read_config(directory)
        n_items = config.pop("n_items")
        config.pop("kind")
        config.setdefault("neighbours", None)  # saved before the cut: every non-zero was kept
        arrays = load_file(str(Path(directory) / "arrays.safetensors"))
        matrix = _csr(arrays["values"], arrays["rows"], arrays["cols"], (n_items, n_items))
        return cls(**config, matrix=matrix)


class CoOccurrence(_ItemItem):
    kind = "cooccurrence"

    def __init__(
        self,
        window: int = 5,
        last: int = 5,
        decay: float = 0.6,
        neighbours: int | None = None,
        matrix: sparse.csr_array | None = None,
    ) -> None:
        super().__init__(last, decay, neighbours, matrix)
        self.window = window

    def build(self, sequences: Histories, n_items: int) -> sparse.csr_array:
        # Over all positions p of all sequences: left[a, p] = 1 where item(p) = a, right[p, b] counts the
        # offsets 1..window at which b follows p in its own sequence; so (left @ right)[a, b] counts pairs.
        lengths = [len(s) for s in sequences]
        items = _concat([np.asarray(s, dtype=np.int64) for s in sequences])
        ends = np.repeat(np.cumsum(lengths), lengths)  # where each position's sequence ends
        positions = np.arange(len(items))
        left = _csr(np.ones(len(items)), items, positions, (n_items, len(items)))
        rows, cols = [], []
        for offset in range(1, self.window + 1):
            follows = positions + offset < ends
            rows.append(positions[follows])
            cols.append(items[positions[follows] + offset])
        right = _csr(np.ones(sum(len(r) for r in rows)), _concat(rows), _concat(cols), (len(items), n_items))
        return item_item(left, right, self.neighbours)

    def config(self) -> dict:
        return {"window": self.window, **super().config()}


class ItemKNN(_ItemItem):
    kind = "itemknn"

    def build(self, sequences: Histories, n_items: int) -> sparse.csr_array:
        users = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
        items = _concat([np.asarray(s, dtype=np.int64) for s in sequences])
        interactions = _csr(np.ones(len(users)), users, items, (len(sequences), n_items))
        interactions.data[:] = 1.0  # binary: a re-watch is still one user
        norms = np.sqrt(np.asarray(interactions.sum(axis=0), dtype=np.float32).ravel())
        norms[norms == 0] = 1.0
        return item_item(interactions.T.tocsr(), interactions, self.neighbours, partial(_cosine, norms))


def _cosine(norms: np.ndarray, block: sparse.csr_array, rows: slice) -> sparse.csr_array:
    """Co-counts over both items' norms (divided in the order the dense version did), without the diagonal."""
    block_rows = np.repeat(np.arange(rows.start, rows.stop), np.diff(block.indptr))
    block.data = block.data / norms[block_rows] / norms[block.indices]
    block.data[block.indices == block_rows] = 0.0  # an item is not its own neighbour
    block.eliminate_zeros()
    return block


# ---------------------------------------------------------------------------------------------------------
# sparse helpers


def item_item(
    left: sparse.csr_array,
    right: sparse.csr_array,
    neighbours: int | None,
    finish: Callable[[sparse.csr_array, slice], sparse.csr_array] | None = None,
    budget: int = BLOCK_PRODUCTS,
) -> sparse.csr_array:
    """M = left @ right (each block of rows through `finish`, if any) cut to each row's `neighbours` largest
    entries, a block of rows (`budget` multiply-adds) at a time."""
    blocks = []
    for rows in row_blocks(left, right, budget):
        block = sparse.csr_array(left[rows] @ right)
        blocks.append(top_per_row(finish(block, rows) if finish else block, neighbours))
    if not blocks:
        return sparse.csr_array((left.shape[0], right.shape[1]), dtype=np.float32)
    return sparse.csr_array(sparse.vstack(blocks, format="csr"), dtype=np.float32)


def row_blocks(left: sparse.csr_array, right: sparse.csr_array, budget: int = BLOCK_PRODUCTS) -> list[slice]:
    """Consecutive row ranges of `left @ right` costing about `budget` multiply-adds each (at least one row)."""
    # a row of the product adds up one row of `right` per entry of its row of `left`
    entry_rows = np.repeat(np.arange(left.shape[0]), np.diff(left.indptr))
    cost = np.bincount(entry_rows, weights=np.diff(right.indptr)[left.indices], minlength=left.shape[0])
    cumulative = np.cumsum(cost)
    blocks, start = [], 0
    while start < left.shape[0]:
        base = cumulative[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cumulative, base + budget, side="right")))
        blocks.append(slice(start, min(stop, left.shape[0])))
        start = blocks[-1].stop
    return blocks


def top_per_row(matrix: sparse.csr_array, k: int | None) -> sparse.csr_array:
    """Each row's `k` largest entries (ties: lower column first); None keeps them all."""
    counts = np.diff(matrix.indptr)
    if k is None or counts.max(initial=0) <= k:
        return matrix
    rows = np.repeat(np.arange(matrix.shape[0]), counts)
    order = np.lexsort((matrix.indices, -matrix.data, rows))  # row, then value descending, then column
    rank = np.arange(len(order)) - np.repeat(matrix.indptr[:-1], counts)  # position within its row
    kept = np.sort(order[rank < k])  # back to the stored (row-major) order
    return _csr(matrix.data[kept], rows[kept], matrix.indices[kept], matrix.shape)


def _csr(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sparse.csr_array:
    """A float32 CSR array from coordinates (duplicates summed)."""
    return sparse.csr_array(
        (np.asarray(values, dtype=np.float32), (np.asarray(rows), np.asarray(cols))), shape=shape
    )


def _concat(parts: list[np.ndarray], dtype=np.int64) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
