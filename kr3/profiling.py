"""trainer.profile: a torch.profiler trace of a few training steps, for Perfetto (ui.perfetto.dev) or
chrome://tracing, and the table of the ops that took the most time. Nothing is created when it is off."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kr3.atomic import replacing

log = logging.getLogger(__name__)
TOP_OPS = 25


class StepProfiler:
    """Traces steps [start, start + steps) of the run; `at(step)` is called before each step, `close()` at the end."""

    def __init__(self, cfg, out_dir: Path, enabled: bool):
        self.start, self.steps = int(cfg.start), int(cfg.steps)
        self.out_dir = Path(out_dir)
        self.enabled = enabled and self.steps > 0
        self.prof = None

    def at(self, step: int) -> None:
        if not self.enabled:
            return
        if step == self.start and self.prof is None:
            self._begin()
        elif step == self.start + self.steps:
            self.close()

    def _begin(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities, record_shapes=True, with_stack=True, profile_memory=True)
        self.prof.start()
        log.info(f"profiling steps {self.start}–{self.start + self.steps - 1}")

    def close(self) -> None:
        """Stop tracing and write trace.json.gz (gzipped: 18x smaller for gpu_check's CPU dry run) and top_ops.txt into the
        profile folder."""
        if self.prof is None:
            return
        prof, self.prof, self.enabled = self.prof, None, False
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with replacing(self.out_dir / "trace.json.gz") as tmp:  # torch gzips a .gz path
            prof.export_chrome_trace(str(tmp))
        tables = [top_ops(prof, "cpu")] + ([top_ops(prof, "cuda")] if torch.cuda.is_available() else [])
        with replacing(self.out_dir / "top_ops.txt") as tmp:
            tmp.write_text("\n\n".join(tables) + "\n")
        log.info("\n" + "\n\n".join(tables))
        log.info(f"profile: {self.out_dir / 'trace.json.gz'} (open in ui.perfetto.dev or chrome://tracing) and top_ops.txt")


def top_ops(prof, device: str) -> str:
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=TOP_OPS, max_name_column_width=60)
    return f"top {TOP_OPS} ops by self {device.upper()} time\n{table}"
