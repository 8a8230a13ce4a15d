"""Shared fixtures: the real broker, Triton and Qdrant storage, started once per session on demand.

Nothing runs before the tests. The first test that asks for a service starts it on free loopback ports
under a temporary state directory; the session's end stops everything by pid, whether tests passed or not.
A test that needs only Kafka never starts Triton.

    def test_x(kafka_settings): ...          # the broker (topics pre-created)   -> KafkaSettings
    def test_y(triton): ...                  # tritonserver with the health model -> TritonState (.grpc_url, .http_url)
    def test_z(qdrant_path): ...             # an embedded-Qdrant storage folder  -> Path
    def test_all(infra): ...                 # everything; infra.settings points at it
    local_infra.start_triton(models=[...])   # load more models into the session's server
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from instructrec.adapters.triton.repository import copy_repository, default_repository
from instructrec.config import InfraSettings, KafkaSettings, QdrantSettings, Settings
from instructrec.infra import Component, Infrastructure, KafkaState, State, TritonState

# Set while conftest loads, before any test module imports huggingface_hub or transformers (the imports
# above do not): nothing may wait on a hub that cannot be reached.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test (`-m "not integration"` skips them)."""
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


class LocalInfra:
    """The session's services; each starts on first use and is reused after that."""

    def __init__(self, root: Path):
        self.root = root
        # Triton serves a copy of deploy/triton (configs and backend code, no weights): tests export model
        # versions into `model_repository` and load them, and the checkout stays untouched.
        self.model_repository = copy_repository(default_repository(), root / "model_repository")
        # Default infra settings whatever the environment says: free ports, that repository copy.
        self.base = Settings(
            state_dir=root / "state",
            qdrant=QdrantSettings(path=root / "qdrant"),
            infra=InfraSettings(model_repository=self.model_repository),
        )
        self.infrastructure = Infrastructure(self.base)
        self._lock = threading.Lock()

    @property
    def state_dir(self) -> Path:
        return self.base.state_dir

    @property
    def state(self) -> State:
        return self.infrastructure.state()

    @property
    def settings(self) -> Settings:
        """Settings pointed at whatever has been started so far."""
        return self.state.settings(self.base)

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (`instructrec ...`) that should use the session's services."""
        return {**os.environ, "INSTRUCTREC_STATE_DIR": str(self.state_dir), **self.state.env(self.base)}

    def start(self, *components: Component, models: Iterable[str] | None = None) -> State:
        with self._lock:
            return self.infrastructure.up(components=components, models=models)

    def start_kafka(self) -> KafkaState:
        state = self.start("kafka")
        assert state.kafka is not None
        return state.kafka

    def start_triton(self, models: Iterable[str] | None = None) -> TritonState:
        """Start Triton (or load `models` into the running one; explicit model control)."""
        wanted = list(models) if models is not None else self.base.infra.models
        running = self.state.triton
        state = self.start("triton", models=[*(running.models if running else []), *wanted])
        assert state.triton is not None
        return state.triton

    def start_qdrant(self) -> Path:
        state = self.start("qdrant")
        assert state.qdrant is not None
        return state.qdrant.path

    def stop(self) -> None:
        report = self.infrastructure.down()
        assert report.ok, f"the session's infrastructure did not stop cleanly: {report.problems}"


@pytest.fixture(scope="session")
def local_infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInfra]:
    """Starts nothing itself; stops whatever the session started, even when tests fail."""
    handle = LocalInfra(tmp_path_factory.mktemp("infra"))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def kafka(local_infra: LocalInfra) -> KafkaState:
    return local_infra.start_kafka()


@pytest.fixture(scope="session")
def kafka_settings(local_infra: LocalInfra, kafka: KafkaState) -> KafkaSettings:
    """The configured Kafka settings (topics, partitions) pointed at the session's broker."""
    return local_infra.settings.kafka


@pytest.fixture(scope="session")
def triton(local_infra: LocalInfra) -> TritonState:
    return local_infra.start_triton()


@pytest.fixture(scope="session")
def qdrant_path(local_infra: LocalInfra) -> Path:
    return local_infra.start_qdrant()


@pytest.fixture(scope="session")
def infra(local_infra: LocalInfra, kafka: KafkaState, triton: TritonState, qdrant_path: Path) -> LocalInfra:
    """Everything running; `infra.settings` points at it and `infra.env()` does for a subprocess."""
    return local_infra
