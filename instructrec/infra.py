"""Local infrastructure for tests and the demo: a Kafka-compatible broker, Triton and embedded Qdrant storage.

``Infrastructure(settings).up()`` starts what is missing on loopback and records pids, ports and log files
in ``<state_dir>/infra.json``; ``.down()`` stops exactly those processes; ``.status()`` asks each service
for real whether it is healthy. The CLI (``instructrec infra up|down|status``) and the pytest session
fixtures both drive this one API.

- Broker: the ``noida-db`` binary, run in the foreground (we own the process and stop it with SIGTERM).
- Triton: the real ``tritonserver`` shipped in the nvidia-pytriton wheel, run standalone on the project's
  model repository with the Python backend, in explicit model-control mode.
- Qdrant: qdrant-client's embedded local mode. There is no process: ``up`` only prepares the storage folder,
  and one process at a time may open it (a file lock), so nothing here keeps it open.

Linux only: liveness and ownership checks read ``/proc``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from instructrec.config import KafkaSettings, Settings

LOOPBACK = "127.0.0.1"
STATE_FILE = "infra.json"
COMPONENTS: tuple[str, ...] = ("kafka", "triton", "qdrant")
Component = Literal["kafka", "triton", "qdrant"]

# Triton leaves these behind when it (or its Python backend stub) is killed rather than stopped.
SHM_DIR = Path("/dev/shm")
SHM_PATTERN = "triton_python_backend_*"
TMP_DIR = Path("/tmp")
TMP_PATTERN = "folder*"  # mkdtemp("/tmp/folderXXXXXX"), hard-coded in Triton: TMPDIR is not honoured
STUB_NAME = "triton_python_backend_stub"

_POLL_S = 0.2
_KILL_WAIT_S = 5.0

log = logging.getLogger(__name__)
T = TypeVar("T")


class InfraError(RuntimeError):
    """A problem the user can act on; the message says what happened and what to do."""


class BinaryNotFoundError(InfraError):
    pass


class PortInUseError(InfraError):
    pass


class StartupError(InfraError):
    pass


# --------------------------------------------------------------------------------------------- state file


class ManagedProcess(BaseModel):
    pid: int
    # The kernel's start time of the process (clock ticks since boot): a pid alone may have been reused by
    # an unrelated process since we recorded it, the pair (pid, start_ticks) may not.
    start_ticks: int
    log: Path
    started_at: float

    def is_running(self) -> bool:
        return is_running(self.pid, self.start_ticks)


class KafkaState(ManagedProcess):
    port: int
    data_dir: Path

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def broker(self) -> str:
        return f"kafka://{self.bootstrap_servers}"


class TritonState(ManagedProcess):
    http_port: int
    grpc_port: int
    metrics_port: int
    models: list[str]
    model_repository: Path
    backend_dir: Path
    # What Triton's leftover locations held before it started, so that `down` only removes what is new.
    shm_before: list[str] = []
    tmp_before: list[str] = []

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"


class QdrantState(BaseModel):
    path: Path


class State(BaseModel):
    """What `up` started. A component is absent when it is not managed here."""

    kafka: KafkaState | None = None
    triton: TritonState | None = None
    qdrant: QdrantState | None = None

    def is_empty(self) -> bool:
        return self.kafka is None and self.triton is None and self.qdrant is None

    def settings(self, base: Settings) -> Settings:
        """`base` pointed at the managed services (unmanaged parts stay as configured)."""
        update: dict[str, Any] = {}
        if self.kafka:
            # The local broker speaks plaintext, whatever security the configured cluster needs.
            update["kafka"] = base.kafka.model_copy(
                update={"broker": self.kafka.broker, "security_protocol": "PLAINTEXT", "sasl_mechanism": None}
            )
        if self.triton:
            url = self.triton.grpc_url if base.triton.protocol == "grpc" else self.triton.http_url
            update["triton"] = base.triton.model_copy(update={"url": url})
        if self.qdrant:
            update["qdrant"] = base.qdrant.model_copy(update={"url": None, "path": self.qdrant.path})
        return base.model_copy(update=update)

    def env(self, base: Settings) -> dict[str, str]:
        """``INSTRUCTREC_*`` variables that point another process at the managed services."""
        pointed = self.settings(base)
        env: dict[str, str] = {}
        if self.kafka:
            env["INSTRUCTREC_KAFKA__BROKER"] = pointed.kafka.broker
        if self.triton:
            env["INSTRUCTREC_TRITON__URL"] = pointed.triton.url
        if self.qdrant:
            env["INSTRUCTREC_QDRANT__PATH"] = str(pointed.qdrant.path)
        return env

    def save(self, path: Path) -> None:
        # Write-then-rename so that a crash never leaves a truncated state file behind.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> State:
        if not path.exists():
            return cls()
        try:
            return cls.model_validate_json(path.read_text())
        except (ValidationError, ValueError) as error:
            raise InfraError(
                f"the infra state file {path} is unreadable ({error.__class__.__name__}). Stop what it "
                f"recorded by hand if anything still runs, then delete the file."
            ) from error


# ------------------------------------------------------------------------------------------------- ports


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct ports that are free on loopback right now (the OS picks them).

    All sockets stay bound until every port is picked so the OS cannot hand out the same port twice.
    Another process may still take a port before our server binds it; start-up then fails loudly.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def ensure_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise PortInUseError(
                f"{what} port {port} on {LOOPBACK} is already in use. Stop whatever holds it "
                f"(`ss -ltnp 'sport = :{port}'` shows it) or configure port 0 for any free port."
            ) from None


def pick_ports(service: str, configured: dict[str, int]) -> dict[str, int]:
    """Configured ports (checked to be free) and a free port for each one configured as 0."""
    for name, port in configured.items():
        if port:
            ensure_port_free(port, f"{service} {name}")
    wanted = [name for name, port in configured.items() if not port]
    chosen = dict(zip(wanted, free_ports(len(wanted)), strict=True))
    return {name: port or chosen[name] for name, port in configured.items()}


def port_open(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, pgrp, session, ...), or None if there is no such pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 is the command name in parentheses and may itself contain spaces or parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else None


def is_running(pid: int, start_ticks: int) -> bool:
    stat = _proc_stat(pid)
    # A zombie has exited; only its parent's wait() is missing.
    return stat is not None and stat[0] not in ("Z", "X") and int(stat[19]) == start_ticks


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (the pytest session), so it leaves no zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _wait_gone(pid: int, start_ticks: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        _reap(pid)
        if not is_running(pid, start_ticks):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _session_members(leader: int, leader_ticks: int) -> list[int]:
    """Live processes left in the session a leader we started created (children that outlived it).

    The kernel does not reuse a pid while it names a live session, so if the pid now belongs to another
    process, the session is gone and no member is ours.
    """
    stat = _proc_stat(leader)
    if stat is not None and int(stat[19]) != leader_ticks:
        return []
    members = []
    for pid in _pids():
        stat = _proc_stat(pid)
        if stat and pid != leader and stat[0] not in ("Z", "X") and int(stat[3]) == leader:
            members.append(pid)
    return members


def stop_process(process: ManagedProcess, timeout_s: float) -> str:
    """SIGTERM the process, SIGKILL it after `timeout_s`, then anything it spawned; say what happened."""
    outcome = "was not running"
    if process.is_running():
        with contextlib.suppress(ProcessLookupError):  # it may exit on its own between the check and the kill
            os.kill(process.pid, signal.SIGTERM)
        outcome = "stopped"
        if not _wait_gone(process.pid, process.start_ticks, timeout_s):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            outcome = f"killed (still running {timeout_s:.0f} s after SIGTERM)"
            if not _wait_gone(process.pid, process.start_ticks, _KILL_WAIT_S):
                raise InfraError(f"pid {process.pid} survived SIGKILL")
    # Each process was started in its own session: children that outlived it (a Triton backend stub
    # whose server was killed) are the session's remaining members.
    stragglers = _session_members(process.pid, process.start_ticks)
    for pid in stragglers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in stragglers:  # gone, so their shared memory is unmapped before anyone cleans it up
        ticks = process_start_ticks(pid)
        if ticks is not None and not _wait_gone(pid, ticks, _KILL_WAIT_S):
            raise InfraError(f"pid {pid} (started by pid {process.pid}) survived SIGKILL")
    if stragglers:
        outcome += f"; killed {len(stragglers)} leftover child process(es)"
    return outcome


def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> tuple[int, int]:
    """Start `command` detached (own session, so a Ctrl-C in the terminal does not reach it) -> pid, ticks."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    ticks = process_start_ticks(process.pid)
    if ticks is None:  # exited before we could look at it: start-up will report it from the log
        ticks = -1
    return process.pid, ticks


