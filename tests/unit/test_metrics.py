"""Metrics and protocols against values computed by hand."""

import math

import numpy as np
import pytest

from instructrec.evaluation.metrics import coverage, hit, intra_list_diversity, mrr, ndcg, ranking_metrics
from instructrec.evaluation.protocols import (
    chunk_users,
    chunked_ranks,
    evaluate_full,
    evaluate_reranked,
    evaluate_sampled,
    matrix_scorer,
    per_user,
    ranks_in,
    reranked_from_ranks,
    reranked_ranks,
    sample_candidates,
    sampled_ranks,
    score_chunks,
    scores_at,
    target_ranks,
    top_in,
    top_k,
)

# ---------------------------------------------------------------------------------------------------------
# metrics from ranks


def test_ndcg_of_single_target():
    assert ndcg(np.array([0]), 10)[0] == 1.0
    assert ndcg(np.array([1]), 10)[0] == pytest.approx(1 / math.log2(3))
    assert ndcg(np.array([2]), 10)[0] == pytest.approx(0.5)  # 1 / log2(4)
    assert ndcg(np.array([9]), 10)[0] == pytest.approx(1 / math.log2(11))
    assert ndcg(np.array([10, 50]), 10).tolist() == [0.0, 0.0]


def test_hit_and_mrr():
    ranks = np.array([0, 3, 4, 5, 12])
    assert hit(ranks, 5).tolist() == [1, 1, 1, 0, 0]
    assert mrr(ranks, 5).tolist() == pytest.approx([1.0, 0.25, 0.2, 0.0, 0.0])


def test_ranking_metrics_aggregates_means_and_names():
    ranks = np.array([0, 2, 7, 30])
    m = ranking_metrics(ranks, ks=(1, 5, 10), recall_ks=(20, 50))
    assert m["NDCG@1"] == pytest.approx(0.25)
    assert m["NDCG@5"] == pytest.approx((1 + 0.5) / 4)
    assert m["NDCG@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(9)) / 4)
    assert m["HR@10"] == m["Recall@10"] == pytest.approx(0.75)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 3 + 1 / 8) / 4)
    assert m["Recall@20"] == pytest.approx(0.75)
    assert m["Recall@50"] == pytest.approx(1.0)
    assert "NDCG@20" not in m


def test_coverage_and_diversity():
    assert coverage([[0, 1], [1, 2]], n_items=8) == pytest.approx(3 / 8)
    genres = [("Drama",), ("Drama",), ("Comedy",), ("Comedy", "Drama"), ()]
    assert intra_list_diversity([[0, 1]], genres) == 0.0  # same genres
    assert intra_list_diversity([[0, 2]], genres) == 1.0  # disjoint
    # pairs (0,2)=1, (0,3)=1-1/2, (2,3)=1-1/2 -> mean 2/3; a second list [0,1] -> 0; mean over lists 1/3
    assert intra_list_diversity([[0, 2, 3], [0, 1]], genres) == pytest.approx(1 / 3)
    assert intra_list_diversity([[4, 4]], genres) == 1.0  # no genres: nothing says they are alike
    assert intra_list_diversity([[0]], genres) == 0.0  # nothing to compare


# ---------------------------------------------------------------------------------------------------------
# full ranking

SCORES = np.array(
    [
        #  0    1    2    3    4    5
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # user 0: history {0, 1}, target 3
        [0.1, 0.5, 0.5, 0.5, 0.9, 0.2],  # user 1: history {4}, target 2 (tied with 1 and 3)
    ],
    dtype=np.float32,
)
HISTORIES = [[0, 1], [4]]
TARGETS = [3, 2]


def test_full_ranking_masked_and_unmasked_by_hand():
    # user 0: unmasked, 0,1,2 score higher -> 3; masked, only 2 -> 1
    # user 1: unmasked, 4 higher and 1 ties with a lower index -> 2; masked, only the tie -> 1
    assert target_ranks(SCORES, TARGETS, HISTORIES, mask_history=False).tolist() == [3, 2]
    assert target_ranks(SCORES, TARGETS, HISTORIES, mask_history=True).tolist() == [1, 1]


def test_ties_pessimistic_counts_every_equal_item():
    # user 1 masked: items 1 and 3 tie with the target -> both go before it
    assert target_ranks(SCORES, TARGETS, HISTORIES, ties="pessimistic").tolist() == [1, 2]
    constant = np.zeros((1, 5), dtype=np.float32)
    assert target_ranks(constant, [0], [[]], ties="pessimistic").tolist() == [4]
    assert target_ranks(constant, [0], [[]], ties="index").tolist() == [0]


