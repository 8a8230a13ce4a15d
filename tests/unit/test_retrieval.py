"""Retrievers on tiny synthetic data: hand-checkable counts, a learnable next-item pattern, persistence."""

import os

import numpy as np
import pytest
import torch
from scipy import sparse

from instructrec.data.dataset import Dataset, Interaction, Item
from instructrec.data.split import LeaveOneOut
from instructrec.evaluation.metrics import ndcg
from instructrec.evaluation.protocols import chunked_ranks, retriever_rows, sample_users
from instructrec.retrieval import Blend, CoOccurrence, ItemKNN, Popularity, load_retriever
from instructrec.retrieval.blend import normalise, tune_scorers
from instructrec.retrieval.cooccurrence import item_item, row_blocks
from instructrec.retrieval.sasrec import SASRec, SASRecConfig, _training_windows

torch.set_num_threads(1)  # tiny models; and on a shared CPU two threads spin-wait on each other
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

N_CYCLE = 12


def cycle_sequences(n_users=60, length=14, seed=0):
    """Every user walks the cycle 0 → 1 → … → 11 → 0 from a random start: the next item is determined."""
    rng = np.random.default_rng(seed)
    return [[(start + t) % N_CYCLE for t in range(length)] for start in rng.integers(0, N_CYCLE, n_users)]


def toy_split(sequences, n_items):
    items = [Item(str(i), f"movie {i}", 2000, ("Drama",)) for i in range(n_items)]
    histories = [[Interaction(item, t) for t, item in enumerate(s)] for s in sequences]
    return LeaveOneOut(Dataset("toy", items, [str(u) for u in range(len(sequences))], histories))


# ---------------------------------------------------------------------------------------------------------
# popularity and item-to-item


def test_popularity_counts_training_interactions_only():
    split = toy_split([[0, 1, 2, 3, 4], [1, 2, 3, 0, 0], [1, 2, 4, 3, 3]], n_items=5)
    # training parts: [0,1,2], [1,2,3], [1,2,4]
    model = Popularity().fit(split)
    assert model.counts.tolist() == [1, 3, 3, 1, 1]
    assert model.score([[0], []]).shape == (2, 5)


def test_cooccurrence_counts_followers_within_the_window():
    model = CoOccurrence(window=2, last=2, decay=0.5).fit_sequences([[0, 1, 2, 3], [1, 2]], n_items=4)
    m = model.matrix.toarray()
    assert m[0].tolist() == [0, 1, 1, 0]  # 1 and 2 follow 0 within two steps; 3 is three steps away
    assert m[1].tolist() == [0, 0, 2, 1]  # 1 → 2 twice (both users), 1 → 3 once
    assert m[3].tolist() == [0, 0, 0, 0]  # nothing follows the last item
    # history [.., 0, 1]: score = m[1] + 0.5 · m[0]
    assert model.score([[3, 0, 1]])[0].tolist() == [0, 0.5, 2.5, 1]
    assert model.score([[]])[0].tolist() == [0, 0, 0, 0]


def test_itemknn_is_cosine_of_item_columns():
    # users: {0,1}, {0,1}, {0,2}: cos(0,1) = 2 / sqrt(3·2), cos(0,2) = 1 / sqrt(3), cos(1,2) = 0
    model = ItemKNN(last=1).fit_sequences([[0, 1], [1, 0], [0, 2]], n_items=3)
    m = model.matrix.toarray()
    assert m[0, 1] == pytest.approx(2 / np.sqrt(6))
    assert m[0, 2] == pytest.approx(1 / np.sqrt(3))
    assert m[1, 2] == 0 and m[0, 0] == 0
    assert np.allclose(m, m.T)
    assert np.argmax(model.score([[2, 0]])[0]) == 1


def _random_sequences(n_users=80, n_items=60, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n_items, size=rng.integers(0, 30)).tolist() for _ in range(n_users)], n_items


