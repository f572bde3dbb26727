"""Hydra/OmegaConf glue shared by run.py and the tests."""

from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent  # the project folder: conf/ and run.py live here
CONFIG_DIR = ROOT / "conf"


def register_resolvers():
    OmegaConf.register_new_resolver("kr3_root", lambda: str(ROOT), replace=True)
