"""Processes the local infrastructure starts: spawned in their own session, recognised by (pid, start time),
stopped with SIGTERM then SIGKILL together with anything they left behind. Linux only: reads ``/proc`` and
ties children to their parent with ``prctl``.

A child keeps its own session, so a Ctrl-C in the terminal does not reach it directly and its owner stops
everything in order; what ties it to the owner instead is the parent-death signal (`die_with_parent`): when
the owner dies, whatever killed it (SIGKILL, SIGTERM, a crash), the kernel sends the child SIGTERM. Every
child that gets it stops within a bound: noida-db and tritonserver on their own, the workers by their
shutdown deadline (`streams.runner.ShutdownDeadline`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from instructrec.infra.errors import InfraError, StartupError

_POLL_S = 0.2
_KILL_WAIT_S = 5.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
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


def session_members(leader: int, leader_ticks: int) -> list[int]:
    """Live processes other than the leader in the session a leader we started created: its children, also
    those that outlived it.

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
    stragglers = session_members(process.pid, process.start_ticks)
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


def spawn(
    command: list[str], log_path: Path, env: dict[str, str] | None = None, *, detached: bool = False
) -> tuple[int, int]:
    """Start `command` in its own session -> pid, start ticks. It dies with this process (`die_with_parent`)
    unless `detached`: then it outlives it, and only `stop_process` ends it."""
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
            preexec_fn=None if detached else die_with_parent(),
        )
    ticks = process_start_ticks(process.pid)
    if ticks is None:  # exited before we could look at it: start-up will report it from the log
        ticks = -1
    return process.pid, ticks


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the kernel sends the child SIGTERM when this process dies.

    SIGTERM, not SIGKILL: every child we start stops within a bound on SIGTERM, and stopping rather than
    dying lets it clean up (Triton removes its shared memory, a worker leaves its consumer group).
    PR_SET_PDEATHSIG has three catches:
    - its "parent" is the thread that forks, not the process: the child gets the signal as soon as that
      thread ends. Only the main thread, which lives as long as the process, may spawn (checked here).
    - the parent may die between the fork and the prctl: the child then finds another parent and exits.
    - exec of a set-uid binary clears it (none here).
    """
    if threading.current_thread() is not threading.main_thread():
        raise InfraError(
            "start child processes from the main thread: one started from another thread would be killed "
            "when that thread ends (PR_SET_PDEATHSIG follows the forking thread)"
        )
    parent = os.getpid()
    prctl = _prctl()  # looked up here: between fork and exec the child only calls it

    def tie_to_parent() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")  # Popen raises it
        if os.getppid() != parent:  # the parent died before the prctl: no signal will come
            os._exit(1)

    return tie_to_parent


@functools.cache
def _prctl() -> Callable[..., int]:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    # prctl is variadic and reads unsigned longs: declared, so that no argument is passed half-initialised.
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    prctl.restype = ctypes.c_int
    return prctl


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
