"""Sweeps beyond `-m`: an Optuna search minimizing the final val bpc, its failed trials and its bad settings, and jobs
through submitit (Slurm's path, run locally), each a 2-process DDP run."""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
import yaml

from kr3 import report
from kr3.config import CONFIG_DIR, ROOT


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_reviews, write_parquet):
    return write_parquet(tmp_path_factory.mktemp("sweeps") / "kr3.parquet", make_reviews(1500, seed=5))


def common(root, corpus) -> list[str]:
    return [f"paths.root_dir={root}", "data=local", f"data.path={corpus}", "tokenizer.vocab_size=400",
            "experiment=smoke", "trainer.precision=fp32", "trainer.max_steps=4", "trainer.eval_interval=0"]


def command(*args) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def run(run_kr3, root, corpus, *args):
    return run_kr3(*args, *common(root, corpus), env={"WANDB_MODE": "offline"})


def readme_search_command() -> list[str]:
    """The search-space example of docs/sweeps.md, as written there (its `# needs:` comment left out)."""
    line = next(line.strip() for line in (ROOT / "docs" / "sweeps.md").read_text().splitlines()
                if line.strip().startswith("python run.py -m stage=train hparams_search=optuna_bpc '"))
    return shlex.split(line, comments=True)[2:]


@pytest.mark.e2e
def test_optuna_search_as_the_readme_writes_it_minimizes_the_final_bpc(run_kr3, tmp_path, corpus):
    """Its report's best row is the study's best."""
    args = readme_search_command()
    proc = run(run_kr3, tmp_path, corpus, *args, "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    results = {job.name: json.loads((job / "result.json").read_text()) for job in sweep.glob("[0-9]")}
    assert sorted(results) == ["0", "1", "2"]
    for job in results:  # the command line's space replaced the YAML's for these two keys
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        assert 1e-3 <= config["trainer"]["lr"] <= 3e-2 and config["model"]["n_layers"] in (2, 4)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(r["val"]["bpc"] for r in results.values()))
    df, swept = report.table(report.find_jobs(sweep), sweep)
    assert df["val_bpc"].iloc[0] == pytest.approx(best["best_value"]) and "trainer.lr" in swept


@pytest.mark.e2e
def test_failed_and_diverged_trials_are_told_to_optuna_and_the_study_goes_on(run_kr3, tmp_path, corpus):
    """A trial that cannot be built (3 heads of d_model 64) and one that diverges (lr 1e30) each fail alone; the study
    runs its n_trials, its best is a finished trial, and the command ends with one line naming the failed ones."""
    proc = run(run_kr3, tmp_path, corpus, "-m", "stage=train", "hparams_search=optuna_bpc", "hydra.sweeper.n_trials=4",
               "trainer.lr=choice(1e30, 3e-3)", "model.n_heads=choice(3,2)", "trainer.grad_clip=0", "trainer.max_steps=6")
    assert proc.returncode == 1, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    jobs = sorted(sweep.glob("[0-9]"))
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    expected, failed = {}, []
    for job in jobs:
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        result = json.loads((job / "result.json").read_text())
        if config["model"]["n_heads"] == 3:
            expected[job.name] = "failed"
            assert "is not divisible by model.n_heads=3" in result["error"]
        elif config["trainer"]["lr"] == 1e30:
            expected[job.name] = "diverged"
            assert result["error"].startswith("training diverged by step")
        else:
            expected[job.name] = "finished"
        assert result["state"] == expected[job.name]
        failed += [job.name] if expected[job.name] != "finished" else []
    assert {"failed", "diverged", "finished"} <= set(expected.values())  # the seeded sampler tried all three
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"error: {len(failed)} of 4 jobs failed — #")
    assert sorted(re.findall(r"#(\d) \(", summary)) == failed
    out = proc.stdout + proc.stderr  # the sweep's own lines: its jobs and their errors, not its setup nor Hydra's repeats
    assert not any(line in out for line in ("Study name:", "A new study created", "Error executing job", "Failed experiment"))
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    finished = [json.loads((j / "result.json").read_text())["val"]["bpc"] for j in jobs if expected[j.name] == "finished"]
    assert best["best_value"] == pytest.approx(min(finished))


@pytest.fixture
def copied_search_space():
    """A copy of optuna_bpc.yaml in conf/hparams_search/ with a misspelt key, as a user's copy would have."""
    path = CONFIG_DIR / "hparams_search" / "test_copied_space.yaml"
    text = (CONFIG_DIR / "hparams_search" / "optuna_bpc.yaml").read_text()
    path.write_text(text.replace("      trainer.lr: tag", "      trainer.lrr: tag"))
    yield path.stem
    path.unlink()