@pytest.mark.parametrize("model", [CoOccurrence, ItemKNN])
def test_item_item_keeps_each_items_largest_neighbours(model):
    sequences, n_items = _random_sequences()
    full = model(neighbours=None).fit_sequences(sequences, n_items).matrix.toarray()
    cut = model(neighbours=6).fit_sequences(sequences, n_items).matrix
    assert np.diff(cut.indptr).max() == 6 and (np.count_nonzero(full, axis=1) > 6).any()
    for row, kept in enumerate(cut.toarray()):
        order = np.lexsort((np.arange(n_items), -full[row]))[:6]  # value descending, ties by lower index
        expected = np.zeros(n_items, dtype=np.float32)
        expected[order] = full[row, order]
        assert np.array_equal(kept, expected)


def test_item_item_blocks_do_not_change_the_matrix():
    sequences, n_items = _random_sequences()
    items = np.concatenate([np.asarray(s) for s in sequences])
    users = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    interactions = sparse.csr_array((np.ones(len(items), np.float32), (users, items)), shape=(80, n_items))
    left = interactions.T.tocsr()
    assert len(row_blocks(left, interactions, budget=50)) > 10
    one_block = item_item(left, interactions, 5, budget=10**9)
    many = item_item(left, interactions, 5, budget=50)
    assert (one_block != many).nnz == 0 and one_block.nnz == many.nnz


def test_item_item_scores_a_history_without_dense_matrices():
    sequences, n_items = _random_sequences()
    model = ItemKNN(last=3, decay=0.5).fit_sequences(sequences, n_items)
    dense = model.matrix.toarray()
    history = [4, 9, 4, 17]  # 4 twice: 17, then 4 at 0.5, then 9 at 0.25, and the older 4 is past `last`
    expected = dense[17] + 0.5 * dense[4] + 0.25 * dense[9]
    np.testing.assert_allclose(model.score([history, []]), [expected, np.zeros(n_items)], rtol=1e-6)


def test_item_item_save_load_round_trip(tmp_path):
    model = CoOccurrence(window=3, decay=0.7).fit_sequences(cycle_sequences(), N_CYCLE)
    model.save(tmp_path / "cooc")
    loaded = load_retriever(tmp_path / "cooc")
    assert isinstance(loaded, CoOccurrence) and loaded.window == 3 and loaded.decay == 0.7
    assert loaded.neighbours == model.neighbours
    assert (loaded.matrix != model.matrix).nnz == 0


def test_a_dense_era_item_item_artifact_still_loads(tmp_path):
    """Saved before the neighbour cut: the config has no `neighbours`, the arrays every non-zero."""
    import json

    from safetensors.numpy import save_file

    dense = np.array([[0, 2, 1], [0, 0, 3], [1, 0, 0]], dtype=np.float32)
    rows, cols = np.nonzero(dense)
    (tmp_path / "config.json").write_text(
        json.dumps({"kind": "itemknn", "last": 2, "decay": 0.5, "n_items": 3})
    )
    arrays = {"rows": rows.astype(np.int32), "cols": cols.astype(np.int32), "values": dense[rows, cols]}
    save_file(arrays, str(tmp_path / "arrays.safetensors"))
    loaded = load_retriever(tmp_path)
    assert isinstance(loaded, ItemKNN) and loaded.neighbours is None and loaded.last == 2
    assert np.array_equal(loaded.matrix.toarray(), dense)
    assert loaded.score([[2, 0]])[0].tolist() == [0.5, 2, 1]  # M[0] + 0.5 · M[2]


# ---------------------------------------------------------------------------------------------------------
# blend


def test_normalise_rows():
    scores = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    assert normalise(scores, "minmax")[0].tolist() == [0, 0.5, 1]
    assert normalise(scores, "zscore")[1].tolist() == [0, 0, 0]  # a constant row stays finite
    assert normalise(scores, "zscore")[0].mean() == pytest.approx(0)


def tune_weights(matrices, targets, histories, **kwargs):
    """Tuning over whole [users × items] matrices: each component scores a chunk by slicing its matrix."""
    return tune_scorers([lambda rows, m=m: m[rows] for m in matrices], targets, histories, **kwargs)


