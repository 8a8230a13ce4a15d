"""`python -m workers.finetune [--shutdown-timeout S]`: the fine-tune worker process (as `instructrec finetune`)."""

import argparse
import sys

from instructrec.config import Settings
from streams.runner import SHUTDOWN_TIMEOUT_S
from workers.finetune.worker import run_finetune

parser = argparse.ArgumentParser(prog="python -m workers.finetune", description=__doc__.splitlines()[0])
parser.add_argument(
    "--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S, help="the stop's bound, seconds"
)
args = parser.parse_args()
sys.exit(run_finetune(Settings(), shutdown_timeout_s=args.shutdown_timeout))
