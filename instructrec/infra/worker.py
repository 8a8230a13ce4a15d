"""The workers as child processes (a stream worker, the fine-tune worker), for the integration tests, the
benchmarks and the demo.

    with WorkerProcess(settings, web_port=free_port(), log=path) as worker:
        worker.wait_healthy()
        ... worker.url("/recommend") ...
    # leaving the block stops it gracefully (SIGTERM), or kills it after `stop_timeout_s`

The child gets the whole `Settings` through `INSTRUCTREC_*` variables (`Settings.to_env`), replacing whatever
`INSTRUCTREC_*` variables the parent had, so parent and child cannot disagree. It runs in its own session and
dies with its parent (`die_with_parent`: start it from the main thread); on SIGTERM it stops within its
`shutdown_timeout_s` (the worker's own deadline, under the parent's `stop_timeout_s`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from instructrec.config import ENV_PREFIX, Settings
from instructrec.infra.processes import die_with_parent


def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment that rebuilds `settings` in a child process (`Settings()` there)."""
    env = {
        k: v for k, v in (base if base is not None else os.environ).items() if not k.startswith(ENV_PREFIX)
    }
    env.update(settings.to_env())
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


class ChildProcess:
    """A worker as a child process: started in its own session and tied to the parent's life (`_start`),
    stopped gracefully with SIGTERM, killed after `stop_timeout_s`. Subclasses say what to run."""

    def __init__(
        self, settings: Settings, *, log: Path, stop_timeout_s: float, shutdown_timeout_s: float | None
    ) -> None:
        self.settings = settings
        self.log = log
        self.stop_timeout_s = stop_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s  # None: the worker's default
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return settings_env(self.settings)

    def start(self) -> Self:
        command = [*self.command(), *_shutdown_option(self.shutdown_timeout_s)]
        self.process = _start(command, self.log, self.environment())
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop it (gracefully with SIGTERM: in-flight work finishes, offsets are committed); its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class WorkerProcess(ChildProcess):
    """A stream worker (`python -m streams`) with its web view on `web_port`."""

    def __init__(
        self,
        settings: Settings,
        *,
        web_port: int,
        log: Path,
        stop_timeout_s: float = 60.0,
        shutdown_timeout_s: float | None = None,
        loglevel: str = "info",
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            settings, log=log, stop_timeout_s=stop_timeout_s, shutdown_timeout_s=shutdown_timeout_s
        )
        self.env = env or {}  # extra environment for the child, over the settings' own variables
        self.web_port = web_port
        self.loglevel = loglevel

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.web.host}:{self.web_port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "streams",
            "--web-port",
            str(self.web_port),
            "--loglevel",
            self.loglevel,
        ]

    def environment(self) -> dict[str, str]:
        return {**settings_env(self.settings), **self.env}

    def health(self, timeout_s: float = 2.0) -> dict | None:
        try:
            with urllib.request.urlopen(self.url("/health"), timeout=timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read() or b"{}")
        except (OSError, ValueError):
            return None

    def wait_healthy(self, timeout_s: float = 180.0) -> dict:
        """Until /health says ok and the worker holds partitions (its group has settled)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}; see {self.log}")
            state = self.health()
            if state and state.get("status") == "ok" and state["checks"]["kafka"].get("partitions"):
                return state
            time.sleep(0.5)
        raise TimeoutError(
            f"worker on port {self.web_port} not healthy within {timeout_s:.0f} s; see {self.log}"
        )


class FinetuneProcess(ChildProcess):
    """The fine-tune worker (`python -m workers.finetune`) as a child process (see the module docstring).

    with FinetuneProcess(settings, log=path) as finetune:
        ...
    # leaving the block stops it (SIGTERM: a cycle in training is abandoned, its examples stay stored)
    """

    def __init__(
        self,
        settings: Settings,
        *,
        log: Path,
        stop_timeout_s: float = 30.0,
        shutdown_timeout_s: float | None = None,
    ) -> None:
        super().__init__(
            settings, log=log, stop_timeout_s=stop_timeout_s, shutdown_timeout_s=shutdown_timeout_s
        )

    def command(self) -> list[str]:
        return [sys.executable, "-m", "workers.finetune"]


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Own session (a Ctrl-C in the terminal reaches only the parent, which stops the child in order) and
    tied to the parent's life."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )


def _shutdown_option(timeout_s: float | None) -> list[str]:
    return [] if timeout_s is None else ["--shutdown-timeout", str(timeout_s)]
