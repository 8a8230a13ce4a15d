"""Running a stream worker: pre-create the topics, load the services, start Faust, close everything on exit.

`python -m streams.worker [--web-port N] [--loglevel info]` runs one worker from `INSTRUCTREC_*` settings
(the CLI's `instructrec worker` does the same). SIGTERM or Ctrl-C stops it gracefully: in-flight events are
finished and acknowledged, the producer is flushed and offsets are committed before it exits.
"""

from __future__ import annotations

import argparse
import logging
import sys

from instructrec.config import Settings
from instructrec.infra import run_sync

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, web_port: int | None = None, loglevel: str = "info") -> int:
    """Blocks until the worker stops; returns its exit code."""
    import faust

    from streams.app import create_app, ensure_topics
    from streams.services import Services

    created = run_sync(ensure_topics(settings))
    if created:
        log.info("created topics: %s", ", ".join(created))
    services = Services.load(settings)
    stream = create_app(settings, services, web_port=web_port)
    worker = faust.Worker(stream.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        services.index.index.close()  # releases embedded Qdrant's lock even if the loop is gone
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streams.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--web-port", type=int, default=None, help="default: INSTRUCTREC_WEB__PORT")
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args(argv)
    return run_worker(Settings(), web_port=args.web_port, loglevel=args.loglevel)


if __name__ == "__main__":
    sys.exit(main())
