"""Comparing runs: one row per job of a sweep (or per run under outputs/), read from what each job wrote
(`.hydra/overrides.yaml`, `metrics.jsonl`, `result.json`, and the lm-eval task scores of its evaluations), and the
pictures: every job's curves, and the final bits per character against each swept number."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import pandas as pd
import yaml

from kr3 import replicates
from kr3.atomic import replacing
from kr3.config import override_key, within
from kr3.errors import UserError
from kr3.tracking import METRICS, PROCESS, RESULT, process_alive, pyplot, read_metrics, save_figure, series

RUNNING_WITHIN_S = 300  # a job without result.json whose process cannot be checked (another host) and that logged this
# recently is taken to be running
NOTE = ("val_bpc and val_loss: the final evaluation, on all of val (at most trainer.final_eval_tokens), read as one "
        "stream; val_review_bpc: the same reviews, each read alone from its start, as a prompt is; best_val_bpc "
        "(at best_step): the lowest periodic evaluation, on val's first trainer.eval_tokens tokens only — other tokens, "
        "so it can be below val_bpc without the model having been better then. tokens_per_s: the median of the logged "
        "windows; early_stopped: the step at which trainer.early_stop ended the run; wall_s: the training time, a "
        "resumed run's parts summed.")
COLUMNS = ["job", "state", "val_bpc", "val_review_bpc", "val_loss", "best_val_bpc", "best_step", "steps", "early_stopped",
           "tokens_per_s", "wall_s", "error"]


def find_jobs(folder: Path) -> list[Path]:
    """Training run folders at or below `folder`: those holding `.hydra/overrides.yaml` and a metrics.jsonl,
    result.json or run.log (a job that failed before its first log still counts)."""
    candidates = [folder, *sorted(p.parent.parent for p in folder.rglob(".hydra/overrides.yaml"))]
    seen, jobs = set(), []
    for job in candidates:
        if job not in seen and (job / ".hydra" / "overrides.yaml").exists() and (
                (job / METRICS).exists() or (job / RESULT).exists() or (job / "run.log").exists()):
            seen.add(job)
            jobs.append(job)
    return [j for j in jobs if _is_train(j)]


def _is_train(job: Path) -> bool:
    config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) if (job / ".hydra" / "config.yaml").exists() else {}
    return (config or {}).get("stage") == "train"


def overrides(job: Path) -> dict[str, str]:
    """The job's command-line overrides as {key: value}, Hydra's own and the stage left out."""
    items = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    pairs = ((override_key(item), item.split("=", 1)[1]) for item in items if "=" in item)
    return {k: v for k, v in pairs if not within(k, "hydra") and k != "stage"}


def settings_of(job: Path, keys: list[str]) -> dict[str, str | None]:
    """Each of `keys` in this job: as its command gave it, else what it ran with — its group's option
    (hydra.runtime.choices) or its config's value — so a setting the job left alone shows its default, not NaN."""
    given = overrides(job)
    hydra_file, config_file = job / ".hydra" / "hydra.yaml", job / ".hydra" / "config.yaml"
    choices = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {}) \
        if hydra_file.exists() else {}
    config = yaml.safe_load(config_file.read_text()) or {} if config_file.exists() else {}
    return {k: given.get(k) or choices.get(k) or as_text(dotted(config, k)) for k in keys}


