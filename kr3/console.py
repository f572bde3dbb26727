"""What a stage shows on the terminal besides its log: progress bars on stderr, and two-column tables for summaries."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, desc: str = "", total: int | None = None, unit: str = "it", enabled: bool = True, **kw):
    """A progress bar on stderr; `enabled=False` (non-main ranks) yields silently."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, leave=False, **kw)


def logs_above_bars():
    """While it lasts, log lines go above the progress bars on the terminal, not into the bar's line."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def table(rows: list[tuple[str, object]], title: str = "") -> str:
    """Two-column plain-text table for end-of-stage summaries."""
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 20)] if title else []
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
