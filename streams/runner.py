"""Running one stream worker process: pre-create the topics, load the services, start Faust, close everything on exit.

`python -m streams [--web-port N] [--loglevel info] [--shutdown-timeout S]` runs one worker from
`INSTRUCTREC_*` settings (the CLI's `instructrec worker` does the same). SIGTERM or Ctrl-C stops it
gracefully: in-flight events are finished and acknowledged, the producer is flushed and offsets are committed
before it exits — within `--shutdown-timeout` seconds: a stop that takes longer is cut short, with a logged
reason and exit code 75 (`ShutdownDeadline`). The stop that used to hang — the broker gone, aiokafka's
fetcher re-raising a cancellation so Faust waited 60 s for its consumer thread — is fixed at its cause
(`streams.kafka.compat.close_fetcher_quietly`); the deadline bounds whatever else may ever hang.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import threading

import faust
import torch
from threadpoolctl import threadpool_limits

from instructrec.config import Settings
from streams.app import create_app
from streams.kafka.admin import ensure_topics
from streams.metrics import gc_paused
from streams.services import Services

log = logging.getLogger(__name__)

# Far above a healthy stop (a second or two) and under what waits before it SIGKILLs a worker: Kubernetes'
# termination grace period (30 s by default, 60 s for the chart's stream workers), WorkerProcess's and
# FinetuneProcess's stop timeouts (60 s, 30 s).
SHUTDOWN_TIMEOUT_S = 20.0
EXIT_SHUTDOWN_TIMEOUT = os.EX_TEMPFAIL  # 75: the stop was cut short; what it left is redelivered on restart


class ShutdownDeadline:
    """A hard bound on a process's graceful stop: armed when the stop begins, it ends the process if the stop
    (or the interpreter's exit after it, which joins worker threads) outlives `timeout_s`."""

    def __init__(self, timeout_s: float, what: str) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        """Start the clock; once: a second signal does not push the deadline back."""
        if self._timer is None:
            self._timer = threading.Timer(self.timeout_s, self._expire)
            self._timer.daemon = True  # never what keeps a finished process alive
            self._timer.start()

    def _expire(self) -> None:
        log.error(
            "%s did not finish within %g s: exiting with code %d",
            self.what,
            self.timeout_s,
            EXIT_SHUTDOWN_TIMEOUT,
        )
        logging.shutdown()  # flush the line above: os._exit skips every clean-up
        os._exit(EXIT_SHUTDOWN_TIMEOUT)


class Worker(faust.Worker):
    """Faust's worker with a bounded stop (named as Faust's, which labels its log lines "[^Worker]")."""

    def __init__(self, *args, deadline: ShutdownDeadline, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    async def on_stop(self) -> None:
        # The first thing a stop runs, whatever started it (SIGTERM, Ctrl-C, a crash).
        self.deadline.arm()
        await super().on_stop()


def run_worker(
    settings: Settings,
    *,
    web_port: int | None = None,
    loglevel: str = "info",
    shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
) -> int:
    """Blocks until the worker stops; returns its exit code."""
    # Process-wide, so set here at the process's entry: one intra-op thread for the worker's own models (a
    # query is a handful of tokens), leaving the cores to the reranker on Triton. numpy's OpenBLAS too: its
    # second thread spin-waits after every small product (catalogue scores, affinities, embedded Qdrant) and
    # was the worker's busiest thread (benchmarks/stream.py, CPU ms per query by process).
    torch.set_num_threads(1)
    threadpool_limits(1)
    created = asyncio.run(ensure_topics(settings.kafka))
    if created:
        log.info("created topics: %s", ", ".join(created))
    services = Services.load(settings)
    stream = create_app(settings, services, web_port=web_port)
    # What start-up loaded (models, the catalogue, embedded Qdrant's points) lives as long as the worker. Out
    # of the collector's reach, a full collection no longer walks it: it stopped every thread for a third of
    # a second a few times a minute, the stream's p99 (benchmarks/stream.py, gc pauses per step). Frozen
    # objects are still freed by reference counting; only a cycle among them would outlive its use.
    gc.collect()
    gc.freeze()
    deadline = ShutdownDeadline(shutdown_timeout_s, "the stream worker's graceful stop")
    worker = Worker(stream.app, loglevel=loglevel, quiet=True, redirect_stdouts=False, deadline=deadline)
    try:
        with gc_paused(stream.metrics):
            worker.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        services.index.index.close()  # releases embedded Qdrant's lock even if the loop is gone
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streams", description=__doc__.splitlines()[0])
    parser.add_argument("--web-port", type=int, default=None, help="default: INSTRUCTREC_WEB__PORT")
    parser.add_argument("--loglevel", default="info")
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=SHUTDOWN_TIMEOUT_S,
        help="the graceful stop's bound, seconds",
    )
    args = parser.parse_args(argv)
    return run_worker(
        Settings(), web_port=args.web_port, loglevel=args.loglevel, shutdown_timeout_s=args.shutdown_timeout
    )


if __name__ == "__main__":
    sys.exit(main())
