"""Seeds as replicates: a sweep's jobs that differ only in `seed` (and the keys the user names) are runs of one
configuration. Per configuration the mean, standard deviation, count and 95 % confidence interval (Student's t) of
each final metric, whether it is distinguishable from the best (Welch's t-test), and each configuration against a
baseline seed by seed (paired differences)."""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from kr3.errors import UserError

LEVEL = 0.95
LOWER_IS_BETTER = ("val_bpc", "val_review_bpc", "val_loss")  # the metrics compared with the baseline


def configuration_keys(swept: list[str], replicate_keys: list[str]) -> list[str] | None:
    """The swept keys that name a configuration, or None when no replicate key was swept (nothing to group)."""
    keys = ["seed", *replicate_keys]
    return [k for k in swept if k not in keys] if any(k in swept for k in keys) else None


def interval(values: pd.Series) -> tuple[float, float, int, float]:
    """(mean, standard deviation, n, half-width of the 95 % confidence interval of the mean): NaN where n is too small."""
    values = values.dropna().astype(float)
    n = len(values)
    mean = values.mean() if n else math.nan
    sd = values.std(ddof=1) if n > 1 else math.nan
    half = stats.t.ppf((1 + LEVEL) / 2, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return mean, sd, n, half


def configurations(df: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per configuration (its values of `keys`): the jobs it ran and how many finished, the seeds of those that
    did not (never averaged in), and per metric its mean, sd, n and ci95 over the finished jobs; sorted by the mean
    val bpc, with whether each differs from the best at 95 % (Welch's t-test on val bpc)."""
    rows = []
    for values, group in df.groupby(keys, dropna=False, sort=False) if keys else [((), df)]:
        done = group[group["state"] == "finished"]
        left_out = group[group["state"] != "finished"]
        row = {**dict(zip(keys, values if isinstance(values, tuple) else (values,), strict=True)),
               "jobs": len(group), "finished": len(done),
               "not_averaged": ", ".join(f"{job} ({state})" for job, state in zip(left_out["job"], left_out["state"]))}
        for metric in metrics:
            mean, sd, n, half = interval(done[metric])
            row |= {f"{metric}_mean": mean, f"{metric}_sd": sd, f"{metric}_n": n, f"{metric}_ci95": half}
        rows.append(row)
    out = pd.DataFrame(rows).sort_values("val_bpc_mean", na_position="last", kind="stable").reset_index(drop=True)
    out["vs_best"] = [versus_best(df, keys, out.iloc[0], row) for _, row in out.iterrows()]
    return out


def versus_best(df: pd.DataFrame, keys: list[str], best: pd.Series, row: pd.Series) -> str:
    if row is best or all(row[k] == best[k] for k in keys):
        return "best"
    a, b = (finished(df, keys, r)["val_bpc"].dropna() for r in (best, row))
    if len(a) < 2 or len(b) < 2:
        return "too few seeds"
    p = stats.ttest_ind(b, a, equal_var=False).pvalue
    return "worse" if p < 1 - LEVEL else "within noise"


def finished(df: pd.DataFrame, keys: list[str], config: pd.Series) -> pd.DataFrame:
    mask = df["state"] == "finished"
    for k in keys:
        mask &= df[k] == config[k]
    return df[mask]


def baseline_config(df: pd.DataFrame, keys: list[str], given: str) -> dict[str, str]:
    """The configuration `report.baseline` names by its overrides ("trainer.lr=3e-3", several separated by spaces or
    commas), as {key: the value its jobs hold}; a key that is not swept, or no or several matching configurations,
    is one line."""
    wanted = dict(part.split("=", 1) for part in given.replace(",", " ").split() if "=" in part)
    if not wanted or any(k not in keys for k in wanted):
        raise UserError(f"report.baseline={given!r} must name swept settings as key=value — this sweep's configurations "
                        f"differ in {', '.join(keys) or 'nothing but their seeds'}")
    configs = df[keys].drop_duplicates()
    match = configs[[all(same(row[k], v) for k, v in wanted.items()) for _, row in configs.iterrows()]]
    if len(match) != 1:
        shown = "; ".join(" ".join(f"{k}={row[k]}" for k in keys) for _, row in configs.iterrows())
        raise UserError(f"report.baseline={given!r} matches {len(match)} configurations, not one — they are: {shown}")
    return match.iloc[0].to_dict()


def same(value, given: str) -> bool:
    """A config value equals the given text, as a number where both are (3e-3 is 0.003)."""
    try:
        return float(value) == float(given)
    except (TypeError, ValueError):
        return str(value) == given


def paired(df: pd.DataFrame, keys: list[str], baseline: dict[str, str], metrics: list[str]) -> pd.DataFrame:
    """Each configuration against the baseline, seed by seed: per metric the mean of (configuration − baseline) over the
    seeds both finished, its 95 % confidence interval and the verdict — better, worse, or not distinguishable."""
    base = finished(df, keys, pd.Series(baseline)).set_index("seed")
    rows = []
    for values, group in df.groupby(keys, dropna=False, sort=False):
        config = dict(zip(keys, values if isinstance(values, tuple) else (values,), strict=True))
        if config == baseline:
            continue
        mine = group[group["state"] == "finished"].set_index("seed")
        seeds = sorted(set(mine.index) & set(base.index))
        row = {**config, "paired_seeds": len(seeds)}
        for metric in metrics:
            mean, _, n, half = interval(mine.loc[seeds, metric] - base.loc[seeds, metric]) if seeds else (
                math.nan, math.nan, 0, math.nan)
            row |= {f"{metric}_diff": mean, f"{metric}_diff_ci95": half, f"{metric}_verdict": verdict(mean, half, n)}
        rows.append(row)
    return pd.DataFrame(rows)


def verdict(mean: float, half: float, n: int) -> str:
    """Lower is better: the interval wholly below 0 is better, wholly above is worse."""
    if n < 2 or math.isnan(half):
        return "too few seeds"
    if mean + half < 0:
        return "better"
    if mean - half > 0:
        return "worse"
    return "not distinguishable at 95 %"
