"""Logging set-up of every entry point (grid, run_stage, a local worker, a SLURM job): one line
per record on stderr, with time and level; chatty libraries at WARNING. A bottom module, so the
entry points share it without importing each other."""
from __future__ import annotations

import logging
import sys


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "torch_fidelity"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
