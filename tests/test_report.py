"""stage=report: a sweep's jobs compared from their own files."""

import json
import os
import socket
import subprocess

import pandas as pd
import pytest
import yaml

from kr3 import replicates, report, tracking
from kr3.config import compose
from kr3.errors import UserError
from kr3.stages import report as report_stage


def fake_job(folder, overrides, val_rows, train_rows, result=None, age_s=0):
    """A job folder as a multirun leaves it: .hydra/, metrics.jsonl and, if it ended, result.json."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["stage=train", *overrides]))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"stage": "train"}))
    rows = [{"step": s, "train/loss": loss, "train/tokens_per_s": tps} for s, loss, tps in train_rows]
    rows += [{"step": s, "val/loss": bpc * 1.5, "val/bpc": bpc} for s, bpc in val_rows]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])))
    if result:
        (folder / "result.json").write_text(json.dumps(result))
    for path in folder.rglob("*"):
        os.utime(path, (path.stat().st_atime - age_s, path.stat().st_mtime - age_s))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "2026-11-29" / "10-00-00"
    fake_job(root / "0", ["trainer.lr=0.001", "model.n_layers=2"], [(10, 4.3), (20, 4.1), (30, 4.05)],
             [(s, 6 - s / 10, 1000 + s) for s in range(1, 31)],
             {"state": "finished", "step": 30, "val": {"loss": 6.0, "bpc": 4.0}, "wall_s": 12.5})
    fake_job(root / "1", ["trainer.lr=0.0003", "model.n_layers=2"], [(10, 4.0), (20, 3.6), (30, 3.55)],
             [(s, 5 - s / 10, 2000) for s in range(1, 31)],
             {"state": "finished", "step": 30, "val": {"loss": 5.0, "bpc": 3.5}, "wall_s": 11.0})
    fake_job(root / "2", ["trainer.lr=0.0001", "model.n_layers=2"], [(10, 4.6)], [(s, 7.0, 900) for s in range(1, 16)],
             {"state": "interrupted", "step": 15, "val": None, "wall_s": 5.0})
    fake_job(root / "3", ["trainer.lr=0.01", "model.n_layers=2"], [], [(1, 9.0, 800)], age_s=3600)
    return root


def test_report_rows_come_from_each_jobs_files(sweep, capsys):
    df, swept = report.table(report.find_jobs(sweep), sweep)
    assert swept == ["trainer.lr"]  # model.n_layers is the same in every job
    assert list(df["job"]) == ["1", "0", "2", "3"]  # by final val bpc, unfinished last
    assert list(df["best"]) == ["★", "", "", ""]
    assert list(df["state"]) == ["finished", "finished", "interrupted", "failed"]
    one = df.iloc[0]
    assert (one["trainer.lr"], one["val_bpc"], one["val_loss"], one["steps"], one["wall_s"]) == ("0.0003", 3.5, 5.0, 30, 11.0)
    assert (one["best_val_bpc"], one["best_step"]) == (3.6, 20)  # periodic only: the last row is the final
    assert df.iloc[1]["tokens_per_s"] == 1016  # the median of its logged windows (1015.5), rounded
    interrupted = df.iloc[2]
    assert (interrupted["best_val_bpc"], interrupted["best_step"], interrupted["steps"]) == (4.6, 10, 15)
    assert not any("/" in column for column in df.columns)  # no job was evaluated with lm-eval tasks


def test_task_scores_of_each_jobs_newest_evaluation_are_columns(sweep):
    """`-m stage=evaluate checkpoint=<job 0>,<job 1> evaluate.tasks=[...]` writes <job>/evaluate/<time>/eval.json."""
    def evaluated(job, when, tasks):
        folder = sweep / job / "evaluate" / when
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text(json.dumps({"bpc": 3.0, **({"tasks": tasks} if tasks is not None else {})}))
        os.utime(folder / "eval.json", (1e9 + int(when[-1]), 1e9 + int(when[-1])))
    evaluated("1", "t1", {"kr3_cloze": {"acc,none": 0.4, "acc_stderr,none": 0.01}})
    evaluated("1", "t2", {"kr3_cloze": {"acc,none": 0.5, "acc_stderr,none": 0.01}, "kr3_bpc": {"bits_per_byte,none": 1.2}})
    evaluated("1", "t3", None)  # newest, without tasks: the one before it counts
    evaluated("0", "t1", {"kr3_cloze": {"acc,none": 0.3}})
    df, _ = report.table(report.find_jobs(sweep), sweep)
    assert list(df.columns[-3:]) == ["kr3_bpc/bits_per_byte", "kr3_cloze/acc", "error"]
    rows = df.set_index("job")
    assert (rows.loc["1", "kr3_cloze/acc"], rows.loc["1", "kr3_bpc/bits_per_byte"], rows.loc["0", "kr3_cloze/acc"]) \
        == (0.5, 1.2, 0.3)
    assert pd.isna(rows.loc["2", "kr3_cloze/acc"])


def test_a_setting_a_job_left_alone_shows_what_it_ran_with(tmp_path):
    """Not NaN: a key's value from the job's config, a group's option from Hydra's choices."""
    fake_job(tmp_path / "0", ["trainer.lr=1e-3", "model=base"], [(10, 4.0)], [(1, 9.0, 800)])
    fake_job(tmp_path / "1", [], [(10, 4.2)], [(1, 9.0, 800)])
    (tmp_path / "1" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"stage": "train", "trainer": {"lr": 3e-4}}))
    (tmp_path / "1" / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {
        "model": "small"}}}}))
    df, swept = report.table(report.find_jobs(tmp_path), tmp_path)
    assert swept == ["model", "trainer.lr"]
    assert df.set_index("job").loc["1", ["model", "trainer.lr"]].tolist() == ["small", "0.0003"]


@pytest.mark.e2e
def test_report_stage_writes_tables_and_pictures(sweep, tmp_path):
    older = sweep.parent / "09-59-59"
    fake_job(older / "0", ["trainer.lr=0.1"], [(10, 5.0)], [(1, 9.0, 800)], {"state": "finished", "step": 10})
    root = report_stage.run(compose(["stage=report"], tmp_path))  # the newest multirun by default
    assert root == sweep
    csv = pd.read_csv(sweep / "report.csv")
    assert list(csv["job"]) == [1, 0, 2, 3] and csv["val_bpc"].iloc[0] == 3.5
    md = (sweep / "report.md").read_text()
    assert "| job" in md and "★" in md and "0.0003" in md and report.NOTE in md
    assert "| 1016 " in md and "1015.5" not in md  # tokens per second as a whole number
    for name in ("curves.png", "bpc_vs_trainer.lr.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_report_errors(tmp_path):
    with pytest.raises(UserError, match="no multirun of stage=train under"):
        report_stage.run(compose(["stage=report"], tmp_path))
    with pytest.raises(UserError, match="is not a folder"):
        report_stage.run(compose(["stage=report", f"report.dir={tmp_path / 'nope'}"], tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no training runs under"):
        report_stage.run(compose(["stage=report", f"report.dir={tmp_path / 'empty'}"], tmp_path))


def test_the_default_is_the_newest_multirun_folder_holding_training_runs(sweep, tmp_path):
    """Newer than the sweep: a file (a report written into multirun/<date>/), a sweep that stopped before its first job
    (only multirun.yaml) and a sweep of another stage; none is taken."""
    (sweep.parent / "report.md").write_text("# an earlier report of the whole day")
    (sweep.parent / "11-00-00").mkdir()
    (sweep.parent / "11-00-00" / "multirun.yaml").write_text("hydra: {}")
    evaluation = sweep.parent / "12-00-00" / "0"
    fake_job(evaluation, ["checkpoint=x"], [], [])
    (evaluation / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"stage": "evaluate"}))
    assert report_stage.folder(None, tmp_path) == sweep


def test_a_torn_last_metrics_line_is_left_out_with_a_warning(sweep, caplog):
    """A disk filled or a run killed while a row was written: the rows before it are read; a bad line elsewhere is not
    a torn write, and is one error."""
    with open(sweep / "1" / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "train/lo')
    df, _ = report.table(report.find_jobs(sweep), sweep)
    assert df.iloc[0]["job"] == "1" and df.iloc[0]["steps"] == 30
    assert "metrics.jsonl: its last line is cut short" in caplog.text
    lines = (sweep / "0" / "metrics.jsonl").read_text().splitlines()
    (sweep / "0" / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2 is not JSON — .*remove that line"):
        report.table(report.find_jobs(sweep), sweep)


def test_a_job_without_result_runs_only_while_its_process_lives(sweep):
    """process.json names the job's process: a live one is running, a dead one (SIGKILL: no result.json) failed however
    fresh its files; on another host the age of its files decides."""
    job = sweep / "3"
    os.utime(job / "metrics.jsonl")  # it logged just now
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": tracking.process_start(os.getpid())}
    states = {}
    for name, info in [("alive", me), ("dead", {**me, "pid": dead_pid()}), ("reused", {**me, "started": -1}),
                       ("elsewhere", {**me, "host": "another-host"})]:
        (job / "process.json").write_text(json.dumps(info))
        states[name] = report.job_row(job, sweep)["state"]
    assert states == {"alive": "running", "dead": "failed", "reused": "failed", "elsewhere": "running"}


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.e2e
def test_a_real_sweep_with_a_failing_job_then_its_report(run_kr3, tmp_path, make_reviews, write_parquet):
    """`-m … model.n_heads=2,3,4`: the job that cannot be built fails alone (its result.json says why), the others run,
    the command ends with one line naming it; stage=report (the newest multirun by default) shows all three."""
    src = write_parquet(tmp_path / "kr3.parquet", make_reviews(1500, seed=4))
    common = [f"paths.root_dir={tmp_path}", "data=local", f"data.path={src}", "tokenizer.vocab_size=400",
              "experiment=smoke", "trainer.precision=fp32", "trainer.max_steps=6", "trainer.eval_interval=3"]
    sweep = run_kr3("-m", "stage=train", *common, "model.n_heads=2,3,4")
    why = "model.d_model=64 is not divisible by model.n_heads=3 — pick n_heads from [1, 2, 4, 8, 16, 32]"
    assert sweep.returncode == 1, sweep.stderr
    assert sweep.stderr.strip().splitlines()[-1] == (f"error: 1 of 3 jobs failed — #1 (model.n_heads=3): {why} (each job's "
                                                     "folder has its run.log and result.json)")
    done = run_kr3("stage=report", f"paths.root_dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    folder = next((tmp_path / "multirun").glob("*/*"))
    csv = pd.read_csv(folder / "report.csv", keep_default_na=False)
    assert list(csv["model.n_heads"]) == [2, 4, 3] or list(csv["model.n_heads"]) == [4, 2, 3]
    assert list(csv["state"]) == ["finished", "finished", "failed"] and list(csv["error"]) == ["", "", why]
    for _, row in csv.iloc[:2].iterrows():
        result = json.loads((folder / str(row["job"]) / "result.json").read_text())
        assert float(row["val_bpc"]) == pytest.approx(result["val"]["bpc"]) and row["steps"] == result["step"] == 6
    assert json.loads((folder / "1" / "result.json").read_text()) == {"state": "failed", "error": why}
    assert "★" in (folder / "report.md").read_text()


T_975_3 = 3.182446  # Student's t, 97.5th percentile, 3 degrees of freedom (a textbook table's)


def seeded_sweep(root, runs):
    """Jobs of `trainer.lr` × `seed` with final val bpc `bpc` (None: the job died before its result)."""
    for i, (lr, seed, bpc) in enumerate(runs):
        result = {"state": "finished", "step": 30, "val": {"loss": bpc * 1.5, "bpc": bpc}, "wall_s": 10.0} if bpc else None
        fake_job(root / str(i), [f"trainer.lr={lr}", f"seed={seed}"], [(30, bpc or 9.0)],
                 [(s, 5.0, 1000 + i) for s in range(1, 31)], result, age_s=0 if bpc else 3600)
    return root


BASE = [3.50, 3.52, 3.49, 3.51]  # trainer.lr=0.003, seeds 1-4


def test_seeds_are_replicates_with_mean_sd_and_confidence_interval(tmp_path):
    other = [3.40, 3.45, 3.41, None]  # trainer.lr=0.01: seed 4 failed
    root = seeded_sweep(tmp_path / "sweep", [(0.003, s, b) for s, b in zip(range(1, 5), BASE)]
                        + [(0.01, s, b) for s, b in zip(range(1, 5), other)])
    df, swept = report.table(report.find_jobs(root), root)
    written = report.write(df, swept, report.find_jobs(root), root)
    configs = pd.read_csv(root / "configs.csv")
    base = configs[configs["trainer.lr"] == 0.003].iloc[0]
    mean = sum(BASE) / 4
    sd = (sum((x - mean) ** 2 for x in BASE) / 3) ** 0.5
    assert base["val_bpc_mean"] == pytest.approx(mean) and base["val_bpc_sd"] == pytest.approx(sd)
    assert base["val_bpc_n"] == 4 and base["val_bpc_ci95"] == pytest.approx(T_975_3 * sd / 2, rel=1e-5)
    fast = configs.iloc[0]  # the better configuration first
    assert fast["trainer.lr"] == 0.01 and fast["finished"] == 3 and fast["val_bpc_n"] == 3
    assert fast["val_bpc_mean"] == pytest.approx((3.40 + 3.45 + 3.41) / 3)
    assert "(failed)" in fast["not_averaged"] and fast["vs_best"] == "best" and base["vs_best"] == "worse"
    text = (root / "report.md").read_text()
    assert "## Configurations: seeds as replicates" in text and "failed" in text
    assert root / "bpc_vs_trainer.lr.png" in written and (root / "bpc_vs_trainer.lr.png").stat().st_size > 1000


@pytest.mark.parametrize("diffs, verdict", [
    ([0.01, -0.01, 0.005, -0.004], "not distinguishable at 95 %"),
    ([0.10, 0.12, 0.09, 0.11], "worse"),
    ([-0.10, -0.13, -0.09, -0.11], "better"),
])
def test_each_configuration_against_the_baseline_seed_by_seed(tmp_path, diffs, verdict):
    runs = [(0.003, s, b) for s, b in zip(range(1, 5), BASE)] + [(0.01, s, b + d) for s, b, d in
                                                                  zip(range(1, 5), BASE, diffs)]
    root = seeded_sweep(tmp_path / "multirun" / "2026-12-07" / "10-00-00", runs)
    report_stage.run(compose(["stage=report", 'report.baseline="trainer.lr=3e-3"'], tmp_path))
    rows = pd.read_csv(root / "report.csv")
    assert set(rows.loc[rows["trainer.lr"] == 0.01, "vs_baseline"]) == {verdict}
    assert set(rows.loc[rows["trainer.lr"] == 0.003, "vs_baseline"]) == {"baseline"}
    mean = sum(diffs) / 4
    half = T_975_3 * (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5 / 2
    df, _ = report.table(report.find_jobs(root), root)
    compared = replicates.paired(df, ["trainer.lr"], {"trainer.lr": "0.003"}, ["val_bpc"]).iloc[0]
    assert compared["paired_seeds"] == 4 and compared["val_bpc_verdict"] == verdict
    assert compared["val_bpc_diff"] == pytest.approx(mean) and compared["val_bpc_diff_ci95"] == pytest.approx(half, rel=1e-5)
    assert "## Against the baseline (trainer.lr=0.003" in (root / "report.md").read_text()
    assert (root / "versus_baseline.png").stat().st_size > 1000


def test_a_baseline_that_names_no_configuration_is_one_line(tmp_path):
    root = seeded_sweep(tmp_path / "sweep", [(0.003, s, b) for s, b in zip(range(1, 3), BASE)]
                        + [(0.01, s, b) for s, b in zip(range(1, 3), BASE)])
    df, swept = report.table(report.find_jobs(root), root)
    with pytest.raises(UserError, match="matches 0 configurations, not one — they are: trainer.lr=0.003"):
        report.write(df, swept, report.find_jobs(root), root, baseline="trainer.lr=1")
    with pytest.raises(UserError, match="must name swept settings as key=value"):
        report.write(df, swept, report.find_jobs(root), root, baseline="model.n_layers=2")
    assert not (root / "report.md").exists()  # refused before writing anything


def test_a_baseline_for_a_sweep_without_seeds_is_one_line(sweep):
    df, swept = report.table(report.find_jobs(sweep), sweep)
    with pytest.raises(UserError, match="do not sweep seed .* — sweep seed=1,2,3 too"):
        report.write(df, swept, report.find_jobs(sweep), sweep, baseline="trainer.lr=0.001")
    assert not (sweep / "report.md").exists()
