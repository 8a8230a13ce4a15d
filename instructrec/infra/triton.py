"""The local Triton server: the real tritonserver of the nvidia-pytriton wheel, standalone, with the Python
backend, and the leftovers it may leave in /dev/shm and /tmp when killed."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from instructrec.infra.errors import BinaryNotFoundError
from instructrec.infra.ports import LOOPBACK
from instructrec.infra.processes import cmdline, pids
from instructrec.infra.state import TritonState

# Triton leaves these behind when it (or its Python backend stub) is killed rather than stopped.
SHM_DIR = Path("/dev/shm")
SHM_PATTERN = "triton_python_backend_*"
TMP_DIR = Path("/tmp")
TMP_PATTERN = "folder*"  # mkdtemp("/tmp/folderXXXXXX"), hard-coded in Triton: TMPDIR is not honoured
STUB_NAME = "triton_python_backend_stub"


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


def triton_client(url: str, timeout_s: float):
    import tritonclient.http

    return tritonclient.http.InferenceServerClient(
        url, connection_timeout=timeout_s, network_timeout=timeout_s
    )


def triton_models_ready(url: str, models: Iterable[str], timeout_s: float = 2.0) -> bool:
    try:
        client = triton_client(url, timeout_s)
        try:
            return client.is_server_ready() and all(client.is_model_ready(model) for model in models)
        finally:
            client.close()
    except Exception:  # connection refused and friends: not ready yet
        return False


def glob_names(directory: Path, pattern: str) -> list[str]:
    return sorted(path.name for path in directory.glob(pattern))


def stub_regions(server_pid: int) -> set[str]:
    """Shared-memory regions of the Python backend stubs of one server.

    A stub's command line is ``stub model.py <shm region> <size> <growth> <parent pid> ...``, which
    attributes the region to its server exactly, even after the server has died.
    """
    regions = set()
    for pid in pids():
        argv = cmdline(pid)
        if len(argv) > 5 and argv[0].endswith(STUB_NAME) and argv[5] == str(server_pid):
            regions.add(argv[2])
    return regions


def other_triton_servers(own_pid: int) -> list[int]:
    others = []
    for pid in pids():
        with contextlib.suppress(OSError):
            if pid != own_pid and Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver":
                others.append(pid)
    return others


def mapped_shm_files() -> set[str]:
    """Every /dev/shm file some live process has mapped: never remove one of those."""
    mapped = set()
    for pid in pids():
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


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
