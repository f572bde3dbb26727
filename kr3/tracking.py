"""Where a run's metrics go: metrics.jsonl, a logger backend (W&B), the loss-curve PNG, result.json and the process
that writes them. Only the main process tracks; the others get a Tracker that does nothing."""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import time
from pathlib import Path

from kr3 import settings
from kr3.atomic import append_whole, replacing
from kr3.config import tool_command
from kr3.errors import UserError, lookup

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"  # a run's logged rows, one JSON object per line
RESULT = "result.json"  # how a run ended (finished, interrupted, diverged or failed and why); read by report
PROCESS = "process.json"  # the process writing a run (host, pid, its start): report tells a running run from a dead one


class Sink:
    """Where metrics go besides metrics.jsonl: nowhere (logger=none). A backend subclasses it."""

    def __init__(self, cfg, run_dir: Path, resume_id: str | None):
        self.run_id = resume_id

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_samples(self, rows: list[tuple[str, str]], step: int) -> None:
        pass

    def finish(self, plot: Path | None) -> None:
        pass


class WandbSink(Sink):
    """Weights & Biases: offline unless logger.mode or WANDB_MODE say otherwise; files in <run>/wandb/."""

    def __init__(self, cfg, run_dir: Path, resume_id: str | None):
        import wandb

        self.mode = os.environ.get("WANDB_MODE") or cfg.logger.mode
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group or sweep_name(),
            job_type=cfg.stage,
            name=cfg.logger.name,
            tags=list(cfg.logger.tags or []),
            mode=self.mode,
            dir=str(run_dir),
            config=settings.plain(cfg),
            id=resume_id,
            resume="allow" if resume_id else None,
            settings=wandb.Settings(silent=True, x_disable_stats=True),
            reinit="finish_previous",
        )
        self.run_id = self.run.id
        group = f", group {self.run.group}" if self.run.group else ""
        log.info(f"W&B run {self.run.id} ({self.mode}{group}) in {run_dir / 'wandb'}")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, rows: list[tuple[str, str]], step: int) -> None:
        import wandb

        self.run.log({"samples": wandb.Table(columns=["prompt", "completion"], data=rows)}, step=step)

    def finish(self, plot: Path | None) -> None:
        import wandb

        if plot is not None:
            self.run.log({"loss_curve": wandb.Image(str(plot))})
        files = Path(self.run.dir).parent
        self.run.finish()
        if self.mode == "offline":  # W&B's own hint is silenced with the rest of its output
            log.info(f"W&B run saved offline; upload it with: {shlex.join([*tool_command('wandb'), 'sync', str(files)])}")


def sweep_name() -> str | None:
    """A multirun's folder (`<date>/<time>`), the W&B group its jobs share; None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep = Path(HydraConfig.get().sweep.dir)
    return f"{sweep.parent.name}/{sweep.name}"


# logger.kind -> backend; a new logger is a Sink subclass added here
SINKS = {"none": Sink, "wandb": WandbSink}


class Tracker:
    """metrics.jsonl (always), the logger's backend, and the loss plot at `finish`. Only the main process
    tracks: elsewhere every call does nothing."""

    def __init__(self, cfg, run_dir: Path, enabled: bool, resume_id: str | None = None, history_until: int | None = None):
        """`history_until`: resuming in this folder from that step, so rows logged after it (by a run killed
        later than its last checkpoint) are dropped: one history, as the resumed run will log it again."""
        self.enabled, self.run_dir = enabled, Path(run_dir)
        self.metrics_path = self.run_dir / METRICS
        self.sink = None
        self.run_id = resume_id
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if history_until is not None and self.metrics_path.exists():
                self._keep_history_until(history_until)
            self.sink = lookup(SINKS, cfg.logger.kind, "logger.kind")(cfg, self.run_dir, resume_id)
            self.run_id = self.sink.run_id

    def _keep_history_until(self, step: int) -> None:
        kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= step]
        with replacing(self.metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, metrics: dict, step: int) -> None:
        if self.sink is None:
            return
        append_whole(self.metrics_path, (json.dumps({"step": step, **metrics}) + "\n").encode())
        self.sink.log(metrics, step)

    def log_samples(self, rows: list[tuple[str, str]], step: int) -> None:
        if self.sink is not None:
            self.sink.log_samples(rows, step)

    def finish(self) -> None:
        if self.sink is None:
            return
        plot = None
        if self.metrics_path.exists():
            try:
                plot = plot_losses(self.metrics_path, self.run_dir / "loss.png")
            except UserError as e:  # a full disk: the logger's run is still closed
                log.warning(f"loss.png not written: {e}")
        self.sink.finish(plot)
        self.sink = None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows. A last line cut short (a run killed or a disk filled while writing it) is left out with a
    warning; any other line that is not JSON is one error."""
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{path}: line {number} is not JSON — the file was changed by hand; remove that line") \
                    from None
            log.warning(f"{path}: its last line is cut short (a run killed or a full disk while writing it): left out")
    return rows


def write_result(run_dir: Path, result: dict) -> None:
    """result.json: how a run ended."""
    with replacing(Path(run_dir) / RESULT) as tmp:
        tmp.write_text(json.dumps(result, indent=2))


def stamp_process(run_dir: Path) -> None:
    """process.json: this process, so that `stage=report` can tell a run still going from one that was killed."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid()), "time": time.time()}
    with replacing(Path(run_dir) / PROCESS) as tmp:
        tmp.write_text(json.dumps(info))


def process_alive(info: dict) -> bool | None:
    """Whether the process a process.json names still runs; None where this machine cannot tell (another host)."""
    if info.get("host") != socket.gethostname():
        return None
    return pid_alive(info["pid"]) and process_start(info["pid"]) == info.get("started")  # not a reused pid


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def process_start(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (Linux's /proc/<pid>/stat); None where there is no /proc."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of each metrics row that has `key`."""
    return [(r["step"], r[key]) for r in rows if key in r]


def pyplot():
    """matplotlib's pyplot, drawing to files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path) -> Path:
    """`fig` as a PNG at `out`, written whole (a temp file renamed), then closed."""
    fig.tight_layout()
    with replacing(out) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)
    return out


def plot_losses(metrics_path: Path, out: Path) -> Path:
    rows = read_metrics(metrics_path)
    train, val = series(rows, "train/loss"), series(rows, "val/loss")
    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out)