def test_index_ties_match_a_stable_sort():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(20, 30)).astype(np.float32)  # many ties
    targets = rng.integers(0, 30, size=20)
    ranks = target_ranks(scores, targets, mask_history=False)
    order = np.argsort(-scores, axis=1, kind="stable")
    expected = [int(np.flatnonzero(order[u] == t)[0]) for u, t in enumerate(targets)]
    assert ranks.tolist() == expected


def test_target_in_history_is_never_masked():
    ranks = target_ranks(SCORES, [1, 2], [[0, 1], [4]], mask_history=True)
    assert ranks.tolist() == [0, 1]


def test_evaluate_full_reports_recall_at_50():
    m = evaluate_full(SCORES, TARGETS, HISTORIES)
    assert m["NDCG@1"] == 0.0 and m["NDCG@5"] == pytest.approx(1 / math.log2(3))
    assert m["Recall@50"] == 1.0


# ---------------------------------------------------------------------------------------------------------
# reranked full ranking


def test_top_k_masks_and_breaks_ties_by_index():
    assert top_k(SCORES, 3, HISTORIES).tolist() == [[2, 3, 4], [1, 2, 3]]
    assert top_k(SCORES, 2, HISTORIES, mask_history=False).tolist() == [[0, 1], [4, 1]]
    tied = np.zeros((1, 6), dtype=np.float32)
    assert top_k(tied, 3).tolist() == [[0, 1, 2]]


def test_reranked_protocol_composition():
    scores = np.array([[6, 5, 4, 3, 2, 1]], dtype=np.float32)  # retriever order 0,1,2,3,4,5
    candidates = top_k(scores, 3, [[]])
    assert candidates.tolist() == [[0, 1, 2]]
    reverse = np.array([[1.0, 2.0, 3.0]])  # reranker reverses the top 3: 2,1,0 then 3,4,5
    for target, expected in [(2, 0), (1, 1), (0, 2), (3, 3), (5, 5)]:
        assert reranked_ranks(scores, candidates, reverse, [target], [[]]).tolist() == [expected]
    # reranker ties keep the retriever order: a constant reranker reproduces the retriever
    flat = np.zeros((1, 3))
    for target in range(6):
        assert reranked_ranks(scores, candidates, flat, [target], [[]]).tolist() == [target]


def test_reranked_with_history_masked():
    scores = np.array([[6, 5, 4, 3, 2, 1]], dtype=np.float32)
    history = [[0, 1]]  # masked: retriever order 2,3,4,5
    candidates = top_k(scores, 2, history)
    assert candidates.tolist() == [[2, 3]]
    reverse = np.array([[0.0, 1.0]])
    assert reranked_ranks(scores, candidates, reverse, [2], history).tolist() == [1]
    assert reranked_ranks(scores, candidates, reverse, [4], history).tolist() == [2]
    # the same through the callable API: the reranker prefers higher item ids
    m = evaluate_reranked(scores, [2], history, lambda u, h, c: c.astype(float), k=2, ks=(1, 5))
    assert m["NDCG@1"] == 0.0 and m["NDCG@5"] == pytest.approx(1 / math.log2(3))


# ---------------------------------------------------------------------------------------------------------
# sampled


def _toy_users(n_users=30, n_items=60, seed=0):
    rng = np.random.default_rng(seed)
    sequences = [
        rng.choice(n_items, size=rng.integers(5, 20), replace=False).tolist() for _ in range(n_users)
    ]
    return sequences, [s[-1] for s in sequences], [s[:-1] for s in sequences], n_items


def test_sampled_candidates_are_reproducible_and_exclude_the_history():
    sequences, targets, _histories, n_items = _toy_users()
    a, pos_a = sample_candidates(targets, sequences, n_items, seed=7)
    b, pos_b = sample_candidates(targets, sequences, n_items, seed=7)
    c, _ = sample_candidates(targets, sequences, n_items, seed=8)
    assert np.array_equal(a, b) and np.array_equal(pos_a, pos_b)
    assert not np.array_equal(a, c)
    assert a.shape == (len(targets), 20)
    for user, (row, position) in enumerate(zip(a, pos_a, strict=True)):
        assert row[position] == targets[user]
        negatives = np.delete(row, position)
        assert not set(negatives) & set(sequences[user])  # never an item the user interacted with
        assert len(set(row)) == 20
    assert len(set(pos_a.tolist())) > 1  # shuffled: the target is not always first


