"""The kr3 command: `kr3 stage=<prepare|train|generate|evaluate|export|serve|report> [overrides]` once installed,
`python run.py ...` in a checkout (Hydra; the config tree is kr3.config.CONFIG_DIR)."""

import atexit
import importlib
import logging
import os
import shutil
import sys
import time
from contextlib import suppress
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from kr3.atomic import replacing
from kr3.config import (
    BESIDE_CHECKPOINT,
    CONFIG_DIR,
    override_key,
    quote_free_text,
    register,
)
from kr3.errors import Diverged, UserError, first_line
from kr3.tracking import write_result

log = logging.getLogger(__name__)
register()  # here, not in main(): submitit's job processes import this module, then run a job

# stage -> module whose run(cfg) does it; imported lazily so `stage=prepare` never imports torch
JOB_FILES = ".hydra"  # a run folder's copy of its config, Hydra's config and its overrides (save_job_files)
SHOWN_ONLY = {"generate"}  # stages whose work is on the terminal: a run folder with nothing else in it is not kept
STAGES = {name: f"kr3.stages.{name}" for name in ("prepare", "train", "generate", "evaluate", "export", "serve", "report")}


class JobFailed(CompactHydraException):
    """A job of a sweep that failed (already printed, and in its result.json): Hydra's sweepers see a failed job, kr3's
    go on to the next (hydra_plugins/kr3_sweepers)."""


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def run_stage(cfg: DictConfig):
    try:
        save_job_files(cfg)
        if cfg.stage not in STAGES:
            raise UserError(f"stage={cfg.stage} is not a stage — use one of: {', '.join(STAGES)}")
        result = importlib.import_module(STAGES[cfg.stage]).run(cfg)
        if cfg.stage in SHOWN_ONLY:
            discard_empty_run_folder()
        return objective(result)
    except MissingMandatoryValue as e:
        stop(f"{e.full_key} is required — add {e.full_key}=... to the command")
    except UserError as e:
        stop(str(e), recorded=isinstance(e, Diverged))  # the trainer wrote a diverged run's result.json
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        crash(e)


def save_job_files(cfg: DictConfig) -> None:
    """The run folder's .hydra/ (config.yaml, hydra.yaml, overrides.yaml) as Hydra writes them, but each written whole
    (a full disk gave a traceback and an empty file): conf/hydra/default.yaml turns Hydra's own writing off."""
    hydra_cfg = HydraConfig.instance().cfg
    folder = Path(hydra_cfg.hydra.runtime.output_dir) / JOB_FILES
    for name, content in {"config.yaml": cfg, "hydra.yaml": hydra_cfg, "overrides.yaml": hydra_cfg.hydra.overrides.task}.items():
        with replacing(folder / name) as tmp:
            tmp.write_text(OmegaConf.to_yaml(content), encoding="utf-8")


def stop(message: str, recorded: bool = False):
    """A user error ends this job: one line, exit status 2, and no run folder left if it did no work. In a sweep it is
    the job's failure, not the sweep's: its result.json says why (unless the stage `recorded` it) and the sweep goes on
    — except under torchrun, where every rank runs the sweep and a rank going on alone would pair its collectives
    with another job's: there the first failed job ends the sweep."""
    if not in_sweep() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        discard_empty_run_folder()
        fail(message)
    print(f"error: {message}", file=sys.stderr)
    if not recorded:
        with suppress(UserError):  # a full disk: the sweep's summary still names the job
            write_result(Path(HydraConfig.get().runtime.output_dir), {"state": "failed", "error": message})
    raise JobFailed(message)


def crash(e: Exception):
    """A bug (no user error): its traceback, as ever. In a sweep, into the job's run.log too, and it is that job's
    failure (see stop)."""
    if not in_sweep():
        raise e
    log.exception("the job failed")
    stop(f"{type(e).__name__}: {first_line(e)}")


def in_sweep() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def objective(result):
    """What a sweeper minimizes: a stage's final val bits per character when it has one (train, evaluate); with
    trainer.early_stop, a run's best one (`best_bpc`), since it may stop past its best."""
    if not isinstance(result, dict) or "bpc" not in result:
        return result
    return result.get("best_bpc", result["bpc"])


def discard_empty_run_folder():
    """A command that failed before doing any work, or showed its work only on the terminal (the REPL, one prompt),
    leaves no run folder: one holding only Hydra's own files."""
    folder = Path(HydraConfig.get().runtime.output_dir)
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {JOB_FILES, f"{HydraConfig.get().job.name}.log"}:
        shutil.rmtree(folder, ignore_errors=True)
        # the folder kr3 chose, not hydra.run.dir's: outputs/<date>/ or <run>/<stage>/ if now empty (another run
        # may just have made its folder there)
        chosen = "hydra.run.dir" not in map(override_key, HydraConfig.get().overrides.hydra)
        if chosen and (folder.parent.parent.name == "outputs" or folder.parent.name in BESIDE_CHECKPOINT):
            with suppress(OSError):
                folder.parent.rmdir()


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    """The `kr3` console script and run.py."""
    # one start time for the processes this command starts (submitit's jobs), so they share the sweep folder
    os.environ.setdefault("KR3_RUN_TIME", repr(time.time()))
    logging.raiseExceptions = False  # a run.log on a full disk: the console still shows each line, without tracebacks
    sys.argv = quote_free_text(sys.argv)
    try:
        from kr3 import overrides

        overrides.check(sys.argv[1:])
    except UserError as e:
        fail(str(e))
    if {"WORLD_SIZE", "TORCHELASTIC_RUN_ID"} & os.environ.keys():  # perhaps under torchrun: join before Hydra
        from kr3 import distributed  # picks the run folder (distributed.launched decides); `--help` needs no torch

        distributed.init()
        atexit.register(distributed.teardown)
    try:
        run_stage()
    except BrokenPipeError:  # `kr3 --help | head -2`: the reader has gone, and wants nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush fails silently too
        sys.exit(1)
