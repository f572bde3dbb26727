"""Hydra/OmegaConf glue shared by run.py and the tests."""

import os
import time
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent  # the project folder: conf/ and run.py live here
CONFIG_DIR = ROOT / "conf"
_STARTED = time.time()


def run_time(fmt: str) -> str:
    """Like Hydra's ${now:...}, but one instant per job: under torchrun every rank gets rank 0's
    (distributed.init sets KR3_RUN_TIME), so all ranks write into the same run folder."""
    return datetime.fromtimestamp(float(os.environ.get("KR3_RUN_TIME", _STARTED))).strftime(fmt)


def register_resolvers():
    OmegaConf.register_new_resolver("kr3_root", lambda: str(ROOT), replace=True)
    OmegaConf.register_new_resolver("kr3_time", run_time, replace=True)
