"""run.py (and the installed `kr3`) as users type it: one-line errors, exit codes, outputs only where they belong,
--help, packaging."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from kr3.cli import STAGES
from kr3.config import ROOT


def run_cli(tmp_path, *args, stdin=None, timeout=300, env=None):
    # the root last: Hydra's parser takes flags (-m, --help) only before the first override
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, f"paths.root_dir={tmp_path}"],
        capture_output=True, text=True, input=stdin, timeout=timeout, cwd=tmp_path, env=env,
    )


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr


@pytest.mark.e2e
def test_unknown_stage(tmp_path):
    proc = run_cli(tmp_path, "stage=bogus")
    assert_one_line_error(proc, r"stage=bogus is not an option of stage/ — use one of: evaluate, export, generate, ")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.e2e
def test_a_sweep_without_dash_m_says_to_add_it(tmp_path):
    proc = run_cli(tmp_path, "stage=train", "trainer.lr=1e-3,3e-4")
    assert_one_line_error(proc, r"trainer.lr=1e-3,3e-4 is a sweep — add -m to run one job per value: .*run\.py -m "
                                r"stage=train trainer.lr=1e-3,3e-4 ")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.e2e
def test_help_into_a_reader_that_stops_early_is_quiet(tmp_path):
    """`kr3 --help | head -2`: no BrokenPipeError traceback (the reader is gone before the help is written)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.e2e
def test_missing_data_path(tmp_path):
    assert_one_line_error(run_cli(tmp_path, "data=local"), r"data=local needs a file")


@pytest.mark.e2e
def test_missing_file(tmp_path):
    proc = run_cli(tmp_path, "data=local", f"data.path={tmp_path / 'nope.parquet'}")
    assert_one_line_error(proc, r"does not exist")
    assert not (tmp_path / "data").exists()
    assert not list(tmp_path.rglob(".hydra")), "a command that failed before any work left a run folder"


@pytest.mark.e2e
def test_bad_group_override_lists_options(tmp_path):
    proc = run_cli(tmp_path, "data=nope")
    assert_one_line_error(proc, r"^error: data=nope is not an option of data/ — use one of: kr3, local$")
    proc = run_cli(tmp_path, "-m", "model=tiny,huge")  # each option of a sweep too
    assert_one_line_error(proc, r"^error: model=huge is not an option of model/ — use one of: base, pretrained, small, tiny$")
    assert not (tmp_path / "multirun").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("override", ["trainer.lrr=1", "+trainer.lrr=1", "++trainer.lrr=1", "~trainer.lrr"])
def test_unknown_key_names_the_nearest(tmp_path, override):
    """Hydra answers `trainer.lrr=1` with a hint to add `+`, and `+trainer.lrr=1` trains with the typo ignored."""
    proc = run_cli(tmp_path, "stage=prepare", override)
    assert_one_line_error(proc, r"^error: trainer\.lrr is not a kr3 setting — did you mean trainer\.lr or ")
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "data").exists()


@pytest.mark.e2e
def test_unknown_key_hints(tmp_path):
    """A key in the wrong section, a key of the chosen experiment's model, and one like nothing known."""
    assert_one_line_error(run_cli(tmp_path, "lr=1"), r"^error: lr is not a kr3 setting — did you mean trainer\.lr\?$")
    proc = run_cli(tmp_path, "experiment=smoke", "model.n_layer=2")
    assert_one_line_error(proc, r"model\.n_layer is not a kr3 setting — did you mean model\.n_layers")
    assert_one_line_error(run_cli(tmp_path, "zzz=1"), r"zzz is not a kr3 setting — --cfg job prints every key$")
    assert_one_line_error(run_cli(tmp_path, "model.name_or_path=skt/kogpt2-base-v2"),
                          r"model\.name_or_path is not a setting of the model chosen here — model=pretrained has it$")
    assert_one_line_error(run_cli(tmp_path, "experiment=finetune", "model.n_layers=4"),
                          r"model\.n_layers is not a setting of the model chosen here — model=base, model=small and "
                          r"model=tiny have it$")
    assert_one_line_error(run_cli(tmp_path, "experiment.trainer.lr=1"), r"experiment\.trainer\.lr is not a kr3 setting")
    assert_one_line_error(run_cli(tmp_path, "+trainer.lr=1"), r"trainer\.lr is already in the config — set it without the \+")


