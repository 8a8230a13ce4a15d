"""Any catalogue, not only movies: the catalogue's own words in instructions, and a catalogue with titles only
(no categories, no years, no ratings) that still trains and serves."""

from __future__ import annotations

import random

import numpy as np

from instructrec.artifacts import Artifacts
from instructrec.data.dataset import CATALOGUES, Dataset, Interaction, Item
from instructrec.instructions import Synthesizer, parse_ask, request_instruction
from instructrec.instructions.synthesis import specific_intention

GAMES = CATALOGUES["game"]


def games(n_items: int = 40, n_users: int = 16, with_attributes: bool = False) -> Dataset:
    kinds = ("Strategy", "Puzzle", "Racing")
    items = [
        Item(
            f"g{i}",
            f"Quest for the Crystal {i}",
            2000 + i % 20 if with_attributes else None,
            (kinds[i % 3],) if with_attributes else (),
        )
        for i in range(n_items)
    ]
    rng = random.Random(0)
    histories = []
    for u in range(n_users):
        start = rng.randrange(n_items)
        histories.append([Interaction((start + 3 * t) % n_items, 1000 + t) for t in range(8 + u % 5)])
    return Dataset("games", items, [f"u{u}" for u in range(n_users)], histories, nouns=GAMES)


def test_instructions_speak_the_catalogues_words() -> None:
    data = games()
    history = data.histories[0]
    texts = [
        request_instruction(history, [1, 2, 3], seed=seed, nouns=data.nouns).text(
            lambda i: data.items[i].title
        )
        for seed in range(30)
    ]
    said = " ".join(texts)
    assert "played" in said and "player" in said and "games" in said, texts
    assert not any(word in said for word in ("movie", "watch", "viewer", "film")), texts


def test_specific_requests_name_the_catalogues_categories() -> None:
    data = games(with_attributes=True)
    item = data.items[4]
    wishes = {specific_intention(item, random.Random(s), nouns=data.nouns).text for s in range(30)}
    assert any("game" in w for w in wishes) and all("movie" not in w for w in wishes)
    for seed in range(30):
        wish = specific_intention(item, random.Random(seed), nouns=data.nouns)
        assert parse_ask(wish.text, data.categories) == wish.ask, wish.text


def test_a_titles_only_catalogue_still_writes_requests() -> None:
    data = games()
    synth = Synthesizer(data)
    for seed in range(20):
        request = synth.request(data.histories[1][:5], data.histories[1][5].item, seed=seed)
        assert request.wish is None  # nothing to say about a title alone: sequential requests only
        example = synth.render(request, data.histories[1][5].item, [0, 2, 4, 6], seed=seed)
        assert "movie" not in example.instruction.text(lambda i: data.items[i].title)


def test_a_titles_only_catalogue_trains_and_serves(tmp_path) -> None:
    from instructrec import experiment
    from instructrec.catalogue import Catalogue
    from instructrec.model.reranker import Reranker
    from instructrec.planner import OfflinePlanner
    from instructrec.retrieval.sasrec import SASRecConfig
    from instructrec.serving.scorer import ServingScorer
    from instructrec.serving.wire import encode_request

    data = games()
    layout = Artifacts(tmp_path / "games")
    config = experiment.PipelineConfig(
        sasrec=SASRecConfig(epochs=2, eval_every=1, patience=1, d=16, max_len=20),
        encoder_layers=1,
        decoder_layers=1,
        k=6,
    )
    config.train.epochs, config.train.candidates, config.train.positions_per_user = 1, 6, 2
    experiment.fit(data, layout, config, verbose=False)
    assert layout.trained and Catalogue.load(layout.catalogue).nouns == GAMES

    planner = OfflinePlanner.load(layout, data)
    history = [x.item for x in data.histories[2][:-1]]
    result = planner.plan(history, n=6)
    assert len(result.candidates) == 6 and not set(c.row for c in result.candidates) & set(history)
    rows = [c.row for c in result.candidates]
    ins = request_instruction(data.histories[2][:-1], rows, seed=1, nouns=data.nouns)
    request = encode_request(
        ins,
        lambda i: data.items[i].id,
        lambda i: data.items[i].display_title,
        text_of=lambda i: planner.catalogue.describe(i),
    )
    [scores] = ServingScorer(Reranker.from_pretrained(layout.best_reranker)).score([request])
    assert scores.shape == (6,) and np.isfinite(scores).all()