def test_tune_weights_picks_the_useful_component():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 50, size=40)
    noise = rng.random((40, 50)).astype(np.float32)
    oracle = np.zeros((40, 50), dtype=np.float32)
    oracle[np.arange(40), targets] = 1.0
    weights, best = tune_weights([noise, oracle], targets, [[] for _ in targets], grid=(0.0, 1.0, 5.0))
    assert weights[0] == 1.0 and weights[1] > 0 and best == pytest.approx(1.0)
    weights, _ = tune_weights([oracle, noise], targets, [[] for _ in targets], grid=(0.0, 1.0, 5.0))
    assert weights == [1.0, 0.0]


def test_tune_weights_chunk_by_chunk_equals_the_whole_matrices():
    rng = np.random.default_rng(1)
    n_users, n_items = 37, 25
    targets = rng.integers(0, n_items, size=n_users)
    histories = [rng.choice(n_items, size=rng.integers(0, 6), replace=False).tolist() for _ in range(n_users)]
    noisy_oracle = rng.random((n_users, n_items)).astype(np.float32)
    noisy_oracle[np.arange(n_users), targets] += 0.6
    components = [
        rng.integers(0, 4, size=(n_users, n_items)).astype(np.float32),
        noisy_oracle,
        rng.random((n_users, n_items)),
    ]
    whole = tune_weights(components, targets, histories)
    assert whole[0][1] > 0  # the oracle is worth a weight: the tuning has something to find
    for chunk in (1, 5, 36):
        assert tune_weights(components, targets, histories, chunk=chunk) == whole


def test_blend_tunes_on_a_seeded_sample_of_many_validation_users():
    split = toy_split(cycle_sequences(n_users=30, length=6), N_CYCLE)
    make = lambda seed: Blend([Popularity(), CoOccurrence(window=1, last=1)], valid_users=12, seed=seed)  # noqa: E731
    a, b = make(0).fit(split), make(0).fit(split)
    assert a.weights == b.weights and a.valid_ndcg10 == b.valid_ndcg10
    sample = sample_users(30, 12, seed=0)
    assert (
        len(sample) == 12
        and np.all(np.diff(sample) > 0)
        and not np.array_equal(sample, sample_users(30, 12, 1))
    )
    assert sample_users(30, 40).tolist() == list(range(30)) and sample_users(30, None).tolist() == list(
        range(30)
    )
    # the tuned NDCG is the sample's: the same as tuning on those users alone
    histories, targets = split.histories("valid"), split.targets("valid")
    alone = Blend(a.components).tune([histories[u] for u in sample], [targets[u] for u in sample])
    assert alone.weights == a.weights and alone.valid_ndcg10 == a.valid_ndcg10


def test_blend_fits_tunes_and_round_trips(tmp_path):
    split = toy_split(cycle_sequences(n_users=30, length=6), N_CYCLE)  # short: most items stay unmasked
    blend = Blend([Popularity(), CoOccurrence(window=1, last=1)], grid=(0.0, 0.5, 2.0)).fit(split)
    assert blend.weights[1] > 0  # the sequential pattern is what predicts the validation item
    scores = blend.score(split.histories("test"))
    assert scores.shape == (30, N_CYCLE)
    blend.save(tmp_path / "blend")
    loaded = load_retriever(tmp_path / "blend")
    assert loaded.weights == blend.weights
    assert np.allclose(loaded.score(split.histories("test")), scores)


# ---------------------------------------------------------------------------------------------------------
# SASRec


