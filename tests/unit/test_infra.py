"""The parts of the local infrastructure that need no broker or server: ports, state, errors, clean-up rules."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from instructrec import cli
from instructrec.config import InfraSettings, QdrantSettings, Settings
from instructrec.infra import (
    LOOPBACK,
    BinaryNotFoundError,
    InfraError,
    Infrastructure,
    KafkaState,
    ManagedProcess,
    PortInUseError,
    QdrantState,
    State,
    TritonState,
    free_ports,
)
from instructrec.infra import infrastructure as infrastructure_module
from instructrec.infra.kafka import find_noida_db
from instructrec.infra.ports import ensure_port_free, pick_ports
from instructrec.infra.processes import die_with_parent, is_running, spawn, stop_process
from instructrec.infra.qdrant import qdrant_lock_holder
from instructrec.infra.triton import (
    STUB_NAME,
    TritonDistribution,
    find_triton,
    prepare_backend_dir,
    triton_command,
    triton_leftovers,
)


@pytest.fixture
def listening() -> socket.socket:
    """A port some other program holds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen()
    yield sock
    sock.close()


def _settings(tmp_path: Path, **infra) -> Settings:
    return Settings(
        state_dir=tmp_path / "state", qdrant=QdrantSettings(path=tmp_path / "q"), infra=InfraSettings(**infra)
    )


def _triton_state(tmp_path: Path, **overrides) -> TritonState:
    fields = dict(
        pid=1234,
        start_ticks=99,
        log=tmp_path / "triton.log",
        started_at=time.time() - 5,
        http_port=8000,
        grpc_port=8001,
        metrics_port=8002,
        models=["health"],
        model_repository=tmp_path / "repo",
        backend_dir=tmp_path / "backends",
    )
    return TritonState(**{**fields, **overrides})


# ------------------------------------------------------------------------------------------------- ports


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        ensure_port_free(port, "test")