def tail(path: Path, lines: int = 25) -> str:
    """The end of a log, without the box-drawing lines of Triton's start-up tables."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    kept = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(("+-", "|"))]
    return "\n".join(kept[-lines:])


def wait_until_ready(ready: Callable[[], bool], process: ManagedProcess, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not process.is_running():
            raise StartupError(
                f"{what} exited during start-up; the end of {process.log}:\n{tail(process.log)}"
            )
        if time.monotonic() >= deadline:
            raise StartupError(
                f"{what} not ready {timeout_s:.0f} s after start; the end of {process.log}:\n{tail(process.log)}"
            )
        time.sleep(_POLL_S)


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from synchronous code, also when the caller's thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a library's own error logging while we probe; the probe reports the failure itself."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


# ------------------------------------------------------------------------------------------------- Kafka


def find_noida_db(configured: Path | None = None) -> Path:
    """The noida-db binary itself, not the `noida-db` console script.

    The console script is a Python wrapper that runs the binary as a child: a SIGTERM to the wrapper would
    orphan the broker. So we prefer the binary inside the wheel and run it directly.
    """
    if configured is not None:
        if configured.is_file() and os.access(configured, os.X_OK):
            return configured
        raise BinaryNotFoundError(f"noida-db not found at {configured} (INSTRUCTREC_INFRA__NOIDA_DB)")
    spec = importlib.util.find_spec("noida_db")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "noida-db"
        if binary.is_file():
            if not os.access(binary, os.X_OK):
                binary.chmod(
                    0o755
                )  # installers may drop the execute bit; noida-db's own wrapper does this too
            return binary
    on_path = shutil.which("noida-db")
    if on_path:
        return Path(on_path)
    raise BinaryNotFoundError(
        "noida-db not found: install the project's dependencies (`make venv`, or `pip install noida-db==0.2.3`) "
        "or set INSTRUCTREC_INFRA__NOIDA_DB to the binary"
    )


def noida_command(binary: Path, port: int, data_dir: Path) -> list[str]:
    return [
        str(binary), "start", "--only", "kafka", "--kafka-port", str(port), "--host", LOOPBACK,
        "--data-dir", str(data_dir),
    ]  # fmt: skip


def _admin(kafka: KafkaSettings):
    from aiokafka.admin import AIOKafkaAdminClient

    return AIOKafkaAdminClient(**kafka.aiokafka_kwargs())


async def kafka_metadata(kafka: KafkaSettings) -> dict[str, Any]:
    """One metadata round trip: the brokers, the controller and the topic names."""
    admin = _admin(kafka)
    try:
        with _quiet("aiokafka"):
            await admin.start()
            cluster = await admin.describe_cluster()
            topics = await admin.list_topics()
    finally:
        await admin.close()
    return {**cluster, "topics": sorted(topics)}


async def ensure_topics(kafka: KafkaSettings, names: Iterable[str] | None = None) -> list[str]:
    """Create the app's topics with the configured partition count; return the ones created.

    Co-partitioning needs every user-keyed topic to have the same partition count, so an existing topic
    with another count is an error rather than something to live with.
    """
    from aiokafka.admin import NewTopic

    names = sorted(set(names if names is not None else kafka.topics.all()))
    admin = _admin(kafka)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(name, kafka.partitions, kafka.replication_factor) for name in missing]
            )
            errors = [
                f"{error['topic']}: {error['error_message'] or error['error_code']}"
                for error in response.to_object()["topic_errors"]
                if error["error_code"] not in (0, 36)  # 36: TOPIC_ALREADY_EXISTS (a concurrent creator won)
            ]
            if errors:
                raise InfraError(f"could not create topics on {kafka.broker}: {'; '.join(errors)}")
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    wrong = {t["topic"]: len(t["partitions"]) for t in described if len(t["partitions"]) != kafka.partitions}
    if wrong:
        raise InfraError(
            f"topics with a partition count other than the configured {kafka.partitions}: {wrong}. "
            f"Delete them (or the broker's data) or configure INSTRUCTREC_KAFKA__PARTITIONS to match."
        )
    return missing


def _kafka_answers(kafka: KafkaSettings) -> bool:
    try:
        run_sync(kafka_metadata(kafka))
    except Exception:  # any failure means "not yet": start-up keeps polling until its deadline
        return False
    return True


# ------------------------------------------------------------------------------------------------ Triton


@dataclass(frozen=True)
class TritonDistribution:
    """The tritonserver tree inside the nvidia-pytriton wheel (``pytriton/tritonserver``)."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def caches(self) -> Path:
        return self.root / "caches"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def libs(self) -> Path:
        # auditwheel put the server's shared libraries beside the package: <site-packages>/nvidia_pytriton.libs
        return self.root.parent.parent / "nvidia_pytriton.libs"

    def stub(self, python_version: str | None = None) -> Path:
        version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / STUB_NAME