@pytest.mark.e2e
@pytest.mark.parametrize("override, message", [
    ("model.n_layers=abc", r"model\.n_layers=abc must be an integer \(its default: 6\)"),
    ("generate.temperature=abc", r"generate\.temperature=abc must be a number ≥ 0 \(its default: 0\.8\)"),
    ("trainer.max_steps=ten", r"trainer\.max_steps=ten must be an integer ≥ 1, or null \(its default: None\)"),
    ("trainer.keep_last=null", r"trainer\.keep_last=null must be an integer ≥ 0 \(its default: 3\)"),
    ("seed=1.5", r"seed=1\.5 must be an integer ≥ 0"),
    ("data.val_ratio=abc", r"data\.val_ratio=abc must be a number \(its default: 0\.05\)"),
    ("data.clean.nfc=maybe", r"data\.clean\.nfc=maybe must be true or false \(its default: true\)"),
    ("trainer.betas=0.9", r"trainer\.betas=0\.9 must be a list of numbers, e\.g\. \[1,2\]"),
    ("trainer.lr='1e-3'", r"trainer\.lr='1e-3' must be a number"),  # quoted: text
    ("trainer.betas=[0.9", r"cannot read the override 'trainer\.betas=\[0\.9' \(no viable alternative"),
    ("data.path", r"cannot read the override 'data\.path' \(missing EQUAL"),
])
def test_a_value_of_another_kind_or_bad_syntax_is_one_line(tmp_path, override, message):
    proc = run_cli(tmp_path, "stage=prepare", override)
    assert_one_line_error(proc, message)
    assert not list(tmp_path.rglob(".hydra")) and not (tmp_path / "data").exists()


@pytest.mark.e2e
def test_each_value_of_a_sweep_is_checked_before_any_job(tmp_path):
    proc = run_cli(tmp_path, "-m", "stage=prepare", "trainer.lr=1e-3,abc")
    assert_one_line_error(proc, r"trainer\.lr=abc must be a number")
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "data").exists()


@pytest.mark.e2e
def test_a_seed_of_any_size_is_one_line_and_a_stray_world_size_is_no_launch(tmp_path):
    proc = run_cli(tmp_path, "stage=report", f"seed={10**400}")
    assert_one_line_error(proc, rf"seed={10**400} must be an integer ≥ 0 and ≤ 9223372036854775807")
    # WORLD_SIZE=1 without torchrun (some clusters export it): not a process group to join
    proc = run_cli(tmp_path, "stage=bogus", env={**os.environ, "WORLD_SIZE": "1"})
    assert_one_line_error(proc, r"stage=bogus is not an option of stage/")


@pytest.mark.e2e
@pytest.mark.parametrize("removal", ["~trainer", "~data.clean.min_chars", "~trainer.lr=1e-3"])
def test_removing_a_setting_is_one_line(tmp_path, removal):
    """kr3 reads every setting (kr3.settings types them all): removing one is refused, before any folder."""
    assert_one_line_error(run_cli(tmp_path, "stage=train", removal),
                          rf"^error: {re.escape(removal.split('=')[0])} removes settings kr3 reads — give a value instead")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.e2e
def test_hydra_syntax_still_passes_the_key_check(tmp_path):
    """hydra.* keys, sweeps over keys and groups, experiments and ++ on real keys reach the stage (a report of no
    folder, to stop there)."""
    proc = run_cli(tmp_path, "-m", f"hydra.sweep.dir={tmp_path}/sweep", "hydra/job_logging=disabled", "experiment=smoke",
                   "model=tiny,base", "model.n_layers=1", "trainer.lr=1e-3,3e-4", "++trainer.batch_size=4",
                   "generate.prompt=맛있는 집", "stage=report", f"report.dir={tmp_path}/none")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: 4 of 4 jobs failed — #0 (model=tiny trainer.lr=0.001), #1 (model=tiny trainer.lr=0.0003), #2 (model=base "
        "trainer.lr=0.001), #3 (model=base trainer.lr=0.0003): report.dir=") and "is not a folder" in proc.stderr
    assert (tmp_path / "sweep").is_dir()


