"""Fixtures of the stream's integration tests (a module that asks for `worker` gets its own worker on its
own topics: see `tests.integration.pipeline.stream_settings`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructrec.adapters.triton import repository as triton_repository
from instructrec.config import Settings
from instructrec.infra import free_port
from instructrec.infra.worker import WorkerProcess
from tests.integration.pipeline import DATA_ROOT, MODEL, TIMEOUT_S, stream_settings

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dataset():
    from instructrec.data import load

    if not (DATA_ROOT / "ml-latest-small").is_dir():
        pytest.skip(f"ml-latest-small not found under {DATA_ROOT}")
    return load("ml-latest-small", root=DATA_ROOT)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, dataset) -> Path:
    """A SASRec that was never trained (vectors from its initialisation), popularity counts and the
    catalogue's attributes, laid out as training writes them."""
    from instructrec.catalogue import Catalogue
    from instructrec.retrieval.popularity import Popularity
    from instructrec.retrieval.sasrec import SASRec, SASRecConfig, SASRecNet

    root = tmp_path_factory.mktemp("artifacts")
    folder = root / "ml-latest-small"
    config = SASRecConfig(n_items=dataset.n_items, max_len=50)
    SASRec(config=config, net=SASRecNet(config).eval()).save(folder / "retrievers" / "sasrec")
    (folder / "retrievers" / "sasrec" / "item_ids.json").write_text(json.dumps([i.id for i in dataset.items]))
    Popularity().fit_sequences([dataset.sequence(u) for u in range(dataset.n_users)], dataset.n_items).save(
        folder / "retrievers" / "popularity"
    )
    (folder / "pipeline.json").write_text(json.dumps({"retriever": "sasrec", "fusion_weight": 0.3}))
    Catalogue.from_dataset(dataset).save(folder / "catalogue.json")
    return root


@pytest.fixture(scope="module")
def reranker_version(local_infra, triton, tmp_path_factory: pytest.TempPathFactory):
    """The offline default reranker exported as a new version and loaded into the session's Triton."""
    from instructrec.model.reranker import default_model

    saved = tmp_path_factory.mktemp("reranker") / "model"
    default_model().save_pretrained(saved)
    folder = triton_repository.export_version(saved, local_infra.model_repository, link=True)
    state = local_infra.start_triton(models=[MODEL])
    # Loaded again whatever `up` found: a module before this one may have left the model loaded (or still
    # unloading), serving its own, older version. Explicit model control loads the newest version.
    import tritonclient.http as httpclient

    httpclient.InferenceServerClient(state.http_url, network_timeout=TIMEOUT_S).load_model(MODEL)
    yield folder.name
    url = local_infra.state.triton.http_url  # a test may have restarted Triton on other ports
    httpclient.InferenceServerClient(url, network_timeout=TIMEOUT_S).unload_model(MODEL)


@pytest.fixture(scope="module")
def settings(local_infra, kafka, reranker_version, artifacts, tmp_path_factory) -> Settings:
    base = local_infra.settings
    base = base.model_copy(update={"stream": base.stream.model_copy(update={"dataset": "ml-latest-small"})})
    return stream_settings(base, tmp_path_factory.mktemp("stream"), artifacts=artifacts)


@pytest.fixture(scope="module")
def worker(settings: Settings) -> WorkerProcess:
    with WorkerProcess(settings, web_port=free_port(), log=settings.state_dir / "worker.log") as process:
        process.wait_healthy(TIMEOUT_S)
        yield process