def test_a_taken_port_is_a_readable_error(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    with pytest.raises(PortInUseError, match=rf"Kafka broker port {port} on 127\.0\.0\.1 is already in use"):
        pick_ports("Kafka", {"broker": port})


def test_pick_ports_keeps_configured_ports_and_fills_in_zeros() -> None:
    configured = free_ports(1)[0]
    ports = pick_ports("Triton", {"a": configured, "b": 0, "c": 0})
    assert ports["a"] == configured
    assert len({ports["a"], ports["b"], ports["c"]}) == 3


# ------------------------------------------------------------------------------------------------- state


def test_state_file_round_trip(tmp_path: Path) -> None:
    state = State(
        kafka=KafkaState(
            pid=10, start_ticks=5, log=tmp_path / "k.log", started_at=1.5, port=9999, data_dir=tmp_path / "k"
        ),
        triton=_triton_state(tmp_path, shm_before=["triton_python_backend_x"], tmp_before=["folderA"]),
        qdrant=QdrantState(path=tmp_path / "q"),
    )
    path = tmp_path / "state" / "infra.json"
    state.save(path)
    assert State.load(path) == state
    assert not path.with_suffix(".tmp").exists()


def test_a_missing_state_file_is_an_empty_state(tmp_path: Path) -> None:
    assert State.load(tmp_path / "nope.json").is_empty()


def test_a_corrupt_state_file_is_a_readable_error(tmp_path: Path) -> None:
    path = tmp_path / "infra.json"
    path.write_text("{not json")
    with pytest.raises(InfraError, match="unreadable"):
        State.load(path)


def test_state_points_settings_and_subprocesses_at_the_managed_services(tmp_path: Path) -> None:
    base = _settings(tmp_path)
    state = State(
        kafka=KafkaState(
            pid=1, start_ticks=1, log=tmp_path / "l", started_at=0, port=4242, data_dir=tmp_path
        ),
        triton=_triton_state(tmp_path, grpc_port=5151, http_port=5252),
        qdrant=QdrantState(path=tmp_path / "storage"),
    )
    pointed = state.settings(base)
    assert pointed.kafka.bootstrap_servers == "127.0.0.1:4242"
    assert pointed.kafka.partitions == base.kafka.partitions
    assert pointed.triton.url == "127.0.0.1:5151"  # gRPC is the configured protocol
    assert pointed.qdrant.path == tmp_path / "storage"
    assert state.env(base) == {
        "INSTRUCTREC_KAFKA__BROKER": "kafka://127.0.0.1:4242",
        "INSTRUCTREC_TRITON__URL": "127.0.0.1:5151",
        "INSTRUCTREC_QDRANT__PATH": str(tmp_path / "storage"),
    }


# ------------------------------------------------------------------------------------------------ errors


def test_a_missing_binary_is_a_readable_error(tmp_path: Path) -> None:
    with pytest.raises(BinaryNotFoundError, match="noida-db not found at"):
        find_noida_db(tmp_path / "noida-db")
    with pytest.raises(BinaryNotFoundError, match="tritonserver not found at"):
        find_triton(tmp_path / "tritonserver")


def test_up_with_a_missing_binary_starts_nothing(tmp_path: Path) -> None:
    infrastructure = Infrastructure(_settings(tmp_path, noida_db=tmp_path / "missing"))
    with pytest.raises(BinaryNotFoundError):
        infrastructure.up(components=["kafka"])
    assert infrastructure.state().kafka is None


def test_up_on_a_taken_port_starts_nothing(tmp_path: Path, listening: socket.socket) -> None:
    infrastructure = Infrastructure(_settings(tmp_path, kafka_port=listening.getsockname()[1]))
    with pytest.raises(PortInUseError):
        infrastructure.up(components=["kafka"])
    assert infrastructure.state().kafka is None


def test_the_cli_prints_errors_without_a_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("INSTRUCTREC_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("INSTRUCTREC_INFRA__NOIDA_DB", str(tmp_path / "missing"))
    assert cli.main(["infra", "up", "--only", "kafka"]) == 2
    err = capsys.readouterr().err
    assert "noida-db not found" in err
    assert "Traceback" not in err


def test_unknown_components_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="unknown component"):
        Infrastructure(_settings(tmp_path)).up(components=["redis"])


# -------------------------------------------------------------------------------------------- processes


def test_stop_never_signals_a_process_that_reused_the_pid(tmp_path: Path) -> None:
    pid, ticks = spawn([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "sleep.log")
    stale = ManagedProcess(pid=pid, start_ticks=ticks - 1, log=tmp_path / "sleep.log", started_at=0)
    assert stop_process(stale, timeout_s=1) == "was not running"
    current = ManagedProcess(pid=pid, start_ticks=ticks, log=tmp_path / "sleep.log", started_at=0)
    assert current.is_running()
    assert stop_process(current, timeout_s=5) == "stopped"
    assert not current.is_running()


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    log = tmp_path / "stubborn.log"
    pid, ticks = spawn([sys.executable, "-c", ignore_term], log)
    deadline = time.monotonic() + 10
    while "ready" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    process = ManagedProcess(pid=pid, start_ticks=ticks, log=log, started_at=0)
    assert stop_process(process, timeout_s=0.5).startswith("killed")
    assert not process.is_running()


# A parent that starts a child with `spawn` (tied or detached), prints its pid and start ticks, then waits.
PARENT = """
import sys, time
from pathlib import Path
from instructrec.infra.processes import spawn
pid, ticks = spawn(["sleep", "60"], Path(sys.argv[1]), detached=sys.argv[2] == "detached")
print(pid, ticks, flush=True)
time.sleep(60)
"""


def _child_of_signalled_parent(tmp_path: Path, how: str, sig: signal.Signals) -> tuple[int, int]:
    """Start PARENT, signal it once its child runs, wait until it has exited -> the child's (pid, ticks)."""
    command = [sys.executable, "-c", PARENT, str(tmp_path / "child.log"), how]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as parent:
        try:
            pid, ticks = map(int, parent.stdout.readline().split())
        finally:
            parent.send_signal(sig)  # leaving the block waits for its exit
    return pid, ticks


def _gone_within(pid: int, ticks: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_running(pid, ticks):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_spawned_child_dies_with_its_parent(tmp_path: Path, sig: signal.Signals) -> None:
    pid, ticks = _child_of_signalled_parent(tmp_path, "tied", sig)
    assert _gone_within(pid, ticks, 5.0), f"pid {pid} outlived its parent's {sig.name}"


def test_a_detached_child_outlives_its_parent(tmp_path: Path) -> None:
    pid, ticks = _child_of_signalled_parent(tmp_path, "detached", signal.SIGKILL)
    time.sleep(0.5)
    child = ManagedProcess(pid=pid, start_ticks=ticks, log=tmp_path / "child.log", started_at=0)
    assert child.is_running()
    assert stop_process(child, timeout_s=5) == "stopped"


def test_a_child_whose_parent_died_before_prctl_exits_instead_of_running() -> None:
    # The tie is prepared in this process; a forked child then spawns with it, so the grandchild finds a
    # parent other than the one the tie names: what a child sees when its parent died before the prctl.
    script = """
import os, subprocess, sys
from instructrec.infra.processes import die_with_parent
tie = die_with_parent()
print("own child", subprocess.run([sys.executable, "-c", "print('ran')"], preexec_fn=tie).returncode, flush=True)
pid = os.fork()
if pid == 0:
    os._exit(subprocess.run([sys.executable, "-c", "print('ran')"], preexec_fn=tie).returncode)
print("orphan", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["ran", "own child 0", "orphan 1"], done.stderr


def test_only_the_main_thread_may_spawn_a_tied_child() -> None:
    # PR_SET_PDEATHSIG follows the forking thread: a child of a short-lived thread would die with it.
    raised: list[BaseException] = []

    def prepare() -> None:
        try:
            die_with_parent()
        except InfraError as error:
            raised.append(error)

    thread = threading.Thread(target=prepare)
    thread.start()
    thread.join()
    assert raised and "main thread" in str(raised[0])


def test_infra_up_detaches_its_services_and_everyone_else_ties_them(tmp_path: Path, monkeypatch) -> None:
    spawned: list[bool] = []

    def fake_spawn(command, log_path, env=None, *, detached=False):
        spawned.append(detached)
        raise InfraError("not starting anything in a unit test")

    monkeypatch.setattr(infrastructure_module, "spawn", fake_spawn)
    monkeypatch.setenv("INSTRUCTREC_STATE_DIR", str(tmp_path / "cli"))
    assert cli.main(["infra", "up", "--only", "kafka"]) == 2
    with pytest.raises(InfraError):
        Infrastructure(_settings(tmp_path)).up(components=["kafka"])
    assert spawned == [True, False]


# ---------------------------------------------------------------------------------------------- shutdown


def test_a_stop_that_outlives_its_deadline_ends_the_process_with_a_reason() -> None:
    script = """
import time
from streams.runner import ShutdownDeadline
ShutdownDeadline(0.5, "the test's stop").arm()
time.sleep(60)  # a stop that hangs
"""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 50, "the process waited for its hanging stop"
    assert done.returncode == 75, done.stderr
    assert "the test's stop did not finish within 0.5 s: exiting with code 75" in done.stderr


# ------------------------------------------------------------------------------------------------ Triton


def test_triton_listens_on_loopback_only_in_explicit_mode(tmp_path: Path) -> None:
    command = triton_command(
        TritonDistribution(tmp_path),
        model_repository=tmp_path / "repo",
        backend_dir=tmp_path / "backends",
        ports={"http": 1, "grpc": 2, "metrics": 3},
        models=["health", "instructrec_reranker"],
    )
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in command
    assert "--model-control-mode=explicit" in command
    assert "--disable-auto-complete-config" in command
    assert [arg for arg in command if arg.startswith("--load-model")] == [
        "--load-model=health",
        "--load-model=instructrec_reranker",
    ]


def _fake_wheel(root: Path) -> TritonDistribution:
    distribution = TritonDistribution(root)
    distribution.python_backend.mkdir(parents=True)
    (distribution.python_backend / "libtriton_python.so").write_text("so")
    (distribution.python_backend / "triton_python_backend_utils.py").write_text("utils")
    distribution.stub().parent.mkdir(parents=True)
    distribution.stub().write_text("stub")
    return distribution


def test_backend_dir_links_the_wheel_and_copies_the_stub(tmp_path: Path) -> None:
    distribution = _fake_wheel(tmp_path / "wheel")
    target = prepare_backend_dir(distribution, tmp_path / "backends")
    python_dir = target / "python"
    assert (
        python_dir / "libtriton_python.so"
    ).readlink() == distribution.python_backend / "libtriton_python.so"
    assert not (python_dir / STUB_NAME).is_symlink()
    assert (python_dir / STUB_NAME).read_text() == "stub"
    prepare_backend_dir(distribution, tmp_path / "backends")  # idempotent
    assert sorted(p.name for p in python_dir.iterdir()) == sorted(
        ["libtriton_python.so", "triton_python_backend_utils.py", STUB_NAME]
    )


def test_a_missing_stub_for_this_python_is_a_readable_error(tmp_path: Path) -> None:
    distribution = _fake_wheel(tmp_path / "wheel")
    distribution.stub().unlink()
    with pytest.raises(BinaryNotFoundError, match="no Python backend stub"):
        prepare_backend_dir(distribution, tmp_path / "backends")


def test_only_our_tritons_leftovers_are_removed(tmp_path: Path) -> None:
    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir(), tmp.mkdir()
    for name in (
        "triton_python_backend_shm_region_old",
        "triton_python_backend_shm_region_ours",
        "triton_python_backend_shm_region_new",
        "triton_python_backend_shm_region_mapped",
        "unrelated",
    ):
        (shm / name).write_text("")
    for name in ("folderOLD", "folderNEW", "other"):
        (tmp / name).mkdir()
    state = _triton_state(
        tmp_path, shm_before=["triton_python_backend_shm_region_old"], tmp_before=["folderOLD"]
    )
    ours = {"triton_python_backend_shm_region_ours"}
    mapped = {"triton_python_backend_shm_region_mapped"}

    alone = triton_leftovers(state, ours, others_running=False, shm_dir=shm, tmp_dir=tmp, in_use=mapped)
    assert sorted(p.name for p in alone) == [
        "folderNEW",
        "triton_python_backend_shm_region_new",
        "triton_python_backend_shm_region_ours",
    ]
    # Another server may own anything new; only what our own stubs named is certainly ours.
    shared = triton_leftovers(state, ours, others_running=True, shm_dir=shm, tmp_dir=tmp, in_use=mapped)
    assert [p.name for p in shared] == ["triton_python_backend_shm_region_ours"]


def test_leftovers_from_before_the_server_started_are_not_ours(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    stale = shm / "triton_python_backend_shm_region_stale"
    stale.write_text("")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    state = _triton_state(tmp_path)
    assert triton_leftovers(state, set(), others_running=False, shm_dir=shm, tmp_dir=tmp_path) == []


# ------------------------------------------------------------------------------------------------ Qdrant


def test_qdrant_lock_holder_names_the_holding_process(tmp_path: Path) -> None:
    assert qdrant_lock_holder(tmp_path) is False  # no storage, no lock
    lock = tmp_path / ".lock"
    lock.write_text("tmp lock file")
    assert qdrant_lock_holder(tmp_path) is False
    with lock.open("r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what qdrant-client does while open
        assert qdrant_lock_holder(tmp_path) == os.getpid()
    assert qdrant_lock_holder(tmp_path) is False


def test_status_reports_missing_local_storage_as_not_started(tmp_path: Path) -> None:
    from instructrec.infra.qdrant import qdrant_local_status

    status = qdrant_local_status(tmp_path / "nowhere")
    assert not status.healthy
    assert status.state == "not started"
