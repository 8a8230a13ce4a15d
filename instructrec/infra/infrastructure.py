"""Start, stop and check the local services of one state directory (see the package docstring)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructrec.adapters.triton.repository import default_repository
from instructrec.config import KafkaSettings, Settings
from instructrec.infra.errors import InfraError
from instructrec.infra.kafka import find_noida_db, noida_command
from instructrec.infra.ports import pick_ports, port_open
from instructrec.infra.processes import ManagedProcess, run_sync, spawn, stop_process, wait_until_ready
from instructrec.infra.qdrant import prepare_qdrant_storage, qdrant_local_status, qdrant_server_status
from instructrec.infra.state import (
    COMPONENTS,
    STATE_FILE,
    Component,
    KafkaState,
    QdrantState,
    State,
    TritonState,
)
from instructrec.infra.status import ComponentStatus, reason
from instructrec.infra.triton import (
    SHM_DIR,
    SHM_PATTERN,
    TMP_DIR,
    TMP_PATTERN,
    find_triton,
    glob_names,
    mapped_shm_files,
    other_triton_servers,
    prepare_backend_dir,
    remove_path,
    stub_regions,
    triton_client,
    triton_command,
    triton_env,
    triton_leftovers,
    triton_models_ready,
)
from streams.kafka.admin import ensure_topics, kafka_metadata

log = logging.getLogger(__name__)


@dataclass
class DownReport:
    stopped: dict[str, str] = field(default_factory=dict)  # component -> what happened
    removed: list[Path] = field(default_factory=list)  # Triton leftovers cleaned up
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Infrastructure:
    """Start, stop and check the local services for one state directory.

    The services `up` starts die with the process that called it (tests, benchmarks, the demo: one killed on a
    timeout leaves no broker or Triton behind), unless `detached`: then they outlive it until `down`, which is
    what `instructrec infra up` wants. Tied is the default because it fails safe: a caller that forgets
    `detached=True` finds its services gone when it exits and notices at once, while a forgotten
    `detached=False` would leave orphans nobody sees. Call `up` from the main thread (see `die_with_parent`).
    """

    def __init__(self, settings: Settings, *, detached: bool = False):
        self.settings = settings
        self.detached = detached
        self.infra = settings.infra
        self.state_dir = settings.state_dir

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def state(self) -> State:
        return State.load(self.state_path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[State]:
        """Serialise up/down on one state directory (two terminals, parallel test sessions)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / ".infra.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self.state()

    # -- up

    def up(self, components: Iterable[Component] = COMPONENTS, models: Iterable[str] | None = None) -> State:
        """Start what is not already running (idempotent) and return the state of everything managed."""
        wanted = _validate_components(components)
        with self._locked() as state:
            if "kafka" in wanted:
                state.kafka = self._keep_or_start(state.kafka, self._start_kafka, "kafka")
                state.save(self.state_path)  # before anything else can fail: `down` must know the pid
                run_sync(ensure_topics(state.settings(self.settings).kafka))
            if "triton" in wanted:
                models = list(dict.fromkeys(models if models is not None else self.infra.models))
                if state.triton and state.triton.is_running():
                    try:
                        self._load_models(state.triton, models)
                    finally:
                        state.save(self.state_path)  # the models that did load are served
                else:
                    state.triton = self._start_triton(models)
                    state.save(self.state_path)
            if "qdrant" in wanted and self.settings.qdrant.url is None:
                path = _absolute(self.settings.qdrant.path)
                prepare_qdrant_storage(path)
                state.qdrant = QdrantState(path=path)
                state.save(self.state_path)
            return state

    def _keep_or_start(self, current, start: Callable[[], Any], name: str):
        if current is not None and current.is_running():
            log.info("%s already running (pid %s)", name, current.pid)
            return current
        return start()

    def _start_kafka(self) -> KafkaState:
        binary = find_noida_db(self.infra.noida_db)
        port = pick_ports("Kafka", {"broker": self.infra.kafka_port})["broker"]
        data_dir = self.state_dir / "kafka"
        log_path = self.state_dir / "logs" / "kafka.log"
        started_at = time.time()
        pid, ticks = spawn(noida_command(binary, port, data_dir), log_path, detached=self.detached)
        state = KafkaState(
            pid=pid, start_ticks=ticks, log=log_path, started_at=started_at, port=port, data_dir=data_dir
        )
        probe = KafkaSettings(broker=state.broker, request_timeout_s=2.0)
        self._await_ready(
            state, lambda: port_open(port) and _kafka_answers(probe), "the Kafka broker (noida-db)"
        )
        return state

    def _start_triton(self, models: list[str]) -> TritonState:
        distribution = find_triton(self.infra.tritonserver)
        repository = _absolute(self.infra.model_repository or default_repository())
        missing = [model for model in models if not (repository / model / "config.pbtxt").is_file()]
        if missing:
            raise InfraError(f"no such model in the Triton repository {repository}: {', '.join(missing)}")
        ports = pick_ports(
            "Triton",
            {
                "http": self.infra.triton_http_port,
                "grpc": self.infra.triton_grpc_port,
                "metrics": self.infra.triton_metrics_port,
            },
        )
        backend_dir = prepare_backend_dir(distribution, self.state_dir / "triton" / "backends")
        log_path = self.state_dir / "logs" / "triton.log"
        command = triton_command(
            distribution, model_repository=repository, backend_dir=backend_dir, ports=ports, models=models
        )
        shm_before, tmp_before = glob_names(SHM_DIR, SHM_PATTERN), glob_names(TMP_DIR, TMP_PATTERN)
        started_at = time.time()
        pid, ticks = spawn(command, log_path, triton_env(distribution), detached=self.detached)
        state = TritonState(
            pid=pid,
            start_ticks=ticks,
            log=log_path,
            started_at=started_at,
            http_port=ports["http"],
            grpc_port=ports["grpc"],
            metrics_port=ports["metrics"],
            models=models,
            model_repository=repository,
            backend_dir=backend_dir,
            shm_before=shm_before,
            tmp_before=tmp_before,
        )
        self._await_ready(state, lambda: triton_models_ready(state.http_url, models), "tritonserver")
        return state

    def _await_ready(self, state: ManagedProcess, ready: Callable[[], bool], what: str) -> None:
        try:
            wait_until_ready(ready, state, what, self.infra.start_timeout_s)
        except BaseException:
            # Never leave a half-started process behind that no state file knows about.
            stop_process(state, self.infra.stop_timeout_s)
            if isinstance(state, TritonState):
                self._clean_triton_leftovers(state, stub_regions(state.pid))
            raise

    def _load_models(self, triton: TritonState, models: list[str]) -> None:
        """Explicit mode: load the models the running server does not serve (load_model blocks until ready).

        The server is asked, not the state file: a worker may have loaded or unloaded models since `up`.
        """
        from tritonclient.utils import InferenceServerException

        client = triton_client(triton.http_url, self.infra.start_timeout_s)
        try:
            for model in models:
                try:
                    if not client.is_model_ready(model):
                        client.load_model(model)
                except InferenceServerException as error:
                    raise InfraError(f"Triton could not load {model}: {error}; see {triton.log}") from None
                triton.models = list(dict.fromkeys([*triton.models, model]))
        finally:
            client.close()

    # -- down

    def down(self, components: Iterable[Component] = COMPONENTS) -> DownReport:
        """Stop exactly the processes `up` recorded, then remove what Triton left behind."""
        wanted = _validate_components(components)
        report = DownReport()
        with self._locked() as state:
            if "triton" in wanted and state.triton:
                self._stop_triton(state.triton, report)
                state.triton = None
            if "kafka" in wanted and state.kafka:
                report.stopped["kafka"] = self._stop(state.kafka, report, "kafka")
                state.kafka = None
            if "qdrant" in wanted and state.qdrant:
                # Embedded storage has no process; its data stays for the next `up`.
                report.stopped["qdrant"] = f"storage kept at {state.qdrant.path}"
                state.qdrant = None
            if state.is_empty():
                self.state_path.unlink(missing_ok=True)
            else:
                state.save(self.state_path)
        return report

    def _stop(self, process: ManagedProcess, report: DownReport, name: str) -> str:
        try:
            return stop_process(process, self.infra.stop_timeout_s)
        except InfraError as error:
            report.problems.append(f"{name}: {error}")
            return "still running"

    def _stop_triton(self, triton: TritonState, report: DownReport) -> None:
        regions = stub_regions(triton.pid)  # read before the stubs exit with their server
        report.stopped["triton"] = self._stop(triton, report, "triton")
        report.removed += self._clean_triton_leftovers(triton, regions)

    def _clean_triton_leftovers(self, triton: TritonState, regions: set[str]) -> list[Path]:
        leftovers = triton_leftovers(
            triton, regions, others_running=bool(other_triton_servers(triton.pid)), in_use=mapped_shm_files()
        )
        for path in leftovers:
            remove_path(path)
        return leftovers

    # -- status

    def status(self) -> list[ComponentStatus]:
        """Ask every service for real: managed ones at their recorded address, others as configured."""
        state = self.state()
        return [self._kafka_status(state), self._triton_status(state), self._qdrant_status(state)]

    def _kafka_status(self, state: State) -> ComponentStatus:
        kafka = state.settings(self.settings).kafka.model_copy(update={"request_timeout_s": 3.0})
        status = ComponentStatus("kafka", False, "down", kafka.broker, _pid(state.kafka))
        if state.kafka and not state.kafka.is_running():
            status.detail = f"pid {state.kafka.pid} has exited; see {state.kafka.log}"
            return status
        try:
            metadata = run_sync(kafka_metadata(kafka))
        except Exception as error:  # report any failure as "down", with the reason
            status.detail = reason(error)
            return status
        app_topics = kafka.topics.all()
        present = [topic for topic in app_topics if topic in metadata["topics"]]
        status.healthy, status.state = True, "up"
        status.detail = f"{len(metadata['brokers'])} broker(s); app topics {len(present)}/{len(app_topics)}"
        return status

    def _triton_status(self, state: State) -> ComponentStatus:
        triton = state.triton
        url = triton.http_url if triton else self.settings.triton.url
        status = ComponentStatus("triton", False, "down", url, _pid(triton))
        if triton and not triton.is_running():
            status.detail = f"pid {triton.pid} has exited; see {triton.log}"
            return status
        try:
            ready, models = self._triton_readiness(url, triton)
        except Exception as error:  # report any failure as "down", with the reason
            status.detail = reason(error)
            return status
        not_ready = [model for model, ok in models.items() if not ok]
        status.healthy = ready and not not_ready
        status.state = "up" if status.healthy else "down"
        status.detail = (
            ("models not ready: " + ", ".join(not_ready))
            if not_ready
            else ("ready: " + (", ".join(models) or "no models loaded"))
        )
        if triton:
            status.address = f"grpc {triton.grpc_url} · http {triton.http_url}"
        return status

    def _triton_readiness(self, url: str, triton: TritonState | None) -> tuple[bool, dict[str, bool]]:
        timeout_s = self.settings.triton.timeout_s
        timeouts: dict[str, float] = {}
        if triton is None and self.settings.triton.protocol == "grpc":
            import tritonclient.grpc

            client = tritonclient.grpc.InferenceServerClient(url)
            timeouts = {"client_timeout": timeout_s}  # the gRPC client takes its deadline per call
        else:
            client = triton_client(url, timeout_s)
        try:
            ready = client.is_server_ready(**timeouts)
            if triton:
                return ready, {model: client.is_model_ready(model) for model in triton.models}
            # An external server: report what it serves rather than what we would have loaded.
            index = client.get_model_repository_index(**timeouts)
            entries = index.models if hasattr(index, "models") else index
            served = [_field(entry, "name") for entry in entries if _field(entry, "state") == "READY"]
            return ready, dict.fromkeys(served, True)
        finally:
            client.close()

    def _qdrant_status(self, state: State) -> ComponentStatus:
        qdrant = state.settings(self.settings).qdrant
        if qdrant.url:
            return qdrant_server_status(qdrant.url, qdrant.api_key, qdrant.timeout_s)
        return qdrant_local_status(_absolute(qdrant.path))


def _validate_components(components: Iterable[str]) -> set[str]:
    wanted = set(components)
    unknown = wanted - set(COMPONENTS)
    if unknown:
        raise InfraError(
            f"unknown component(s) {', '.join(sorted(unknown))}; choose from {', '.join(COMPONENTS)}"
        )
    return wanted


def _absolute(path: Path) -> Path:
    return path.expanduser().resolve()


def _pid(process: ManagedProcess | None) -> int | None:
    return process.pid if process else None


def _field(entry: Any, name: str) -> Any:
    return entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)


def _kafka_answers(kafka: KafkaSettings) -> bool:
    try:
        run_sync(kafka_metadata(kafka))
    except Exception:  # any failure means "not yet": start-up keeps polling until its deadline
        return False
    return True