def find_triton(configured: Path | None = None) -> TritonDistribution:
    if configured is not None:
        if configured.is_file() and os.access(configured, os.X_OK):
            return TritonDistribution(configured.resolve().parent.parent)
        raise BinaryNotFoundError(f"tritonserver not found at {configured} (INSTRUCTREC_INFRA__TRITONSERVER)")
    spec = importlib.util.find_spec("pytriton")
    if spec and spec.origin:
        distribution = TritonDistribution(Path(spec.origin).parent / "tritonserver")
        if distribution.binary.is_file():
            return distribution
    raise BinaryNotFoundError(
        "tritonserver not found: it ships in the nvidia-pytriton wheel (`make venv`, or "
        "`pip install nvidia-pytriton==0.7.0`), or set INSTRUCTREC_INFRA__TRITONSERVER to a tritonserver binary"
    )


def default_model_repository() -> Path:
    """deploy/triton of the checkout this package is imported from (an editable install)."""
    return Path(__file__).resolve().parent.parent / "deploy" / "triton"


def prepare_backend_dir(distribution: TritonDistribution, target: Path) -> Path:
    """A backend directory Triton can use: links to the wheel's Python backend plus a copy of the stub.

    The wheel keeps one stub per Python version outside the backend folder, while Triton runs the stub
    from beside libtriton_python.so: the one for our Python goes there. (A copy, as the design says; with
    this wheel a link works too.)
    """
    stub = distribution.stub()
    if not stub.is_file():
        raise BinaryNotFoundError(
            f"the nvidia-pytriton wheel has no Python backend stub for this Python ({stub})"
        )
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in distribution.python_backend.iterdir():
        link = python_dir / source.name
        if link.is_symlink() and link.readlink() == source:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    copy = python_dir / STUB_NAME
    if (
        not copy.exists()
        or copy.stat().st_size != stub.stat().st_size
        or copy.stat().st_mtime < stub.stat().st_mtime
    ):
        shutil.copy2(stub, copy)
    return target


