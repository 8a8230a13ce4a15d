"""Running one stream worker process: pre-create the topics, load the services, start Faust, close everything on exit.

`python -m streams [--web-port N] [--loglevel info]` runs one worker from `INSTRUCTREC_*` settings (the
CLI's `instructrec worker` does the same). SIGTERM or Ctrl-C stops it gracefully: in-flight events are
finished and acknowledged, the producer is flushed and offsets are committed before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import faust
import torch

from instructrec.config import Settings
from streams.app import create_app
from streams.kafka.admin import ensure_topics
from streams.services import Services

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, web_port: int | None = None, loglevel: str = "info") -> int:
    """Blocks until the worker stops; returns its exit code."""
    # Process-wide, so set here at the process's entry: one intra-op thread for the worker's own models (a
    # query is a handful of tokens), leaving the cores to the reranker on Triton.
    torch.set_num_threads(1)
    created = asyncio.run(ensure_topics(settings.kafka))
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
    parser = argparse.ArgumentParser(prog="python -m streams", description=__doc__.splitlines()[0])
    parser.add_argument("--web-port", type=int, default=None, help="default: INSTRUCTREC_WEB__PORT")
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args(argv)
    return run_worker(Settings(), web_port=args.web_port, loglevel=args.loglevel)


if __name__ == "__main__":
    sys.exit(main())
