"""Evaluation protocols: full ranking, reranked full ranking and sampled candidates (DESIGN §5).

Everything works on plain arrays: a score matrix [users × items] from a retriever, each user's history (the
item indices the model saw) and each user's target. A protocol turns them into the 0-based rank of every
target; `metrics.ranking_metrics` turns ranks into numbers.

Ties. The rank of a target is the number of items ordered before it. Items scoring strictly higher always
come first; among equal scores `ties="index"` (the default) puts lower item indices first, which is exactly
the order `np.argsort(-scores, kind="stable")` serves, so the evaluated rank is the served position.
`ties="pessimistic"` puts every equal-scoring item before the target instead, so a model that cannot
separate items (e.g. all zeros) gets no credit for the luck of the index order. The sampled protocol
defaults to pessimistic: its candidates are shuffled, so their order means nothing.

Masking. With `mask_history=True` the items in the user's history score -inf (LlamaRec's protocol: a
re-watch is never recommended); the target itself is never masked, even if the user consumed it before.

Chunks. Every protocol works row by row, so a [users × items] matrix never has to exist whole: `score_chunks`
scores users a chunk at a time (~`CHUNK_BYTES` of float32 each) and the `chunked_*` functions keep only
per-user results (ranks, top-k). Their results equal the whole-matrix functions' exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np

from instructrec.evaluation.metrics import KS, RECALL_KS, ranking_metrics

Ties = Literal["index", "pessimistic"]
# (user, history, candidates) -> one score per candidate, higher is better
CandidateScorer = Callable[[int, Sequence[int], np.ndarray], np.ndarray]
# users (a slice of the evaluated list) -> their scores of the whole catalogue, float32 [len × items]
RowScorer = Callable[[slice], np.ndarray]

CHUNK_BYTES = 32 * 2**20  # one chunk's score matrix: tens of MB, whatever the catalogue
FIRST_CHUNK = 16  # users scored before the catalogue's width is known


def mask_scores(
    scores: np.ndarray, histories: Sequence[Sequence[int]], keep: Sequence[int] | None = None
) -> np.ndarray:
    """A float32 copy of `scores` with every user's history items set to -inf (except `keep[user]`)."""
    masked = np.array(scores, dtype=np.float32, copy=True)
    for user, history in enumerate(histories):
        if len(history):
            masked[user, np.asarray(history, dtype=np.int64)] = -np.inf
        if keep is not None:
            masked[user, keep[user]] = scores[user, keep[user]]
    return masked


# ---------------------------------------------------------------------------------------------------------
# (a) full ranking


