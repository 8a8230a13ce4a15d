"""Processes the local infrastructure starts: spawned in their own session, recognised by (pid, start time),
stopped with SIGTERM then SIGKILL together with anything they left behind. Linux only: reads ``/proc``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from instructrec.infra.errors import InfraError, StartupError

_POLL_S = 0.2
_KILL_WAIT_S = 5.0
T = TypeVar("T")


class ManagedProcess(BaseModel):
    pid: int
    # The kernel's start time of the process (clock ticks since boot): a pid alone may have been reused by
    # an unrelated process since we recorded it, the pair (pid, start_ticks) may not.
    start_ticks: int
    log: Path
    started_at: float

    def is_running(self) -> bool:
        return is_running(self.pid, self.start_ticks)


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
    for pid in pids():
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


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def pids() -> Iterator[int]:
    return (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())


def describe_pid(pid: int) -> str:
    words = " ".join(cmdline(pid)).split()  # collapses the newlines of a `python -c` script
    return " ".join(words)[:60] if words else "exited"
