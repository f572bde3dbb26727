"""run.py as users type it: one-line errors, exit codes, outputs only where they belong."""

import subprocess
import sys

from kr3.config import ROOT


def run_cli(tmp_path, *args, stdin=None, timeout=300):
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), f"paths.root_dir={tmp_path}", *args],
        capture_output=True, text=True, input=stdin, timeout=timeout, cwd=tmp_path,
    )


def assert_one_line_error(proc, pattern):
    import re

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr


def test_unknown_stage(tmp_path):
    proc = run_cli(tmp_path, "stage=bogus")
    assert_one_line_error(proc, r"stage=bogus is not a stage — use one of: prepare, train, generate, evaluate")


def test_missing_data_path(tmp_path):
    assert_one_line_error(run_cli(tmp_path, "data=local"), r"data=local needs a file")


def test_missing_file(tmp_path):
    proc = run_cli(tmp_path, "data=local", f"data.path={tmp_path / 'nope.parquet'}")
    assert_one_line_error(proc, r"does not exist")
    assert not (tmp_path / "data").exists()


def test_bad_group_override_lists_options(tmp_path):
    proc = run_cli(tmp_path, "data=nope")
    assert proc.returncode != 0
    assert "Could not find 'data/nope'" in proc.stderr and "local" in proc.stderr


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