def target_ranks(
    scores: np.ndarray,
    targets: Sequence[int],
    histories: Sequence[Sequence[int]] | None = None,
    mask_history: bool = True,
    ties: Ties = "index",
) -> np.ndarray:
    """The 0-based rank of each user's target among all items (see the module docstring for ties/masking)."""
    scores = np.asarray(scores, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    if mask_history:
        if histories is None:
            raise ValueError("mask_history=True needs the histories")
        scores = mask_scores(scores, histories, keep=targets)
    rows = np.arange(len(targets))
    target_score = scores[rows, targets][:, None]
    higher = (scores > target_score).sum(axis=1)
    equal = scores == target_score
    if ties == "index":
        before = np.arange(scores.shape[1])[None, :] < targets[:, None]
        tied_before = (equal & before).sum(axis=1)
    else:
        tied_before = equal.sum(axis=1) - 1  # every equal item but the target itself
    return (higher + tied_before).astype(np.int64)


def evaluate_full(
    scores: np.ndarray,
    targets: Sequence[int],
    histories: Sequence[Sequence[int]],
    mask_history: bool = True,
    ties: Ties = "index",
    ks: Sequence[int] = KS,
    recall_ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Full-ranking metrics of a score matrix (Recall@20/@50 included by default: they bound a reranker)."""
    return ranking_metrics(target_ranks(scores, targets, histories, mask_history, ties), ks, recall_ks)


def chunked_ranks(
    score_rows: RowScorer,
    targets: Sequence[int],
    histories: Sequence[Sequence[int]] | None = None,
    mask_history: bool = True,
    ties: Ties = "index",
    chunk: int | None = None,
) -> np.ndarray:
    """`target_ranks` of the scores `score_rows` gives, computed a chunk of users at a time."""
    reducer = ranks_in(targets, histories, mask_history, ties)
    return per_user(score_rows, len(targets), {"ranks": reducer}, chunk)["ranks"]


# ---------------------------------------------------------------------------------------------------------
# per-user results a chunk at a time


def chunk_users(n_items: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Users per chunk so that a chunk's float32 [users × items] matrix stays within `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * max(1, n_items)))


def score_chunks(
    score_rows: RowScorer, n_users: int, chunk: int | None = None
) -> Iterator[tuple[slice, np.ndarray]]:
    """(users, their float32 scores) a chunk at a time, in user order.

    Without `chunk` the first chunk is small and its width (the catalogue size) sizes the rest by
    `chunk_users`, so callers need not know the catalogue.
    """
    size, start = chunk or FIRST_CHUNK, 0
    while start < n_users:
        rows = slice(start, min(start + size, n_users))
        scores = np.asarray(score_rows(rows), dtype=np.float32)
        yield rows, scores
        start, size = rows.stop, chunk or chunk_users(scores.shape[1])


def sample_users(n_users: int, cap: int | None, seed: int = 0) -> np.ndarray:
    """All users in order, or a seeded sample of `cap` of them (in user order) when there are more: what
    validation needs to compare models is a fixed, large enough set, not every user of a large catalogue."""
    if cap is None or n_users <= cap:
        return np.arange(n_users)
    return np.sort(np.random.default_rng(seed).choice(n_users, size=cap, replace=False))


def retriever_rows(retriever, histories: Sequence[Sequence[int]]) -> RowScorer:
    """A `RowScorer` over `histories` from anything with `score(histories)` (every retriever)."""
    return lambda rows: retriever.score(histories[rows])


# (a chunk's scores, its users) -> an array, or a tuple of arrays, with one row per user of the chunk
Reducer = Callable[[np.ndarray, slice], np.ndarray | tuple[np.ndarray, ...]]


def per_user(
    score_rows: RowScorer, n_users: int, reducers: dict[str, Reducer], chunk: int | None = None
) -> dict[str, np.ndarray | tuple[np.ndarray, ...]]:
    """Every reducer's per-user results over all users, from one scoring pass a chunk at a time: only the
    reduced rows are kept, never the [users × items] matrix."""
    if n_users == 0:
        raise ValueError("no users to score")
    parts: dict[str, list] = {name: [] for name in reducers}
    for rows, scores in score_chunks(score_rows, n_users, chunk):
        for name, reduce in reducers.items():
            parts[name].append(reduce(scores, rows))
    return {name: _concatenate(chunks) for name, chunks in parts.items()}


def _concatenate(chunks: list) -> np.ndarray | tuple[np.ndarray, ...]:
    if isinstance(chunks[0], tuple):
        return tuple(np.concatenate(column) for column in zip(*chunks, strict=True))
    return np.concatenate(chunks)


def ranks_in(
    targets: Sequence[int],
    histories: Sequence[Sequence[int]] | None = None,
    mask_history: bool = True,
    ties: Ties = "index",
) -> Reducer:
    """A reducer giving `target_ranks` of each user's target."""
    targets = np.asarray(targets, dtype=np.int64)
    return lambda scores, rows: target_ranks(
        scores, targets[rows], _rows(histories, rows), mask_history, ties
    )


def top_in(k: int, histories: Sequence[Sequence[int]] | None = None, mask_history: bool = True) -> Reducer:
    """A reducer giving (`top_k` items, their unmasked scores) per user."""

    def reduce(scores: np.ndarray, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        top = top_k(scores, k, _rows(histories, rows), mask_history)
        return top, np.take_along_axis(scores, top, axis=1)

    return reduce


def scores_at(columns: np.ndarray) -> Reducer:
    """A reducer giving each user's scores of its own items (`columns[user]`, e.g. sampled candidates)."""
    return lambda scores, rows: np.take_along_axis(scores, columns[rows], axis=1)


def _rows(histories: Sequence[Sequence[int]] | None, rows: slice) -> Sequence[Sequence[int]] | None:
    return None if histories is None else histories[rows]


# ---------------------------------------------------------------------------------------------------------
# (b) full ranking after reranking the retriever's top K


def top_k(
    scores: np.ndarray, k: int, histories: Sequence[Sequence[int]] | None = None, mask_history: bool = True
) -> np.ndarray:
    """[users × k] item indices in retriever order (ties by index, as `target_ranks(ties="index")`)."""
    if mask_history and histories is not None:
        scores = mask_scores(scores, histories)
    scores = np.asarray(scores, dtype=np.float32)
    k = min(k, scores.shape[1])
    # argpartition first: sorting only the k best per row is what keeps this cheap on large catalogues.
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    # the partition may cut through a run of ties; widen to every item tying with the k-th so the index
    # tie-break below picks the same items a full stable sort would
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
    out = np.empty((len(scores), k), dtype=np.int64)
    for user in range(len(scores)):
        pool = np.union1d(part[user], np.flatnonzero(scores[user] == kth[user]))
        order = np.lexsort((pool, -scores[user, pool]))  # score descending, then index ascending
        out[user] = pool[order[:k]]
    return out


def reranked_ranks(
    scores: np.ndarray,
    candidates: np.ndarray,
    reranker_scores: np.ndarray,
    targets: Sequence[int],
    histories: Sequence[Sequence[int]] | None = None,
    mask_history: bool = True,
) -> np.ndarray:
    """Rank of each target when the retriever's top K (`candidates`, from `top_k`) is reordered by the reranker
    and the rest of the catalogue follows in retriever order.

    `reranker_scores[u, j]` scores `candidates[u, j]`. Reranker ties keep the retriever order, so a reranker
    that cannot tell candidates apart reproduces the retriever. A target outside the top K keeps its
    retriever rank, which is ≥ K by construction (same tie-break, same masking; the max() only matters for
    a target the user had already consumed, which `top_k` masks but `target_ranks` keeps).
    """
    retriever = target_ranks(scores, targets, histories, mask_history, ties="index")
    return reranked_from_ranks(retriever, candidates, reranker_scores, targets)


def reranked_from_ranks(
    retriever_ranks: np.ndarray, candidates: np.ndarray, reranker_scores: np.ndarray, targets: Sequence[int]
) -> np.ndarray:
    """`reranked_ranks` from the retriever's own target ranks (`target_ranks(..., ties="index")` under the
    same masking as `candidates`), so the score matrix need not be kept."""
    candidates = np.asarray(candidates)
    reranker_scores = np.asarray(reranker_scores, dtype=np.float64)
    ranks = np.maximum(retriever_ranks, candidates.shape[1])
    for user, target in enumerate(targets):
        where = np.flatnonzero(candidates[user] == target)
        if where.size:
            position = where[0]
            s = reranker_scores[user]
            # before the target: strictly higher reranker score, or equal and earlier in retriever order
            ranks[user] = int((s > s[position]).sum() + (s[:position] == s[position]).sum())
    return ranks


def evaluate_reranked(
    scores: np.ndarray,
    targets: Sequence[int],
    histories: Sequence[Sequence[int]],
    score_candidates: CandidateScorer,
    k: int = 20,
    mask_history: bool = True,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Full-ranking metrics of retriever top-K → `score_candidates` reranks → rest in retriever order."""
    candidates = top_k(scores, k, histories, mask_history)
    reranked = np.stack(
        [
            np.asarray(score_candidates(user, histories[user], candidates[user]), dtype=np.float64)
            for user in range(len(candidates))
        ]
    )
    return ranking_metrics(reranked_ranks(scores, candidates, reranked, targets, histories, mask_history), ks)


# ---------------------------------------------------------------------------------------------------------
# (c) sampled: the target plus random negatives the user never interacted with (LLMRank protocol)


def sample_candidates(
    targets: Sequence[int],
    interacted: Sequence[Sequence[int]],
    n_items: int,
    n_negatives: int = 19,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """([users × (1 + n_negatives)] shuffled candidates, [users] position of the target in each row).

    `interacted[u]` is everything the user ever rated (the whole sequence, validation and test items
    included), so no negative is an item the user actually consumed. One seeded Generator drives every draw,
    users in order, so the same inputs always give the same candidates.
    """
    rng = np.random.default_rng(seed)
    rows, positions = [], []
    for target, seen in zip(targets, interacted, strict=True):
        excluded = np.zeros(n_items, dtype=bool)
        excluded[np.asarray(seen, dtype=np.int64)] = True
        excluded[target] = True
        pool = np.flatnonzero(~excluded)
        if len(pool) < n_negatives:
            raise ValueError(f"only {len(pool)} items left to sample {n_negatives} negatives from")
        negatives = rng.choice(pool, size=n_negatives, replace=False)
        row = rng.permutation(np.concatenate([[target], negatives]))
        rows.append(row)
        positions.append(int(np.flatnonzero(row == target)[0]))
    return np.asarray(rows, dtype=np.int64), np.asarray(positions, dtype=np.int64)


def sampled_ranks(
    candidates: np.ndarray,
    target_positions: np.ndarray,
    histories: Sequence[Sequence[int]],
    score_candidates: CandidateScorer,
    ties: Ties = "pessimistic",
) -> np.ndarray:
    """Rank of the target among its candidates under `score_candidates(user, history, candidates)`.

    Ties default to pessimistic here: candidates are shuffled, so the index order carries no meaning.
    """
    ranks = np.empty(len(candidates), dtype=np.int64)
    for user, (row, position) in enumerate(zip(candidates, target_positions, strict=True)):
        s = np.asarray(score_candidates(user, histories[user], row), dtype=np.float64)
        tied = (s == s[position]).sum() - 1 if ties == "pessimistic" else (s[:position] == s[position]).sum()
        ranks[user] = int((s > s[position]).sum() + tied)
    return ranks


def evaluate_sampled(
    targets: Sequence[int],
    histories: Sequence[Sequence[int]],
    interacted: Sequence[Sequence[int]],
    n_items: int,
    score_candidates: CandidateScorer,
    n_negatives: int = 19,
    seed: int = 0,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    candidates, positions = sample_candidates(targets, interacted, n_items, n_negatives, seed)
    return ranking_metrics(sampled_ranks(candidates, positions, histories, score_candidates), ks)


def matrix_scorer(scores: np.ndarray) -> CandidateScorer:
    """A `CandidateScorer` that looks candidates up in a precomputed [users × items] score matrix."""
    return lambda user, history, candidates: scores[user, candidates]