def test_sampled_ranks_by_hand_and_determinism():
    sequences, targets, histories, n_items = _toy_users()
    candidates, positions = sample_candidates(targets, sequences, n_items, seed=1)
    oracle = sampled_ranks(candidates, positions, histories, lambda u, h, c: (c == targets[u]).astype(float))
    assert oracle.tolist() == [0] * len(targets)
    constant = sampled_ranks(candidates, positions, histories, lambda u, h, c: np.zeros(len(c)))
    assert constant.tolist() == [19] * len(targets)  # pessimistic ties

    scores = np.random.default_rng(2).random((len(targets), n_items)).astype(np.float32)
    run = lambda: evaluate_sampled(targets, histories, sequences, n_items, matrix_scorer(scores), seed=3)  # noqa: E731
    assert run() == run()


# ---------------------------------------------------------------------------------------------------------
# chunks: the same results without the whole score matrix


def _catalogue(n_users=23, n_items=40, seed=5):
    """Scores with many ties, histories that sometimes hold the target, sampled candidates."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(n_users, n_items)).astype(np.float32)
    histories = [
        rng.choice(n_items, size=rng.integers(0, 12), replace=False).tolist() for _ in range(n_users)
    ]
    targets = rng.integers(0, n_items, size=n_users)
    sequences = [[*h, int(t)] for h, t in zip(histories, targets, strict=True)]
    candidates, _ = sample_candidates(targets, sequences, n_items, n_negatives=9, seed=1)
    return scores, histories, targets, candidates


def _recording(scores, seen):
    def score_rows(rows):
        seen.append(rows.stop - rows.start)
        return scores[rows]

    return score_rows


@pytest.mark.parametrize("chunk", [1, 4, 7, None, 23, 100])
def test_chunked_scoring_equals_the_whole_matrix(chunk):
    scores, histories, targets, candidates = _catalogue()
    seen = []
    got = per_user(
        _recording(scores, seen),
        len(targets),
        {
            "masked": ranks_in(targets, histories),
            "unmasked": ranks_in(targets, histories, mask_history=False),
            "pessimistic": ranks_in(targets, histories, ties="pessimistic"),
            "top": top_in(5, histories),
            "top_unmasked": top_in(5, histories, mask_history=False),
            "sampled": scores_at(candidates),
        },
        chunk,
    )
    assert sum(seen) == len(targets) and max(seen) <= (chunk or 16)  # scored once, never more than a chunk
    masked = target_ranks(scores, targets, histories)
    assert np.array_equal(got["masked"], masked)
    assert np.array_equal(got["unmasked"], target_ranks(scores, targets, histories, mask_history=False))
    assert np.array_equal(got["pessimistic"], target_ranks(scores, targets, histories, ties="pessimistic"))
    assert ranking_metrics(got["masked"], recall_ks=(20,)) == ranking_metrics(masked, recall_ks=(20,))
    for key, mask in (("top", True), ("top_unmasked", False)):
        items, item_scores = got[key]
        assert np.array_equal(items, top_k(scores, 5, histories, mask_history=mask))
        assert np.array_equal(item_scores, np.take_along_axis(scores, items, axis=1))
    assert np.array_equal(got["sampled"], np.take_along_axis(scores, candidates, axis=1))
    chunked = chunked_ranks(_recording(scores, []), targets, histories, chunk=chunk)
    assert np.array_equal(chunked, masked)
    # the reranked protocol from kept ranks is the one from the matrix
    items, _ = got["top"]
    reranker = np.random.default_rng(0).random(items.shape)
    expected = reranked_ranks(scores, items, reranker, targets, histories)
    assert np.array_equal(reranked_from_ranks(got["masked"], items, reranker, targets), expected)


def test_chunks_are_sized_by_the_catalogue():
    assert chunk_users(16_859) == 497  # 32 MB of float32 per chunk on a 16,859-item catalogue
    assert chunk_users(10**9) == 1
    seen = []
    wide = np.broadcast_to(np.zeros(2_000_000, dtype=np.float32), (40, 2_000_000))  # a view: no memory
    rows = [r for r, _ in score_chunks(_recording(wide, seen), 40)]
    assert seen == [16, 4, 4, 4, 4, 4, 4]  # a first probe, then 4 users (32 MB) per chunk
    assert [r.start for r in rows] == [0, 16, 20, 24, 28, 32, 36]
    with pytest.raises(ValueError, match="no users"):
        per_user(_recording(np.zeros((0, 3)), []), 0, {"ranks": ranks_in([], [])})
