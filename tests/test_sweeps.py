"""Sweeps beyond `-m`: an Optuna search minimizing the final val bpc, and jobs through submitit (Slurm's path, run
locally), each a 2-process DDP run."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from kr3.config import ROOT


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_reviews, write_parquet):
    return write_parquet(tmp_path_factory.mktemp("sweeps") / "kr3.parquet", make_reviews(1500, seed=5))


def run(root, corpus, *args, timeout=400):
    common = [f"paths.root_dir={root}", "data=local", f"data.path={corpus}", "tokenizer.vocab_size=400",
              "experiment=smoke", "trainer.precision=fp32", "trainer.max_steps=4", "trainer.eval_interval=0"]
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, *common], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})


def test_optuna_search_minimizes_the_final_bpc_and_reports(tmp_path, corpus):
    proc = run(tmp_path, corpus, "-m", "stage=train", "hparams_search=optuna_bpc", "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    results = {job.name: json.loads((job / "result.json").read_text()) for job in sweep.glob("[0-9]")}
    assert sorted(results) == ["0", "1", "2"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(r["val"]["bpc"] for r in results.values()))
    report = run(tmp_path, corpus, "stage=report", f"report.dir={sweep}")
    assert report.returncode == 0, report.stderr[-3000:]
    csv = pd.read_csv(sweep / "report.csv")
    assert csv["val_bpc"].iloc[0] == pytest.approx(best["best_value"]) and "trainer.lr" in csv.columns


def test_submitit_jobs_each_run_ddp_in_their_own_folder(tmp_path, corpus):
    """hydra/launcher=submitit_local: Slurm's launcher without Slurm. Two jobs, two tasks each (gloo)."""
    proc = run(tmp_path, corpus, "-m", "stage=train", "hydra/launcher=submitit_local",
               "hydra.launcher.tasks_per_node=2", "trainer.device=cpu", "logger=wandb", "trainer.lr=1e-3,3e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")  # one sweep folder: the jobs agree on the start time
    jobs = sorted(sweep.glob("[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert "cpu × 2 process(es)" in (job / "run.log").read_text()
        assert json.loads((job / "result.json").read_text())["state"] == "finished"
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1  # its own W&B run, from rank 0 alone
