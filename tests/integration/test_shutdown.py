"""No orphans, prompt shutdown: nothing the project starts outlives the process that started it, and a worker
stops within its shutdown timeout on SIGTERM even when the broker is already gone.

- A parent script that starts the broker, Triton and a stream worker through the project's API, and has no
  clean-up of its own, is killed (SIGKILL, SIGTERM, SIGINT): its children and theirs stop within the workers'
  shutdown timeout, tied to it by the parent-death signal (`instructrec.infra.processes.die_with_parent`).
- tritonserver SIGKILLed: its Python backend stubs go with it.
- A stream worker, then the fine-tune worker, SIGTERMed after their broker stopped: each exits within its
  shutdown timeout, cleanly (exit code 0); the test prints how long it took.

Every process is recognised by (pid, start time), never by name: a benchmark's broker or Triton may be running
beside the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from instructrec.config import FinetuneSettings, QdrantSettings, Settings
from instructrec.infra import FinetuneProcess, Infrastructure, WorkerProcess, free_port
from instructrec.infra.processes import is_running, process_start_ticks, session_members, tail
from instructrec.infra.triton import mapped_shm_files, remove_path, stub_regions
from tests.integration.test_finetune import artifacts, dataset, root  # noqa: F401 (module fixtures)
from workers.finetune.store import peek
from workers.finetune.worker import store_path
from workers.replay import ReplayConfig, replay, replay_events

pytestmark = pytest.mark.integration

SHUTDOWN_S = 8.0  # the workers' shutdown timeout here: short, so that a stop it cuts short costs little
MARGIN_S = 10.0  # the process's own exit, on two busy cores
START_TIMEOUT_S = 240.0

# A parent with no clean-up of its own: whatever stops its children after it dies is their tie to it.
PARENT = """
import json, signal, sys, time
from pathlib import Path
# A shell's background job starts with SIGINT ignored, and Python keeps an ignored SIGINT: interruptible here.
signal.signal(signal.SIGINT, signal.default_int_handler)
from instructrec.config import QdrantSettings, Settings
from instructrec.infra import Infrastructure, WorkerProcess, free_port

