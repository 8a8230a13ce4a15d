"""`python -m workers.finetune`: the fine-tune worker process (as `instructrec finetune`)."""

import sys

from instructrec.config import Settings
from workers.finetune.worker import run_finetune

sys.exit(run_finetune(Settings()))