@pytest.mark.e2e
def test_bad_search_settings_are_one_line_before_any_trial(run_kr3, tmp_path, corpus, copied_search_space):
    cases = {
        ("hydra.sweeper.n_trials=0",): "error: hydra.sweeper.n_trials=0 must be at least 1",
        ("hydra.sweeper.n_trials=-1",): "error: hydra.sweeper.n_trials=-1 must be at least 1",
        (f"hparams_search={copied_search_space}",): "error: hydra.sweeper.params: trainer.lrr is not a kr3 setting — "
                                                    "did you mean trainer.lr or trainer.muon_lr or trainer.resume?",
        ("hydra.sweeper.params.trainer.lr=tag(log, interval(1e-3, 3e-2))",):
            "error: hydra.sweeper.params.trainer.lr cannot be set on the command line — give the search space as the "
            "key's own sweep: 'trainer.lr=tag(log, interval(1e-3, 3e-2))' (hydra.sweeper.params is for a search-space "
            "YAML file)",
    }
    for args, message in cases.items():
        proc = run(run_kr3, tmp_path, corpus, "-m", "stage=train", "hparams_search=optuna_bpc", *args)
        assert (proc.returncode, proc.stderr.strip()) == (2, message), args
    assert not (tmp_path / "multirun").exists()


@pytest.mark.e2e
@pytest.mark.slow  # Slurm's launcher without Slurm; DDP and sweeps each have their default-tier test
def test_submitit_jobs_each_run_ddp_in_their_own_folder(tmp_path, corpus):
    """hydra/launcher=submitit_local: Slurm's launcher without Slurm. Two jobs, two tasks each (gloo)."""
    proc = subprocess.run(command("-m", "stage=train", *common(tmp_path, corpus), "hydra/launcher=submitit_local",
                                  "hydra.launcher.tasks_per_node=2", "trainer.device=cpu", "logger=wandb",
                                  "trainer.lr=1e-3,3e-3"), capture_output=True, text=True, timeout=400, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")  # one sweep folder: the jobs agree on the start time
    jobs = sorted(sweep.glob("[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert "cpu × 2 process(es)" in (job / "run.log").read_text()
        assert json.loads((job / "result.json").read_text())["state"] == "finished"
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1  # its own W&B run, from rank 0 alone


# python -c BUGGY_PREPARE <kr3's arguments>: stage=prepare with a bug for seed 2
BUGGY_PREPARE = textwrap.dedent("""
    import sys
    from kr3 import cli
    from kr3.stages import prepare

    def run(cfg):
        if cfg.seed == 2:
            raise RuntimeError("a bug in the stage")
        return 0

    prepare.run = run
    sys.argv = ["run.py", *sys.argv[1:]]
    cli.main()
""")


@pytest.mark.e2e
def test_a_bug_in_one_job_is_that_jobs_failure_with_its_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BUGGY_PREPARE, "-m", "stage=prepare", "seed=1,2,3",
                           f"paths.root_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: 1 of 3 jobs failed — #1 (seed=2): RuntimeError: a bug in the "
                                                    "stage (each job's folder has its run.log and result.json)")
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    job = sweep / "1"
    assert json.loads((job / "result.json").read_text()) == {"state": "failed", "error": "RuntimeError: a bug in the stage"}
    log = (job / "run.log").read_text()
    assert "the job failed\nTraceback (most recent call last):" in log and log.endswith("RuntimeError: a bug in the stage\n")
    assert not (sweep / "0" / "result.json").exists() and not (sweep / "2" / "result.json").exists()


def test_a_search_space_over_a_config_group_is_no_unknown_key():
    from hydra_plugins.kr3_sweepers import check_space
    from kr3.config import compose

    config = compose(["hparams_search=optuna_bpc"])
    check_space({"experiment": "choice(smoke, cpu_15min)", "model.n_layers": "choice(2, 4)"}, config)
    with pytest.raises(SystemExit) as e:
        check_space({"model.n_layer": "choice(2, 4)"}, config)
    assert e.value.code == 2


@pytest.mark.e2e
@pytest.mark.slow  # a failed job alone: test_a_diverged_job_of_a_sweep_fails_alone
def test_under_torchrun_the_first_failed_job_ends_the_sweep(tmp_path):
    """Every rank runs the sweep: a rank going on alone past a failed job would pair its collectives with another
    job's, so there the sweep stops (torchrun stops the other ranks)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "run.py"), "-m", "stage=prepare", "data=local", "data.path=a.csv,b.csv",
                           f"paths.root_dir={tmp_path}"], capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode != 0
    assert "error: data.path=a.csv does not exist — check the path" in proc.stderr and "b.csv" not in proc.stderr