def dotted(config: dict, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def as_text(value) -> str | None:
    return None if value is None or isinstance(value, dict) else yaml.safe_dump(value, default_flow_style=True).strip(
        ).removesuffix("...").strip()


def job_label(job: Path, root: Path) -> str:
    """The job column: its folder under `root` (`root`'s own name when the report is of one run)."""
    return str(job.relative_to(root)) if job != root else job.name


def job_row(job: Path, root: Path) -> dict:
    rows = read_metrics(job / METRICS) if (job / METRICS).exists() else []
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/bpc" in r]
    result = json.loads((job / RESULT).read_text()) if (job / RESULT).exists() else {}
    periodic = val[:-1] if result.get("state") == "finished" else val  # the last one of a finished run is the final
    best = min(periodic, key=lambda r: r["val/bpc"], default=None)
    final = result.get("val") or {}
    return {
        "job": job_label(job, root),
        "state": result.get("state") or _unfinished_state(job),
        "val_bpc": final.get("bpc", math.nan), "val_review_bpc": final.get("review_bpc", math.nan),
        "val_loss": final.get("loss", math.nan),
        "best_val_bpc": best["val/bpc"] if best else math.nan, "best_step": best["step"] if best else None,
        "steps": max((r["step"] for r in train), default=0), "early_stopped": result.get("early_stopped"),
        "tokens_per_s": round(statistics.median(r["train/tokens_per_s"] for r in train)) if train else None,
        "wall_s": result.get("wall_s", math.nan), "error": result.get("error", ""), **task_scores(job),
    }


def task_scores(job: Path) -> dict:
    """The lm-eval task scores of the job's newest evaluation that ran tasks (stage=evaluate evaluate.tasks=[...]
    writes <run>/evaluate/<time>/eval.json): {"<task>/<metric>": value}, standard errors left out."""
    found = [(p.stat().st_mtime, json.loads(p.read_text())) for p in job.glob("evaluate/*/eval.json")]
    newest = max(((t, e) for t, e in found if e.get("tasks")), key=lambda te: te[0], default=(0, {}))[1]
    return {f"{task}/{metric.split(',')[0]}": value for task, scores in newest.get("tasks", {}).items()
            for metric, value in scores.items() if "stderr" not in metric}


def _unfinished_state(job: Path) -> str:
    """A job without result.json runs while its process does (process.json); where that cannot be checked (another
    host, an older run), while it logged in the last RUNNING_WITHIN_S seconds. Else it died without a word: failed."""
    alive = process_alive(json.loads((job / PROCESS).read_text())) if (job / PROCESS).exists() else None
    if alive is None:
        logs = [p for p in (job / METRICS, job / "run.log") if p.exists()]
        alive = any(time.time() - p.stat().st_mtime < RUNNING_WITHIN_S for p in logs)
    return "running" if alive else "failed"


def table(jobs: list[Path], root: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per job, the swept overrides as columns, sorted by final val bpc (best first, marked)."""
    if not jobs:
        raise UserError(f"no training runs under {root} — give report.dir=<a multirun folder, a run folder or outputs/>")
    found = [overrides(j) for j in jobs]
    swept = sorted({k for o in found for k in o if len({o.get(k) for o in found}) > 1})
    df = pd.DataFrame([{**job_row(j, root), **settings_of(j, swept)} for j in jobs])
    tasks = sorted(c for c in df.columns if c not in COLUMNS and c not in swept)  # lm-eval's, where jobs were evaluated
    df = df[["job", *swept, *COLUMNS[1:-1], *tasks, "error"]].sort_values("val_bpc", na_position="last", kind="stable")
    df[["best_step", "tokens_per_s"]] = df[["best_step", "tokens_per_s"]].astype("Int64")
    df.insert(1, "best", ["★" if i == 0 and not math.isnan(v) else "" for i, v in enumerate(df["val_bpc"])])
    return df.reset_index(drop=True), swept


def write(df: pd.DataFrame, swept: list[str], jobs: list[Path], root: Path, replicate_keys: list[str] = (),
          baseline: str | None = None) -> list[Path]:
    """report.md, report.csv, curves.png and bpc_vs_<param>.png into `root` — and where seeds were swept, configs.csv
    (seeds as replicates) and with a baseline, versus_baseline.png; the paths written."""
    keys = replicates.configuration_keys(swept, list(replicate_keys))
    configs, compared, sections = None, None, []
    if keys is not None:
        metrics = [m for m in ("val_bpc", "val_review_bpc", *task_columns(df), "tokens_per_s") if df[m].notna().any()]
        configs = replicates.configurations(df, keys, metrics)
        sections.append(configs_section(configs, keys))
        if baseline:
            base = replicates.baseline_config(df, keys, baseline)
            lower = [m for m in metrics if m in replicates.LOWER_IS_BETTER]
            compared = replicates.paired(df, keys, base, lower)
            sections.append(baseline_section(compared, keys, base, lower))
            df = df.merge(compared[[*keys, "val_bpc_verdict"]].rename(columns={"val_bpc_verdict": "vs_baseline"}),
                          on=keys, how="left").fillna({"vs_baseline": "baseline"})
    elif baseline:
        raise UserError(f"report.baseline={baseline!r} compares configurations seed by seed, and this report's jobs do "
                        "not sweep seed (or report.replicate_keys) — sweep seed=1,2,3 too")
    written = [root / "report.md", root / "report.csv"]
    with replacing(written[0]) as tmp:
        tmp.write_text(f"# Runs under {root}\n\n{df.round(4).to_markdown(index=False, disable_numparse=True)}\n\n{NOTE}\n"
                       + "".join(sections))
    with replacing(written[1]) as tmp:
        df.to_csv(tmp, index=False)
    labels = {job_label(j, root): j for j in jobs}
    written.append(plot_curves(df, swept, labels, root / "curves.png"))
    if configs is not None:
        with replacing(root / "configs.csv") as tmp:
            configs.to_csv(tmp, index=False)
        written.append(root / "configs.csv")
    for param in swept:
        if configs is not None and param in keys:
            values = pd.to_numeric(configs[param], errors="coerce")
            bpc, err = configs["val_bpc_mean"], configs["val_bpc_ci95"]
        elif configs is None:
            values, bpc, err = pd.to_numeric(df[param], errors="coerce"), df["val_bpc"], None
        else:
            continue
        if values.notna().all() and bpc.notna().sum() > 1:
            written.append(plot_against(values, bpc, err, param, root / f"bpc_vs_{param}.png"))
    if compared is not None and len(compared):
        written.append(plot_versus_baseline(compared, keys, root / "versus_baseline.png"))
    return written


def task_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if "/" in c]


def configs_section(configs: pd.DataFrame, keys: list[str]) -> str:
    shown = configs[[*keys, "jobs", "finished", "val_bpc_mean", "val_bpc_sd", "val_bpc_n", "val_bpc_ci95", "vs_best",
                     "not_averaged"]]
    return (f"\n## Configurations: seeds as replicates\n\nJobs that differ only in their seed are runs of one "
            f"configuration. val_bpc is given as mean, sd, n and the half-width of its 95 % confidence interval "
            f"(Student's t), over finished jobs only. Jobs that did not finish are named, not averaged. vs_best: "
            f"'within noise' when Welch's t-test cannot tell the configuration from the best at 95 %. Every metric is in "
            f"configs.csv.\n\n{shown.round(4).to_markdown(index=False, disable_numparse=True)}\n")


def baseline_section(compared: pd.DataFrame, keys: list[str], base: dict, metrics: list[str]) -> str:
    columns = [*keys, "paired_seeds", *(f"{m}_{part}" for m in metrics for part in ("diff", "diff_ci95", "verdict"))]
    named = " ".join(f"{k}={v}" for k, v in base.items())
    return (f"\n## Against the baseline ({named}), seed by seed\n\nFor each configuration: the mean of (configuration "
            f"− baseline) over the seeds both finished, with its 95 % confidence interval. Lower bpc is better, so a "
            f"verdict is 'better' or 'worse' only when the whole interval is on one side of 0.\n\n"
            f"{compared[columns].round(4).to_markdown(index=False, disable_numparse=True)}\n")


def _label(row, swept: list[str]) -> str:
    return " ".join(f"{k.split('.')[-1]}={_short(row[k])}" for k in swept) or row["job"]


def _short(value) -> str:
    """4 significant digits for numbers (Optuna's trials carry 16), anything else as it is."""
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def plot_curves(df: pd.DataFrame, swept: list[str], jobs: dict[str, Path], out: Path) -> Path:
    fig, (top, bottom) = pyplot().subplots(2, 1, figsize=(8, 7), dpi=110, sharex=True)
    for _, row in df.iterrows():
        path = jobs[row["job"]] / METRICS
        rows = read_metrics(path) if path.exists() else []
        val, train = series(rows, "val/bpc"), series(rows, "train/loss")
        label = _label(row, swept)
        if val:
            top.plot(*zip(*val), "o-", lw=1.2, ms=3, label=label)
        if train:
            bottom.plot(*zip(*train), lw=0.8, label=label)
    top.set_ylabel("val bits per character")
    bottom.set_ylabel("train loss (nats/token)")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    bottom.legend(fontsize=7, loc="upper right")
    return save_figure(fig, out)


def plot_against(values: pd.Series, bpc: pd.Series, err: pd.Series | None, param: str, out: Path) -> Path:
    """Final val bpc against a swept number: each job, or with `err` each configuration's mean and 95 % interval."""
    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=110)
    ax.errorbar(values, bpc, yerr=err, fmt="o", capsize=3)
    if values.min() > 0 and values.max() / values.min() >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylabel("final val bits per character" + (" (mean, 95 % CI)" if err is not None else ""))
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def plot_versus_baseline(compared: pd.DataFrame, keys: list[str], out: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(6, 0.5 * len(compared) + 1.5), dpi=110)
    labels = [" ".join(f"{k.split('.')[-1]}={_short(row[k])}" for k in keys) for _, row in compared.iterrows()]
    ax.errorbar(compared["val_bpc_diff"], range(len(compared)), xerr=compared["val_bpc_diff_ci95"], fmt="o", capsize=3)
    ax.axvline(0, color="gray", lw=1)
    ax.set_yticks(range(len(compared)), labels)
    ax.set_xlabel("val bpc − baseline's, seed by seed (mean, 95 % CI): left is better")
    ax.grid(alpha=0.3)
    return save_figure(fig, out)