root, shutdown_s = Path(sys.argv[1]), float(sys.argv[2])
base = Settings(state_dir=root / "state", qdrant=QdrantSettings(path=root / "qdrant"))
state = Infrastructure(base).up(["kafka", "triton", "qdrant"])
settings = state.settings(base)
settings = settings.model_copy(update={"stream": settings.stream.model_copy(update={"store": "memory"})})
worker = WorkerProcess(settings, web_port=free_port(), log=root / "worker.log", shutdown_timeout_s=shutdown_s)
worker.start().wait_healthy(240)
started = {"kafka": state.kafka.pid, "triton": state.triton.pid, "worker": worker.process.pid}
(root / "started.tmp").write_text(json.dumps(started))
(root / "started.tmp").rename(root / "started.json")
time.sleep(600)
"""

Process = tuple[int, int]  # (pid, start ticks)


def _with_ticks(pid: int) -> Process | None:
    ticks = process_start_ticks(pid)
    return None if ticks is None else (pid, ticks)


def _with_descendants(pid: int) -> list[Process]:
    """The process and the members of the session it leads (every child we start leads its own)."""
    ticks = process_start_ticks(pid)
    if ticks is None:
        return []
    found = [_with_ticks(p) for p in [pid, *session_members(pid, ticks)]]
    return [p for p in found if p is not None]


def _running(processes: list[Process]) -> list[Process]:
    return [p for p in processes if is_running(*p)]


def _wait_gone(processes: list[Process], timeout_s: float) -> list[Process]:
    """What is still running after `timeout_s` (nothing, normally)."""
    deadline = time.monotonic() + timeout_s
    while _running(processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _running(processes)


def _kill(processes: list[Process]) -> None:
    """Clean-up after a failure: only the processes this test recorded, by (pid, start time)."""
    for pid, _ in _running(processes):
        with contextlib.suppress(ProcessLookupError):  # it may exit between the check and the kill
            os.kill(pid, signal.SIGKILL)


def _wait_for_file(path: Path, parent: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        if parent.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the parent did not start its children; the end of {log}:\n{tail(log, 40)}")
        time.sleep(0.2)
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ dies with parent


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_nothing_outlives_a_killed_parent(tmp_path: Path, sig: signal.Signals) -> None:
    log = tmp_path / "parent.log"
    with log.open("wb") as out:
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT, str(tmp_path), str(SHUTDOWN_S)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    children: list[Process] = []
    try:
        started = _wait_for_file(tmp_path / "started.json", parent, log)
        children = [p for pid in started.values() for p in _with_descendants(pid)]
        assert len(children) > len(started), "tritonserver should have started a backend stub"
        parent.send_signal(sig)
        parent.wait(30)
        began = time.monotonic()
        left = _wait_gone(children, SHUTDOWN_S + MARGIN_S)
        print(f"parent {sig.name}: {len(children)} descendants gone in {time.monotonic() - began:.1f} s")
        assert not left, f"still running {SHUTDOWN_S + MARGIN_S:.0f} s after the parent's {sig.name}: {left}"
    finally:
        parent.kill()
        parent.wait(30)
        _kill(children)


# ------------------------------------------------------------------------------------------- Triton's stubs


@pytest.fixture
def own_triton(tmp_path: Path) -> Iterator[Infrastructure]:
    """A tritonserver of this test's own (the session's is shared: it must not be killed)."""
    infrastructure = Infrastructure(Settings(state_dir=tmp_path / "infra"))
    yield infrastructure
    infrastructure.down()


def test_the_backend_stubs_die_with_a_sigkilled_tritonserver(own_triton: Infrastructure) -> None:
    server = own_triton.up(["triton"]).triton
    stubs = _with_descendants(server.pid)[1:]
    assert stubs, "the health model's Python backend should run in a stub process"
    regions = stub_regions(server.pid)
    os.kill(server.pid, signal.SIGKILL)
    began = time.monotonic()
    # Reaped, as its parent does (stop_process here, init after our death): a stub takes a zombie server for
    # a live one and stays (measured: still there 10 s after the kill of an unreaped server).
    with contextlib.suppress(ChildProcessError):  # subprocess may have reaped it first
        os.waitpid(server.pid, 0)
    left = _wait_gone(stubs, 10.0)
    print(f"tritonserver SIGKILL: {len(stubs)} stub(s) gone in {time.monotonic() - began:.2f} s")
    assert not left, f"backend stubs outlived their server: {left}"
    # A killed server cleans nothing up: remove the shared memory its stubs named, now unmapped.
    for name in regions - mapped_shm_files():
        remove_path(Path("/dev/shm") / name)


# ----------------------------------------------------------------------------- SIGTERM with the broker gone


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infrastructure]:
    """A broker of this module's own, which its tests stop (the session's is shared)."""
    root_dir = tmp_path_factory.mktemp("shutdown")
    infrastructure = Infrastructure(
        Settings(state_dir=root_dir / "infra", qdrant=QdrantSettings(path=root_dir / "qdrant"))
    )
    yield infrastructure
    infrastructure.down()


def _running_broker(own_broker: Infrastructure, tmp_path: Path) -> Settings:
    """Settings on a running broker (a test before this one stopped it), Triton nowhere: answers degrade."""
    settings = own_broker.up(["kafka"]).settings(own_broker.settings)
    return settings.model_copy(
        update={
            "state_dir": tmp_path / "state",
            "qdrant": settings.qdrant.model_copy(update={"path": tmp_path / "qdrant"}),
            "triton": settings.triton.model_copy(update={"url": f"127.0.0.1:{free_port()}", "retries": 0}),
        }
    )


def _stop_broker_then_sigterm(own_broker: Infrastructure, process: subprocess.Popen, log: Path) -> None:
    assert own_broker.down(["kafka"]).ok
    time.sleep(2.0)  # the clients notice: fetches fail and back off, metadata refreshes fail
    assert process.poll() is None, f"the worker exited with the broker; the end of {log}:\n{tail(log, 40)}"
    process.send_signal(signal.SIGTERM)
    began = time.monotonic()
    try:
        code = process.wait(SHUTDOWN_S + MARGIN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(
            f"still running {SHUTDOWN_S + MARGIN_S:.0f} s after SIGTERM; the end of {log}:\n{tail(log, 40)}"
        ) from None
    took = time.monotonic() - began
    print(f"{log.stem}: exit code {code} {took:.1f} s after SIGTERM (shutdown timeout {SHUTDOWN_S:.0f} s)")
    assert took <= SHUTDOWN_S + MARGIN_S
    # A clean stop, not the deadline's cut (exit 75): the hang's cause is fixed (compat.close_fetcher_quietly).
    assert code == 0, f"exit code {code} (75: cut short by the deadline); the end of {log}:\n{tail(log, 40)}"


def test_a_stream_worker_stops_promptly_after_its_broker(own_broker: Infrastructure, tmp_path: Path) -> None:
    settings = _running_broker(own_broker, tmp_path)
    stream = settings.stream.model_copy(
        update={"store": "memory", "app_id": f"shutdown-{uuid.uuid4().hex[:8]}"}
    )
    settings = settings.model_copy(update={"stream": stream})
    worker = WorkerProcess(
        settings, web_port=free_port(), log=tmp_path / "worker.log", shutdown_timeout_s=SHUTDOWN_S
    )
    with worker:
        worker.wait_healthy(START_TIMEOUT_S)
        _stop_broker_then_sigterm(own_broker, worker.process, worker.log)


def test_the_finetune_worker_stops_promptly_after_its_broker(
    own_broker: Infrastructure,
    tmp_path: Path,
    artifacts: Path,  # noqa: F811 (test_finetune's fixture, imported above)
    dataset,  # noqa: F811
) -> None:
    settings = _running_broker(own_broker, tmp_path)
    (tmp_path / "repository").mkdir()  # serves nothing: no version for the worker to reconcile
    settings = settings.model_copy(
        update={
            "model": settings.model.model_copy(update={"artifacts": artifacts}),
            "stream": settings.stream.model_copy(update={"dataset": dataset.name}),
            "triton": settings.triton.model_copy(update={"repository": tmp_path / "repository"}),
            "finetune": FinetuneSettings(group_id=f"finetune-{uuid.uuid4().hex[:8]}", nice=0, poll_s=0.5),
        }
    )
    finetune = FinetuneProcess(settings, log=tmp_path / "finetune.log", shutdown_timeout_s=SHUTDOWN_S)
    with finetune:
        # Polling for real: clicks go in, examples come out in its store.
        asyncio.run(replay(settings.kafka, replay_events(dataset, ReplayConfig(users=5, query_every=0))))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not peek(store_path(settings))["examples"]:
            assert finetune.running() and time.monotonic() < deadline, tail(finetune.log, 40)
            time.sleep(0.5)
        _stop_broker_then_sigterm(own_broker, finetune.process, finetune.log)
