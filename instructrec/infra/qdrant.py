"""The local Qdrant: qdrant-client's embedded mode, a storage folder with a file lock and no process."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Literal

from instructrec.infra.processes import describe_pid
from instructrec.infra.status import ComponentStatus, reason


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
        status.detail = reason(error)
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
        owner = f"pid {holder} ({describe_pid(holder)})" if holder else "another process"
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
        status.detail = reason(error)
        return status
    status.healthy, status.state, status.detail = True, "up", f"collections: {', '.join(names) or 'none'}"
    return status