def test_training_windows_cover_every_transition_once():
    sequence = list(range(10))
    windows = _training_windows([sequence], max_len=4, all_windows=True)
    pairs = [(w[i], w[i + 1]) for w in windows for i in range(len(w) - 1)]
    assert sorted(pairs) == [(i, i + 1) for i in range(9)]
    assert _training_windows([sequence], max_len=4, all_windows=False) == [[5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def cycle_sasrec():
    config = SASRecConfig(d=32, blocks=1, heads=2, dropout=0.1, max_len=20, lr=5e-3, batch_size=16, epochs=25)
    return SASRec(config).fit_sequences(cycle_sequences(), N_CYCLE)


def test_sasrec_learns_a_deterministic_next_item(cycle_sasrec):
    curve = [entry["loss"] for entry in cycle_sasrec.log["curve"]]
    assert curve[-1] < 0.5 * curve[0]
    histories = [
        [(start + t) % N_CYCLE for t in range(length)] for start in range(N_CYCLE) for length in (3, 8)
    ]
    predicted = cycle_sasrec.score(histories).argmax(axis=1)
    expected = [(h[-1] + 1) % N_CYCLE for h in histories]
    assert predicted.tolist() == expected


def test_sasrec_with_a_sampled_softmax_learns_the_next_item_from_a_few_negatives():
    config = SASRecConfig(
        d=32, blocks=1, heads=2, dropout=0.1, max_len=20, lr=5e-3, batch_size=16, epochs=25, negatives=4
    )
    model = SASRec(config).fit_sequences(cycle_sequences(), N_CYCLE)
    histories = [[(start + t) % N_CYCLE for t in range(5)] for start in range(N_CYCLE)]
    predicted = model.score(histories).argmax(axis=1)
    assert predicted.tolist() == [(h[-1] + 1) % N_CYCLE for h in histories]


def test_sasrec_samples_only_when_the_negatives_are_fewer_than_the_items():
    config = dict(d=16, blocks=1, heads=1, max_len=20, batch_size=16, epochs=2)
    full = SASRec(SASRecConfig(**config)).fit_sequences(cycle_sequences(), N_CYCLE)
    too_many = SASRec(SASRecConfig(**config, negatives=N_CYCLE)).fit_sequences(cycle_sequences(), N_CYCLE)
    sampled = SASRec(SASRecConfig(**config, negatives=4)).fit_sequences(cycle_sequences(), N_CYCLE)
    losses = [[e["loss"] for e in m.log["curve"]] for m in (full, too_many, sampled)]
    assert losses[0] == losses[1] and losses[2] != losses[0]


def test_sasrec_vectors_give_the_scores(cycle_sasrec):
    histories = [[0, 1, 2], [5], [], list(range(12)) * 3]  # also empty and longer than max_len
    queries, items = cycle_sasrec.query_vectors(histories), cycle_sasrec.item_vectors()
    assert queries.shape == (4, 32) and items.shape == (N_CYCLE, 32)
    assert np.allclose(queries @ items.T, cycle_sasrec.score(histories), atol=1e-5)
    assert not queries[2].any()  # empty history -> zero query


def test_sasrec_save_load_round_trip(cycle_sasrec, tmp_path):
    cycle_sasrec.save(tmp_path / "sasrec")
    loaded = load_retriever(tmp_path / "sasrec")
    assert loaded.config == cycle_sasrec.config
    histories = [[0, 1, 2], [7, 8]]
    assert np.allclose(loaded.score(histories), cycle_sasrec.score(histories))


def test_sasrec_early_stops_on_validation_and_is_seeded():
    split = toy_split(cycle_sequences(n_users=30), N_CYCLE)
    config = dict(
        d=16, blocks=1, heads=1, max_len=20, lr=5e-3, batch_size=16, epochs=6, eval_every=2, patience=1
    )
    a = SASRec(SASRecConfig(**config)).fit(split)
    b = SASRec(SASRecConfig(**config)).fit(split)
    assert a.log["best_valid_ndcg10"] is not None and a.log["train_seconds"] >= 0
    assert [e["loss"] for e in a.log["curve"]] == [e["loss"] for e in b.log["curve"]]


def test_sasrec_validates_on_a_seeded_sample_of_many_users():
    sequences, n_items = _random_sequences(n_users=60, n_items=30, seed=2)
    split = toy_split([s for s in sequences if len(s) >= 3][:40], n_items)  # a split needs 3 per user
    config = SASRecConfig(
        d=16, blocks=1, heads=1, max_len=20, batch_size=16, epochs=2, eval_every=1, valid_users=15
    )
    model = SASRec(config).fit(split)
    histories, targets = split.histories("valid"), split.targets("valid")

    def valid_ndcg(users):
        hs = [histories[u] for u in users]
        ranks = chunked_ranks(retriever_rows(model, hs), [targets[u] for u in users], hs)
        return round(float(ndcg(ranks, 10).mean()), 5)

    sample = sample_users(40, 15, seed=config.seed)
    assert model.log["best_valid_ndcg10"] == valid_ndcg(sample)  # the best epoch's, restored
    assert valid_ndcg(sample) != valid_ndcg(range(40))  # so the sample is what was measured


# ---------------------------------------------------------------------------------------------------------
# text


def test_text_retriever_ranks_the_matching_text_first(tmp_path):
    from instructrec.retrieval.text import TextRetriever

    texts = [
        "Toy Story (1995). Genres: Animation, Children, Comedy. Tags: pixar, toys.",
        "Alien (1979). Genres: Horror, Sci-Fi. Tags: space, monster.",
        "Pride and Prejudice (2005). Genres: Drama, Romance. Tags: jane austen, period drama.",
        "Heat (1995). Genres: Action, Crime, Thriller. Tags: bank robbery, heist.",
    ]
    model = TextRetriever(cache_dir=tmp_path).fit_texts(texts, "toy")
    vectors = model.item_vectors()
    assert vectors.shape == (4, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    scores = model.score_texts(["a scary monster in outer space", "a romantic period drama", "animated toys"])
    assert scores.argmax(axis=1).tolist() == [1, 2, 0]
    # the item vectors come back from the cache without the model
    cached = TextRetriever(cache_dir=tmp_path, model_path="/nonexistent").fit_texts(texts, "toy")
    assert np.array_equal(cached.item_vectors(), vectors)
    assert model.score([[1]]).argmax() == 1


def test_the_stream_loads_a_blend_as_its_vector_component_plus_blend_scores(tmp_path):
    """The pipeline's blend is not a vector retriever: the stream puts SASRec's vectors in Qdrant and fuses
    the reranker with the blend's own scores, the prior the reranker was trained against."""
    import json

    from instructrec.config import Settings
    from streams.services import load_collaborative

    sequences = cycle_sequences(n_users=30, length=8)
    split = toy_split(sequences, N_CYCLE)
    sasrec = SASRec(SASRecConfig(d=16, blocks=1, heads=2, max_len=10, batch_size=16, epochs=2)).fit(split)
    blend = Blend([sasrec, CoOccurrence(window=1, last=1).fit(split)], weights=[1.0, 0.5])
    root = tmp_path / "artifacts" / "toy"
    blend.save(root / "retrievers" / "blend")
    ids = [f"m{i}" for i in range(N_CYCLE)]
    (root / "retrievers" / "blend" / "item_ids.json").write_text(json.dumps(ids))
    (root / "pipeline.json").write_text(json.dumps({"retriever": "blend", "fusion_weight": 1.5}))
    settings = Settings(model={"artifacts": tmp_path / "artifacts"}, stream={"dataset": "toy"})

    collaborative = load_collaborative(settings)
    assert collaborative is not None and collaborative.fusion_weight == 1.5
    assert collaborative.dim == 16  # SASRec's vectors go to Qdrant
    history = ["m1", "m2", "m3", "unknown"]
    (query,) = collaborative.query_vectors([history])
    (prior,) = collaborative.catalogue_scores([history], [query])
    np.testing.assert_allclose(prior, blend.score([[1, 2, 3]])[0], rtol=1e-5)  # the blend's, not SASRec's
    assert collaborative.scores(prior, ["m4", "unknown"]) == [pytest.approx(float(prior[4])), None]
    assert collaborative.catalogue_scores([["unknown"]], [None]) == [None]
