"""stage=report: a table of the runs of a sweep (or of every run under a folder), best first, with curves."""

from __future__ import annotations

import logging
from pathlib import Path

from kr3 import report, settings
from kr3.config import started_as
from kr3.errors import UserError

log = logging.getLogger(__name__)


def run(cfg) -> Path:
    cfg = settings.typed(cfg)
    root = folder(cfg.report.dir, Path(cfg.paths.log_dir))
    jobs = report.find_jobs(root)
    df, swept = report.table(jobs, root)
    written = report.write(df, swept, jobs, root, cfg.report.replicate_keys, cfg.report.baseline)
    log.info(f"\n{df.to_string(index=False, float_format=lambda v: f'{v:.4f}')}\n{report.NOTE}")
    log.info("wrote " + ", ".join(p.name for p in written) + f" into {root}")
    return root


def folder(given: str | None, log_dir: Path) -> Path:
    """report.dir, or the newest multirun folder under the project's multirun/ that holds training runs."""
    if given:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise UserError(f"report.dir={given} is not a folder — give a multirun folder, a run folder or outputs/")
        return path.resolve()
    sweeps = sorted((p for p in (log_dir / "multirun").glob("*/*") if p.is_dir()), reverse=True)
    newest = next((s for s in sweeps if report.find_jobs(s)), None)
    if newest is None:
        raise UserError(f"no multirun of stage=train under {log_dir / 'multirun'} — run a sweep ({started_as()} -m "
                        "stage=train ...) or give report.dir=")
    return newest