def triton_env(distribution: TritonDistribution, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")  # where libpython lives: the stub embeds the interpreter
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        part for part in (str(distribution.libs), libdir, env.get("LD_LIBRARY_PATH")) if part
    )
    # The stub finds its Python, and so torch, transformers and this package, through PATH.
    env["PATH"] = os.pathsep.join(part for part in (sysconfig.get_path("scripts"), env.get("PATH")) if part)
    # Nothing in the server may wait on a Hugging Face hub it cannot reach: models load by local path.
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def triton_command(
    distribution: TritonDistribution,
    *,
    model_repository: Path,
    backend_dir: Path,
    ports: dict[str, int],
    models: Iterable[str],
) -> list[str]:
    return [
        str(distribution.binary),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_dir}",
        f"--cache-directory={distribution.caches}",
        f"--http-address={LOOPBACK}",
        f"--http-port={ports['http']}",
        f"--grpc-address={LOOPBACK}",
        f"--grpc-port={ports['grpc']}",
        f"--metrics-address={LOOPBACK}",
        f"--metrics-port={ports['metrics']}",
        "--allow-gpu-metrics=false",  # no GPU here: spares a DCGM error in the log
        "--model-control-mode=explicit",
        "--disable-auto-complete-config",
        "--exit-timeout-secs=5",  # bounds the wait for in-flight requests on SIGTERM
        *(f"--load-model={model}" for model in models),
    ]


def _triton_client(url: str, timeout_s: float):
    import tritonclient.http

    return tritonclient.http.InferenceServerClient(
        url, connection_timeout=timeout_s, network_timeout=timeout_s
    )


