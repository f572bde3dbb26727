"""kr3's sweepers: Hydra's basic sweeper and its Optuna sweeper, except that a failed job is that job's failure, not
the sweep's. Every job (every trial, up to n_trials) runs; a failed trial is told to Optuna as failed; at the end one
line names the failed jobs and the command exits with status 1 (2 for a mistake in the command, before any job).
Hydra makes sweepers only from the hydra_plugins package, hence this module; conf/hydra/sweeper/ selects them."""

from __future__ import annotations

import errno
import logging
import shutil
import sys
from dataclasses import fields, replace
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf


def fail(message: str, status: int):
    """One line and this exit status (raised as an exception, Hydra would print more lines)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


class FailedJobs:
    """A sweeper's launcher, noting the jobs that failed. `forgive`: they come back as completed ones returning None,
    since the basic sweeper stops at the first failure it sees."""

    def __init__(self, launcher, forgive: bool):
        self.launcher, self.forgive = launcher, forgive
        self.failed, self.launched = [], []  # (job number, JobReturn); each job's overrides

    def launch(self, job_overrides, initial_job_idx: int):
        returns = self.launcher.launch(job_overrides, initial_job_idx)
        self.launched += [r.overrides for r in returns]
        self.failed += [(initial_job_idx + i, r) for i, r in enumerate(returns) if r.status == JobStatus.FAILED]
        if self.forgive:
            return [replace(r, status=JobStatus.COMPLETED, _return_value=None) if r.status == JobStatus.FAILED else r
                    for r in returns]
        return [QuietFailure(**{f.name: getattr(r, f.name) for f in fields(r)}) if r.status == JobStatus.FAILED else r
                for r in returns]

    def summary(self) -> str:
        """`2 of 3 jobs failed — #1 (model.n_heads=3): why; #2 ...`: each job by the overrides that set it apart."""

        def why(r) -> str:
            e = r._return_value  # the job's exception (JobReturn.return_value would raise it)
            return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

        def own(overrides) -> str:
            return " ".join(o for o in overrides if not all(o in others for others in self.launched))

        reasons: dict[str, list[str]] = {}  # jobs that failed alike are listed once
        for i, r in self.failed:
            reasons.setdefault(why(r), []).append(f"#{i} ({own(r.overrides)})" if own(r.overrides) else f"#{i}")
        listed = "; ".join(f"{', '.join(jobs)}: {reason}" for reason, jobs in reasons.items())
        return (f"{len(self.failed)} of {len(self.launched)} jobs failed — {listed} (each job's folder has its run.log "
                "and result.json)")


class QuietFailure(JobReturn):
    """A failed job's return, whose value raises its error without Hydra's "Error executing job with overrides" line
    (the job has printed its one line already)."""

    @property
    def return_value(self):
        raise self._return_value


def sweep_with(failed: FailedJobs, config, arguments: list[str], run) -> None:
    """Run a sweep, then one line if a job failed. A full disk (writing multirun.yaml, say) is one line too, and a sweep
    folder it left holding only that file is removed."""
    try:
        run(arguments)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        folder = Path(config.hydra.sweep.dir)
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {"multirun.yaml"}:
            shutil.rmtree(folder, ignore_errors=True)
        fail(f"no space left on the device of {folder.absolute()} — free space and run it again", 2)
    if failed.failed:
        fail(failed.summary(), 1)


class KR3BasicSweeper(BasicSweeper):
    """Hydra's basic sweeper (`-m key=a,b`): every job runs, a failed one is named at the end."""

    def sweep(self, arguments: list[str]):
        self.launcher = failed = FailedJobs(self.launcher, forgive=True)
        returns = []
        sweep_with(failed, self.config, arguments, lambda args: returns.extend(super(KR3BasicSweeper, self).sweep(args)))
        return returns


# the Optuna sweeper's lines that say only what its config says, or what the job's own error line said
SETUP_LINES = ("Study name: ", "Storage: ", "Sampler: ", "Directions: ", "Failed experiment: ")


class KR3OptunaSweeper(OptunaSweeper):
    """Hydra's Optuna sweeper: a failed or diverged trial is told to Optuna as failed and the study goes on to n_trials
    (with max_failure_rate 1, conf/hydra/sweeper/kr3_optuna.yaml); n_trials below 1 and a search-space key that kr3
    does not have are one line before any job."""

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory …"
        logging.getLogger("hydra_plugins.hydra_optuna_sweeper._impl").addFilter(lambda r: not r.getMessage().startswith(
            SETUP_LINES))
        impl = self.sweeper
        if impl.n_trials < 1:
            fail(f"hydra.sweeper.n_trials={impl.n_trials} must be at least 1", 2)
        check_space(impl.params, impl.config)
        impl.launcher = failed = FailedJobs(impl.launcher, forgive=False)
        sweep_with(failed, impl.config, arguments, lambda args: study_or_summary(impl, failed, args))


def study_or_summary(impl, failed: FailedJobs, arguments: list[str]) -> None:
    try:
        impl.sweep(arguments)
    except ValueError:  # optuna's best_trial when no trial completed
        if failed.failed and len(failed.failed) == len(failed.launched):
            fail(f"no trial completed: {failed.summary()}", 1)
        raise


def check_space(params, config) -> None:
    """The search space's keys (hydra.sweeper.params, from a YAML file or the command) are kr3 settings."""
    from kr3.config import CONFIG_DIR, check_key, config_keys, override_key
    from kr3.errors import UserError

    task = OmegaConf.to_container(config, resolve=False)
    task.pop("hydra", None)
    known = config_keys(task)
    for key in (params or {}):
        if (CONFIG_DIR / override_key(str(key))).is_dir():
            continue  # a config group (`experiment: choice(smoke, cpu_15min)`): Hydra checks its options
        try:
            check_key(override_key(str(key)), False, known)
        except UserError as e:
            fail(f"hydra.sweeper.params: {e}", 2)