@pytest.mark.e2e
def test_help_lists_stages_groups_and_examples(tmp_path):
    proc = run_cli(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    stages = out.split("== Stages")[1].split("==")[1]
    assert [line.split()[0] for line in stages.strip().splitlines()] == list(STAGES)
    groups = out.split("== Config groups")[1].split("== Examples ==")[0]
    assert "model: base, pretrained, small, tiny" in groups
    assert "experiment: cpu_15min, cpu_15min_rating, finetune, original, smoke" in groups
    assert "sweep" not in groups  # sweeps/wandb.yaml is a W&B file, not a Hydra group
    examples = out.split("== Examples ==")[1].strip().split("\n\n")[0].splitlines()
    assert len(examples) == 7 and all(e.strip().startswith("kr3 ") for e in examples)
    assert 'eval "$(kr3 -sc install=bash)"' in out


@pytest.mark.e2e
@pytest.mark.parametrize("line, expected", [
    ("python run.py model=", ["model=base", "model=pretrained", "model=small", "model=tiny"]),
    ("python run.py stage=", sorted(f"stage={stage}" for stage in STAGES)),
    ("python run.py stage=t", ["stage=train"]),
    ("kr3 -m stage=train trainer.l", ["trainer.log_interval=", "trainer.lr="]),
])
def test_tab_completion_answers(tmp_path, line, expected):
    """What bash's Tab offers (conf/stage/ makes the stages a group, so Hydra completes them)."""
    env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
    proc = run_cli(tmp_path, "-sc", "query=bash", env=env)
    assert proc.returncode == 0 and proc.stdout.split() == expected, proc.stderr


@pytest.mark.parametrize("argv0, env, on_path, expected", [
    ("run.py", {"UV_RUN_RECURSION_DEPTH": "1"}, False, "uv run python run.py"),
    ("run.py", {}, True, "python run.py"),
    ("run.py", {}, False, "{python} run.py"),  # a virtual environment not activated: its Python by path
    ("{bin}/kr3", {}, True, "kr3"),
    ("{bin}/kr3", {"UV_RUN_RECURSION_DEPTH": "1"}, True, "uv run kr3"),
    ("{bin}/kr3", {}, False, "{bin}/kr3"),
    ("{bin}/kr3", {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "1"}, True,
     "torchrun --standalone --nproc_per_node=2 --no-python kr3"),
    ("run.py", {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "1", "MASTER_ADDR": "n1",
                "MASTER_PORT": "29500", "UV_RUN_RECURSION_DEPTH": "1"}, False,
     "uv run torchrun --nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=n1:29500 run.py"),
    ("/usr/lib/python3/dist-packages/ipykernel_launcher.py", {}, True, "kr3"),  # a notebook: the installed command
])
def test_hints_name_the_command_as_it_was_started(monkeypatch, argv0, env, on_path, expected):
    """Resume, W&B and 'run this first' hints paste: `uv run …`, `kr3`, torchrun's options, this Python's path."""
    from kr3 import config

    bin_dir = os.path.dirname(sys.executable)
    for key in ("UV_RUN_RECURSION_DEPTH", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", [argv0.format(bin=bin_dir)])
    monkeypatch.setattr(shutil, "which", lambda name: os.path.join(bin_dir, name) if on_path else None)
    assert config.started_as() == expected.format(python=sys.executable, bin=bin_dir)


def test_every_stage_has_its_config_and_module():
    assert sorted(p.stem for p in (ROOT / "conf" / "stage").glob("*.yaml")) == sorted(STAGES)


@pytest.mark.e2e
def test_installed_command_uses_its_packaged_config(tmp_path):
    """`pip install .` gives a `kr3` command carrying conf/ as kr3/conf, with data/ and outputs/ under the folder it
    runs in: the wheel built and installed into a fresh venv (its dependencies from this one), run in an empty folder."""
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("uv builds the wheel")
    build = subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=180)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("kr3-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"kr3/conf/config.yaml", "kr3/conf/hydra/help/kr3.yaml", "kr3/cli.py", "hydra_plugins/kr3_sweepers/__init__.py",
            "kr3/conf/hydra/sweeper/kr3.yaml"} <= set(names)
    assert not [n for n in names if n.startswith("conf/")]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([uv, "pip", "install", "--no-deps", "--python", str(venv / "bin" / "python"), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}

    def kr3(*args):
        return subprocess.run([str(venv / "bin" / "kr3"), *args], capture_output=True, text=True, cwd=work, env=env)

    shown = kr3("--help")
    assert shown.returncode == 0 and all(f"  {stage} " in shown.stdout for stage in STAGES), shown.stderr
    assert_one_line_error(kr3("stage=prepare", "data=local"), r"data=local needs a file")
    assert (work / "outputs").is_dir() and {p.name for p in work.iterdir()} <= {"outputs", "data"}  # the current folder's
    sweep = kr3("-m", "stage=prepare", "data=local", "data.path=a.csv,b.csv")  # kr3's sweeper, from the wheel
    assert sweep.returncode == 1 and sweep.stderr.strip().splitlines()[-1].startswith("error: 2 of 2 jobs failed — "
                                                                                       "#0 (data.path=a.csv): "), sweep.stderr


def test_docker_image_is_lean_and_not_root():
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data/", "outputs/", "multirun/", "**/__pycache__", ".pytest_cache"} <= set(ignored)
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    syncs = [line for line in dockerfile.replace("\\\n", " ").splitlines() if "uv sync" in line]
    assert syncs and all("--mount=type=cache,target=" in line for line in syncs)
    for source in re.findall(r"^COPY (?!--from)(?:--chown=\S+ )?(.+) \S+$", dockerfile, re.M):
        assert all((ROOT / name).exists() and name not in ignored for name in source.split()), source


def test_docker_offers_a_cpu_and_a_gpu_image_that_export_and_serve():
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M)
    assert stages[-1] == "cuda" and "cpu" in stages  # `docker build .` builds the last: the GPU image
    installs = [line for line in dockerfile.splitlines() if re.search(r"uv (sync|export)", line)]
    assert installs and all("--extra hf" in line for line in installs)  # stage=export needs transformers
    cpu = dockerfile.split("AS cpu")[1].split("FROM ")[0]
    assert "download.pytorch.org/whl/cpu" in cpu and "nvidia" in cpu  # CPU torch, the CUDA wheels filtered out
    assert re.search(r"^EXPOSE 8000$", dockerfile, re.M)
    docker = (ROOT / "docs" / "docker.md").read_text()
    assert "mkdir -p data outputs multirun" in docker and "/app/multirun" in docker
    assert "serve.host=0.0.0.0" in docker and "-p 127.0.0.1:8000:8000" in docker and "--target cpu" in docker


@pytest.mark.e2e
def test_prepare_from_the_command_line(tmp_path, corpus_parquet):
    proc = run_cli(tmp_path, "stage=prepare", "data=local", f"data.path={corpus_parquet}", "tokenizer.vocab_size=400")
    assert proc.returncode == 0, proc.stderr
    prepared = [p for p in (tmp_path / "data").iterdir() if not p.name.startswith(".")]
    assert len(prepared) == 1 and (prepared[0] / "meta.json").exists()
    assert "prepare summary" in proc.stdout + proc.stderr
    runs = list((tmp_path / "outputs").glob("*/*/.hydra/config.yaml"))
    assert len(runs) == 1  # Hydra's run folder, under paths.root_dir, not the current directory
    assert {p.name for p in tmp_path.iterdir()} == {"data", "outputs", "src"}


def test_prompt_needs_no_hydra_quotes():
    """Hydra's grammar rejects `generate.prompt=맛있는 집` unquoted; run.py quotes it, escapes included."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from kr3.config import quote_free_text

    parser = OverridesParser.create()
    for prompt in ["맛있는 집", "it's", "a\\", "a\\'b", "x=y, z", '"좋아요" 라는 말', "a${b}"]:
        (arg,) = quote_free_text([f"generate.prompt={prompt}"])
        assert OmegaConf.create({"p": parser.parse_override(arg).value()}).p == prompt
    kept = ["generate.prompt='이미'", "generate.prompt=null", "trainer.lr=1"]
    assert quote_free_text(kept) == kept