def _triton_models_ready(url: str, models: Iterable[str], timeout_s: float = 2.0) -> bool:
    try:
        client = _triton_client(url, timeout_s)
        try:
            return client.is_server_ready() and all(client.is_model_ready(model) for model in models)
        finally:
            client.close()
    except Exception:  # connection refused and friends: not ready yet
        return False


def _glob_names(directory: Path, pattern: str) -> list[str]:
    return sorted(path.name for path in directory.glob(pattern))


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids() -> Iterator[int]:
    return (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())


def stub_regions(server_pid: int) -> set[str]:
    """Shared-memory regions of the Python backend stubs of one server.

    A stub's command line is ``stub model.py <shm region> <size> <growth> <parent pid> ...``, which
    attributes the region to its server exactly, even after the server has died.
    """
    regions = set()
    for pid in _pids():
        argv = _cmdline(pid)
        if len(argv) > 5 and argv[0].endswith(STUB_NAME) and argv[5] == str(server_pid):
            regions.add(argv[2])
    return regions


def other_triton_servers(own_pid: int) -> list[int]:
    others = []
    for pid in _pids():
        with contextlib.suppress(OSError):
            if pid != own_pid and Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver":
                others.append(pid)
    return others


def _mapped_shm_files() -> set[str]:
    """Every /dev/shm file some live process has mapped: never remove one of those."""
    mapped = set()
    for pid in _pids():
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if f" {SHM_DIR}/" in line:
                    mapped.add(Path(line.split(maxsplit=5)[-1]).name)
    return mapped


def triton_leftovers(
    state: TritonState,
    own_regions: set[str],
    *,
    others_running: bool,
    shm_dir: Path = SHM_DIR,
    tmp_dir: Path = TMP_DIR,
    in_use: set[str] | frozenset[str] = frozenset(),
) -> list[Path]:
    """What our Triton left behind in /dev/shm and /tmp, and nothing else.

    Regions named by our own stubs are ours for sure. Other new entries (absent before the server started,
    created since, owned by our user) are ours only if no other tritonserver is running: Triton's names do
    not say which server made them, so while another one runs they are left alone.
    """
    uid = os.getuid()

    def new_since_start(path: Path, before: list[str]) -> bool:
        with contextlib.suppress(OSError):
            info = path.stat()
            return path.name not in before and info.st_uid == uid and info.st_mtime >= state.started_at - 1
        return False

    leftovers = []
    for path in sorted(shm_dir.glob(SHM_PATTERN)):
        named = any(path.name.startswith(region) for region in own_regions)
        unattributed = not others_running and new_since_start(path, state.shm_before)
        if (named or unattributed) and path.name not in in_use:
            leftovers.append(path)
    if not others_running:
        leftovers += [
            p
            for p in sorted(tmp_dir.glob(TMP_PATTERN))
            if p.is_dir() and new_since_start(p, state.tmp_before)
        ]
    return leftovers


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ Qdrant


def qdrant_lock_holder(path: Path) -> int | Literal[False] | None:
    """Who holds the local-mode storage lock: a pid, None (held, holder unknown) or False (free).

    qdrant-client takes an exclusive flock on ``<path>/.lock`` for as long as a client is open.
    """
    lock_file = path / ".lock"
    if not lock_file.exists():
        return False
    with lock_file.open("r") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    return _flock_owner(lock_file)


def _flock_owner(lock_file: Path) -> int | None:
    info = lock_file.stat()
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:56789 0 EOF"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                return int(fields[4])
    return None


