"""The offline evaluation chunk by chunk: saved retrievers on a small catalogue give the metrics of their
whole score matrices, whatever the chunk size."""

import numpy as np
import pytest

from instructrec.artifacts import Artifacts
from instructrec.data.dataset import Dataset, Interaction, Item
from instructrec.data.split import LeaveOneOut
from instructrec.evaluation.metrics import ranking_metrics
from instructrec.evaluation.protocols import evaluate_full, sampled_ranks, top_k
from instructrec.experiment import evaluate_retrievers, held_out, retriever_pass
from instructrec.retrieval import Blend, CoOccurrence, ItemKNN, Popularity, load_retriever

NAMES = ("popularity", "cooccurrence", "itemknn", "blend")


def small_catalogue(n_users=90, n_items=45, seed=0) -> Dataset:
    """Users drift along the catalogue (item i tends to follow i-1) with popular items mixed in."""
    rng = np.random.default_rng(seed)
    histories = []
    for _ in range(n_users):
        walk = np.cumsum(rng.integers(1, 4, size=rng.integers(4, 25))) + rng.integers(0, n_items)
        popular = rng.zipf(1.6, size=len(walk)) - 1
        items = np.where(rng.random(len(walk)) < 0.3, popular, walk) % n_items
        histories.append([Interaction(int(item), t) for t, item in enumerate(items)])
    items = [Item(str(i), f"item {i}", None, ()) for i in range(n_items)]
    return Dataset("small", items, [str(u) for u in range(n_users)], histories)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    dataset = small_catalogue()
    split = LeaveOneOut(dataset)
    out = Artifacts(tmp_path_factory.mktemp("artifacts") / "small")
    fitted = [
        Popularity().fit(split),
        CoOccurrence(neighbours=10).fit(split),
        ItemKNN(neighbours=10).fit(split),
    ]
    for name, model in zip(("popularity", "cooccurrence", "itemknn"), fitted, strict=True):
        model.save(out.retriever(name))
    Blend(fitted[1:] + fitted[:1], grid=(0.0, 0.5, 2.0)).fit(split, fit_components=False).save(
        out.retriever("blend")
    )
    return dataset, out


def whole_matrix_results(dataset, out):
    """What evaluation computed before chunks: each retriever's whole [users × items] matrix."""
    _, histories, targets, rows, positions = held_out(dataset)
    results = {"full": {}, "full_unmasked": {}, "sampled": {}}
    for name in NAMES:
        scores = load_retriever(out.retriever(name)).score(histories)
        results["full"][name] = evaluate_full(scores, targets, histories)
        results["full_unmasked"][name] = evaluate_full(scores, targets, histories, mask_history=False)
        of_rows = np.take_along_axis(scores, rows, axis=1)
        ranks = sampled_ranks(rows, positions, histories, lambda u, h, c, s=of_rows: s[u])
        results["sampled"][name] = ranking_metrics(ranks)
    return results


def test_evaluation_chunk_by_chunk_equals_the_whole_matrices(saved):
    dataset, out = saved
    expected = whole_matrix_results(dataset, out)
    assert expected["full"]["blend"]["NDCG@10"] > expected["full"]["popularity"]["NDCG@10"]  # not all zeros
    for chunk in (1, 4, 13, None):
        assert evaluate_retrievers(dataset, out, NAMES, chunk=chunk) == expected


def test_the_pipeline_retrievers_top_k_chunk_by_chunk(saved):
    dataset, out = saved
    _, histories, targets, rows, _ = held_out(dataset)
    blend = load_retriever(out.retriever("blend"))
    scores = blend.score(histories)
    for chunk in (1, 7, None):
        kept = retriever_pass(blend, histories, targets, rows, k=5, chunk=chunk)
        for key, mask in (("top", True), ("top_unmasked", False)):
            candidates, base = kept[key]
            assert np.array_equal(candidates, top_k(scores, 5, histories, mask_history=mask))
            assert np.array_equal(base, np.take_along_axis(scores, candidates, axis=1))
        assert np.array_equal(kept["sampled"], np.take_along_axis(scores, rows, axis=1))