def prepare_qdrant_storage(path: Path) -> None:
    """Create the local-mode storage (an empty collection list) unless it exists; never keep it open."""
    if (path / "meta.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    from qdrant_client import QdrantClient

    QdrantClient(path=str(path)).close()


# ------------------------------------------------------------------------------------------------ status


@dataclass
class ComponentStatus:
    name: str
    healthy: bool
    state: str  # up, down, in use, not started
    address: str = ""
    pid: int | None = None
    detail: str = ""


@dataclass
class DownReport:
    stopped: dict[str, str] = field(default_factory=dict)  # component -> what happened
    removed: list[Path] = field(default_factory=list)  # Triton leftovers cleaned up
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------- the public API


class Infrastructure:
    """Start, stop and check the local services for one state directory."""

    def __init__(self, settings: Settings):
        self.settings = settings
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
        pid, ticks = spawn(noida_command(binary, port, data_dir), log_path)
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
        repository = _absolute(self.infra.model_repository or default_model_repository())
        missing = [model for model in models if not (repository / model / "config.pbtxt").is_file()]
        if missing:
            raise InfraError(f"no such model in the Triton repository {repository}: {', '.join(missing)}")
        ports = pick_ports(
            "Triton",
            {"http": self.infra.triton_http_port, "grpc": self.infra.triton_grpc_port,
             "metrics": self.infra.triton_metrics_port},
        )  # fmt: skip
        backend_dir = prepare_backend_dir(distribution, self.state_dir / "triton" / "backends")
        log_path = self.state_dir / "logs" / "triton.log"
        command = triton_command(
            distribution, model_repository=repository, backend_dir=backend_dir, ports=ports, models=models
        )
        shm_before, tmp_before = _glob_names(SHM_DIR, SHM_PATTERN), _glob_names(TMP_DIR, TMP_PATTERN)
        started_at = time.time()
        pid, ticks = spawn(command, log_path, triton_env(distribution))
        state = TritonState(
            pid=pid, start_ticks=ticks, log=log_path, started_at=started_at, http_port=ports["http"],
            grpc_port=ports["grpc"], metrics_port=ports["metrics"], models=models, model_repository=repository,
            backend_dir=backend_dir, shm_before=shm_before, tmp_before=tmp_before,
        )  # fmt: skip
        self._await_ready(state, lambda: _triton_models_ready(state.http_url, models), "tritonserver")
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

        client = _triton_client(triton.http_url, self.infra.start_timeout_s)
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
            triton, regions, others_running=bool(other_triton_servers(triton.pid)), in_use=_mapped_shm_files()
        )
        for path in leftovers:
            _remove(path)
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
            status.detail = _reason(error)
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
            status.detail = _reason(error)
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
            client = _triton_client(url, timeout_s)
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


def qdrant_server_status(url: str, api_key, timeout_s: float) -> ComponentStatus:
    from qdrant_client import QdrantClient

    status = ComponentStatus("qdrant", False, "down", url)
    try:
        client = QdrantClient(
            url=url, api_key=api_key.get_secret_value() if api_key else None, timeout=int(timeout_s)
        )
        try:
            names = [collection.name for collection in client.get_collections().collections]
        finally:
            client.close()
    except Exception as error:  # report any failure as "down", with the reason
        status.detail = _reason(error)
        return status
    status.healthy, status.state, status.detail = True, "up", f"collections: {', '.join(names) or 'none'}"
    return status


def qdrant_local_status(path: Path) -> ComponentStatus:
    """Local mode: the storage is healthy if it is readable, or if a live process has it open.

    Only one process may open the storage, so when a worker holds it we say so instead of pretending to
    have queried it; when it is free we open it for one call and close it at once.
    """
    status = ComponentStatus("qdrant", False, "down", f"local {path}")
    if not (path / "meta.json").is_file():
        status.state, status.detail = (
            "not started",
            "no local storage here (`instructrec infra up` creates it)",
        )
        return status
    holder = qdrant_lock_holder(path)
    if holder is not False:
        status.healthy, status.state, status.pid = True, "in use", holder or None
        owner = f"pid {holder} ({_describe_pid(holder)})" if holder else "another process"
        status.detail = f"opened by {owner}; not queried (local mode allows one process at a time)"
        return status
    from qdrant_client import QdrantClient

    try:
        client = QdrantClient(path=str(path))
        try:
            names = [collection.name for collection in client.get_collections().collections]
        finally:
            client.close()
    except Exception as error:  # e.g. a worker opened it between our lock probe and now
        status.detail = _reason(error)
        return status
    status.healthy, status.state, status.detail = True, "up", f"collections: {', '.join(names) or 'none'}"
    return status


# ----------------------------------------------------------------------------------------------- helpers


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


def _describe_pid(pid: int) -> str:
    words = " ".join(_cmdline(pid)).split()  # collapses the newlines of a `python -c` script
    return " ".join(words)[:60] if words else "exited"


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    name = error.__class__.__name__
    return first if first.startswith(name) else f"{name}: {first}".rstrip(": ")
