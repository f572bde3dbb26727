import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kr3 import checkpoint
from kr3.batches import Batches
from kr3.config import ROOT, compose
from kr3.errors import UserError
from kr3.tracking import read_metrics
from kr3.trainer import lr_at


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_reviews, write_parquet):
    d = tmp_path_factory.mktemp("train_corpus")
    write_parquet(d / "kr3.parquet", make_reviews(3000, seed=1))
    return d


def base(corpus, tmp_path):
    """Smoke runs on the module's corpus, in fp32: the tests compare numbers (bf16 on CPUs that have it)."""
    return [f"paths.root_dir={tmp_path}", f"paths.data_dir={corpus / 'data'}", "data=local",
            f"data.path={corpus / 'kr3.parquet'}", "tokenizer.vocab_size=500", "experiment=smoke",
            "trainer.precision=fp32"]


def torchrun(processes: int, *args, timeout=300):
    """run.py under torchrun (gloo); in-process runs (the run_kr3 fixture) are the one-process references."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run([*launcher, str(ROOT / "run.py"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def train_in_process(corpus, tmp_path, *overrides):
    from kr3.stages import train

    cfg = compose(root=tmp_path, overrides=[*base(corpus, tmp_path)[1:], "stage=train", f"paths.output_dir={tmp_path / 'run'}",
                                 *overrides])
    return train.run(cfg), tmp_path / "run"


def losses(run_dir, key="train/loss"):
    return {r["step"]: r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if key in r}


def test_lr_schedule():
    class C:
        lr, warmup_steps, min_lr_ratio = 1.0, 10, 0.1

    assert lr_at(0, 100, C) == pytest.approx(0.1)
    assert lr_at(9, 100, C) == pytest.approx(1.0)
    assert lr_at(100, 100, C) == pytest.approx(0.1)
    assert 0.1 < lr_at(55, 100, C) < 1.0


EOS = 7000  # the end-of-review token of review packing's test file


@pytest.mark.parametrize("review_end", [None, EOS], ids=["stream", "reviews"])
def test_batches_split_the_global_batch_across_ranks(tmp_path, monkeypatch, review_end):
    path = tmp_path / "t.bin"
    tokens = np.arange(6000, dtype=np.uint16)
    tokens[np.random.default_rng(0).random(6000) < 0.15] = EOS  # reviews of ~6 tokens
    tokens.tofile(path)
    one = Batches(path, "uint16", 16, batch_size=8, accum=1, seed=0, review_end=review_end)
    for step in (0, 3, one.steps_per_epoch + 1):  # the next epoch too
        x1, y1 = one.get(step, 0)
        parts = []
        for r in range(2):
            monkeypatch.setenv("WORLD_SIZE", "2")
            monkeypatch.setenv("RANK", str(r))
            parts.append(Batches(path, "uint16", 16, batch_size=4, accum=1, seed=0, review_end=review_end).get(step, 0))
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.delenv("RANK")
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x1)
        assert np.array_equal(y1[:, :-1], x1[:, 1:])
    accum = Batches(path, "uint16", 16, batch_size=4, accum=2, seed=0, review_end=review_end)
    assert np.array_equal(np.concatenate([accum.get(3, 0)[0], accum.get(3, 1)[0]]), one.get(3, 0)[0])
    rows = torch.cat([one.get(s, 0)[0] for s in range(one.steps_per_epoch)])
    starts = np.sort(one._epoch_order(0)[: len(rows)])
    assert (np.diff(starts) >= 16).all()  # an epoch never repeats a window, nor shares an input token between two
    if review_end is not None:  # each row starts at a review's end token, the next row at the next review
        assert set(rows[:, 0].tolist()) == {EOS}
        longest = np.diff(np.flatnonzero(tokens == EOS)).max()
        assert (np.diff(starts) < 16 + longest).all()


@pytest.mark.e2e
# compile's path: the gpt2 case; the llama block: test_model
@pytest.mark.parametrize("arch", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_compiled_training_matches_eager(corpus, tmp_path, arch):
    """trainer.compile=true traces the model and its chunked loss (an autograd.Function) into the same math."""
    common = ["trainer.max_steps=4", "trainer.eval_interval=0", "trainer.final_eval_tokens=1024", f"model.arch={arch}"]
    eager, eager_dir = train_in_process(corpus, tmp_path / "eager", *common)
    compiled, compiled_dir = train_in_process(corpus, tmp_path / "compiled", *common, "trainer.compile=true")
    a, b = losses(eager_dir), losses(compiled_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-4)
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)


@pytest.mark.e2e
def test_train_end_to_end(corpus, tmp_path):
    val, run_dir = train_in_process(corpus, tmp_path, "trainer.max_steps=40", "trainer.eval_interval=20",
                                    "trainer.ckpt_interval=10", "trainer.keep_last=2")
    train_loss = losses(run_dir)
    assert sorted(train_loss) == list(range(1, 41))
    assert np.mean([train_loss[s] for s in range(36, 41)]) < np.mean([train_loss[s] for s in range(1, 6)]) - 0.5
    assert [p.name for p in checkpoint.list_steps(run_dir)] == ["step-0000030.pt", "step-0000040.pt"]
    assert (run_dir / "checkpoints" / "best.pt").exists() and (run_dir / "loss.png").stat().st_size > 1000
    assert not (run_dir / "profile").exists()  # trainer.profile is off by default
    state = checkpoint.load(checkpoint.list_steps(run_dir)[-1])
    assert state.step == 40 and state.model_config["n_layers"] == 2 and "spiece.model" in state.tokenizer.files
    split = state.data.splits["val"]
    assert val["bpc"] == pytest.approx(val["loss"] * split["tokens"] / split["chars"] / math.log(2))
    assert losses(run_dir, "val/loss")[40] == pytest.approx(val["loss"])
    assert losses(run_dir, "val/review_bpc")[40] == pytest.approx(val["review_bpc"]) and 0 < val["review_bpc"] < 10


@pytest.mark.e2e
def test_profile_traces_the_model_ops(corpus, tmp_path):
    import json

    _, run_dir = train_in_process(corpus, tmp_path, "trainer.max_steps=5", "trainer.eval_interval=0",
                                  "trainer.profile.start=2", "trainer.profile.steps=2")
    events = json.loads(gzip.decompress((run_dir / "profile" / "trace.json.gz").read_bytes()))["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any("scaled_dot_product" in n for n in names) and any("_LinearCrossEntropy" in n for n in names)
    assert any(n.startswith("aten::addmm") or n.startswith("aten::mm") for n in names)
    top = (run_dir / "profile" / "top_ops.txt").read_text()
    assert "top 25 ops by self CPU time" in top and "aten::" in top


@pytest.mark.parametrize("value, seconds", [("90s", 90), ("15m", 900), ("2h", 7200), (45, 45), ("1.5m", 90)])
def test_durations(value, seconds):
    from kr3.trainer import parse_duration

    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["15 minutes", "0", "-3m", "m"])
def test_bad_durations_are_user_errors(value):
    from kr3.trainer import parse_duration

    with pytest.raises(UserError, match=f"trainer.max_time={value} is not a duration"):
        parse_duration(value)


@pytest.mark.e2e
def test_a_warm_up_that_outlasts_the_run_is_warned_of(corpus, tmp_path, caplog):
    """The learning rate would never reach trainer.lr (an Optuna space can pick such a warm-up for a short run)."""
    caplog.set_level("INFO", logger="kr3")
    train_in_process(corpus, tmp_path, "trainer.max_steps=4", "trainer.warmup_steps=4", "trainer.eval_interval=0")
    assert "trainer.warmup_steps=4 is not below the run's 4 steps: the learning rate never reaches" in caplog.text
    caplog.clear()
    train_in_process(corpus, tmp_path / "b", "trainer.max_steps=4", "trainer.warmup_steps=3", "trainer.eval_interval=0")
    assert "warmup_steps" not in caplog.text


@pytest.mark.e2e
def test_max_time_fixes_max_steps_and_resume_keeps_it(corpus, tmp_path, caplog):
    caplog.set_level("INFO", logger="kr3")
    val, run_dir = train_in_process(corpus, tmp_path, "trainer.max_time=4s", "trainer.max_steps=null",
                                    "trainer.eval_interval=0", "trainer.log_interval=5")
    chosen = int(re.search(r"trainer.max_time=4s: \d+ ms per step here, so max_steps=(\d+)", caplog.text)[1])
    state = checkpoint.load(checkpoint.list_steps(run_dir)[-1])
    assert state.step == state.scheduler.total_steps == chosen > 5 and state.scheduler.max_time == "4s"
    assert max(losses(run_dir)) == chosen
    caplog.clear()
    again, _ = train_in_process(corpus, tmp_path, "trainer.max_time=4s", "trainer.max_steps=null",
                                "trainer.eval_interval=0", "trainer.resume=auto")
    assert again == val and f"finished at step {chosen}" in caplog.text  # no new budget: the chosen schedule


def screen(output: str) -> list[str]:
    """The lines a terminal shows for `output`: a carriage return goes back to the line's start and later characters
    overwrite earlier ones (escape sequences dropped)."""
    lines, col = [[]], 0
    for ch in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output):
        if ch == "\n":
            lines.append([])
            col = 0
        elif ch == "\r":
            col = 0
        else:
            line = lines[-1]
            line[col:col + 1] = [ch]
            col += 1
    return ["".join(line).rstrip() for line in lines]


@pytest.mark.e2e
def test_max_time_says_it_chooses_the_steps_on_lines_of_their_own(corpus, tmp_path):
    """On a terminal: the header says max_time will choose the steps, and the choice is a log line of its own, not
    written into the progress bar's line."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, [str(ROOT / "run.py"), *base(corpus, tmp_path), "stage=train",
                                           "trainer.max_time=4s", "trainer.max_steps=null", "trainer.eval_interval=0",
                                           f"hydra.run.dir={tmp_path / 'run'}"], encoding="utf-8", timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    child.expect(pexpect.EOF)
    shown = screen(child.before)
    assert any(re.search(r"^steps\s+0 → as many as trainer.max_time=4s allows: chosen after \d+ timed steps", line)
               for line in shown), "\n".join(shown)
    [choice] = [line for line in shown if "so max_steps=" in line]
    assert re.match(r"^\[[-0-9 :,]+\]\[kr3\.trainer\]\[INFO\] - trainer.max_time=4s: ", choice), choice


@pytest.mark.parametrize("eval_interval, total", [(0, 24), (10, 22)])
def test_max_time_spends_the_budget_left_at_the_measured_speed(monkeypatch, eval_interval, total):
    """A 4 s budget, 1.5 s gone at step 5, 0.125 s per step since step 1 (1,000 tokens a step): the final
    evaluation (3,000 tokens at a third of a step's work per token: 0.125 s) is set aside, 2.375 s is 19 more steps;
    with eval_interval=10 each step also carries a tenth of a periodic evaluation (2,400 tokens: 0.1 s), 17."""
    from types import SimpleNamespace

    from kr3 import trainer

    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: 10.5))
    fake = SimpleNamespace(first_step_done=10.0, first_step=1, step=5, started=9.0, budget_s=4.0, tokens_per_step=1000,
                           passes=1, share_n=2400, final_n=3000, t=SimpleNamespace(eval_interval=eval_interval, max_time="4s"),
                           _warn_if_warmup_outlasts_the_run=lambda: None)
    bar = SimpleNamespace(total=None, refresh=lambda: None)
    trainer.Trainer._fit_schedule_to_budget(fake, bar)
    assert fake.total == bar.total == total


@pytest.mark.e2e
def test_embedding_lr_moves_only_the_token_table(corpus, tmp_path):
    """trainer.embedding_lr reaches the token table's group: at 0 the table (and tied output layer) keeps its
    initial values while every other matrix trains."""
    from kr3.model import GPT, GPTConfig

    train_in_process(corpus, tmp_path, "trainer.max_steps=5", "trainer.embedding_lr=0.0")
    state = checkpoint.load(checkpoint.list_steps(tmp_path / "run")[-1])
    torch.manual_seed(1337)  # the trainer's seed, so this is the run's initial model
    init = GPT(GPTConfig(**state.model_config)).state_dict()
    assert torch.equal(state.model["tok_emb.weight"], init["tok_emb.weight"])
    assert not torch.equal(state.model["blocks.0.mlp.fc.weight"], init["blocks.0.mlp.fc.weight"])


@pytest.mark.e2e
def test_resume_of_another_optimizer_layout_or_of_weights_only_is_refused(corpus, tmp_path):
    train_in_process(corpus, tmp_path, "trainer.max_steps=3")
    path = checkpoint.list_steps(tmp_path / "run")[-1]
    state = checkpoint.load(path)
    state.optimizer["param_groups"] = state.optimizer["param_groups"][:2]  # before embedding_lr
    checkpoint.save(state, path)
    with pytest.raises(UserError, match="older kr3"):
        train_in_process(corpus, tmp_path / "b", "trainer.max_steps=6", f"trainer.resume={path}")
    raw = state.to_dict()
    del raw["optimizer"]  # weights only, as when a model is shared
    torch.save(raw, path)
    with pytest.raises(UserError, match="holds no optimizer .* cannot be resumed"):
        train_in_process(corpus, tmp_path / "c", "trainer.max_steps=6", f"trainer.resume={path}")


@pytest.mark.e2e
def test_muon_run_resumes_exactly(corpus, tmp_path):
    """optimizer=muon keeps its momentum and AdamW moments in the checkpoint: resuming from step 4 gives
    the uninterrupted run's losses (with review packing and model.arch=llama; the SIGKILL test resumes stream packing
    and GPT-2's block)."""
    common = ["trainer.optimizer=muon", "trainer.lr=1e-2", "trainer.max_steps=8", "trainer.ckpt_interval=4",
              "trainer.eval_interval=0", "trainer.packing=reviews", "model.arch=llama"]
    _, ref_dir = train_in_process(corpus, tmp_path / "a", *common)
    state = checkpoint.load(checkpoint.step_path(ref_dir, 4))
    assert state.optimizer["param_groups"][-1]["muon"] and state.config["trainer"]["optimizer"] == "muon"
    _, run_dir = train_in_process(corpus, tmp_path / "b", *common, f"trainer.resume={checkpoint.step_path(ref_dir, 4)}")
    a, b = losses(ref_dir), losses(run_dir)
    assert sorted(b) == [5, 6, 7, 8]
    np.testing.assert_allclose([b[s] for s in b], [a[s] for s in b], rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="another trainer.optimizer"):
        train_in_process(corpus, tmp_path / "c", "trainer.max_steps=10", f"trainer.resume={ref_dir}")


# the keys a checkpoint held before kr3.checkpoint.Checkpoint defined the format (format_version 1)
LAYOUT_BEFORE_ISSUE_12 = ("format_version", "model_config", "model", "optimizer", "scheduler", "step", "best_val_loss",
                          "best_val_tokens", "val", "rng", "data", "tokenizer", "config", "wandb_run_id", "torch_version")


@pytest.mark.e2e
def test_checkpoint_in_the_layout_before_issue_12_still_resumes_and_loads(corpus, tmp_path):
    """A plain dict with exactly the keys kr3 wrote before the format had a class, format_version 1 (before its records
    were typed): it loads for generate/evaluate and resumes exactly."""
    common = ["trainer.max_steps=6", "trainer.ckpt_interval=3", "trainer.eval_interval=0"]
    _, ref_dir = train_in_process(corpus, tmp_path / "a", *common)
    written = checkpoint.load(checkpoint.step_path(ref_dir, 3)).to_dict()
    old = {key: written[key] for key in LAYOUT_BEFORE_ISSUE_12} | {"format_version": 1}  # as main wrote it until issue 29
    path = tmp_path / "old" / "checkpoints" / "step-0000003.pt"
    path.parent.mkdir(parents=True)
    torch.save(old, path)
    model, tok, ckpt = checkpoint.load_model(path, "cpu")
    assert ckpt.step == 3 and tok.decode(tok.encode("이 집 짜장면은")) == "이 집 짜장면은"
    _, run_dir = train_in_process(corpus, tmp_path / "b", *common, f"trainer.resume={path}")
    a, b = losses(ref_dir), losses(run_dir)
    assert sorted(b) == [4, 5, 6]
    np.testing.assert_allclose([b[s] for s in b], [a[s] for s in b], rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_bf16_training_follows_fp32(corpus, tmp_path):
    """The other tests pin fp32; this one runs bf16 autocast (native on CPUs with AVX512-BF16, emulated and slow
    on AVX2-only ones), which must follow the fp32 run to bf16's precision."""
    common = ["trainer.max_steps=6", "trainer.eval_interval=0"]
    fp32, fp32_dir = train_in_process(corpus, tmp_path / "fp32", *common)
    bf16, bf16_dir = train_in_process(corpus, tmp_path / "bf16", *common, "trainer.precision=bf16")
    a, b = losses(fp32_dir), losses(bf16_dir)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-2)
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2) and bf16["loss"] < b[1] - 0.2


@pytest.mark.e2e
def test_resume_with_other_tokenizer_is_refused(corpus, tmp_path):
    _, run_dir = train_in_process(corpus, tmp_path, "trainer.max_steps=3")
    with pytest.raises(UserError, match="trained on other data or another tokenizer"):
        train_in_process(corpus, tmp_path / "b", "trainer.max_steps=6", "tokenizer.vocab_size=450",
                         f"trainer.resume={run_dir}")


@pytest.mark.e2e
def test_resume_after_sigkill_gives_the_same_losses(run_kr3, corpus, tmp_path):
    common = [*base(corpus, tmp_path), "stage=train", "trainer.max_steps=60", "trainer.ckpt_interval=10",
              "trainer.eval_interval=20", "model.dropout=0.1", "trainer.threads=1"]  # dropout: the RNG state must come back
    ref = run_kr3(*common, f"hydra.run.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *common, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # killed after its first checkpoint: 50 steps left to notice it in, on a loaded machine too
    while not checkpoint.list_steps(run_dir) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = checkpoint.list_steps(run_dir)
    assert saved and max(int(p.stem.split("-")[1]) for p in saved) < 60, "the run finished before it was killed"
    for p in saved:  # every checkpoint on disk is whole
        checkpoint.load(p)
    (run_dir / "checkpoints" / ".step-0000050.pt.tmp-99999.pt").write_bytes(b"PK")  # as a save killed mid-way leaves
    # no data settings: resuming takes the checkpoint's (the default data=kr3 would go to the Hub)
    trainer_only = [a for a in common if not a.startswith(("data", "tokenizer", "paths.data_dir"))]
    resumed = run_kr3(*trainer_only, f"hydra.run.dir={run_dir}", "trainer.resume=auto", env={"HF_HUB_OFFLINE": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    logged = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert logged == sorted(set(logged)), "steps after the checkpoint were logged twice"
    a, b = losses(tmp_path / "ref"), losses(run_dir)
    assert sorted(b) == sorted(a) == list(range(1, 61))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses(run_dir, "val/loss")[60], losses(tmp_path / "ref", "val/loss")[60], rtol=1e-5)
    assert not list(run_dir.rglob("*.tmp-*"))


@pytest.mark.e2e
def test_interrupt_saves_where_it_stopped(corpus, tmp_path):
    """torchrun's SIGTERM, then a second signal (`uv run` and torchrun forward Ctrl-C too): one checkpoint of the
    step reached, whole, exit status 130, and the command that continues the run."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *base(corpus, tmp_path), "stage=train",
                             "trainer.max_steps=100000", f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "UV_RUN_RECURSION_DEPTH": "1"})
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or max(losses(run_dir), default=0) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "no progress"
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc.send_signal(sig)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    saved = checkpoint.list_steps(run_dir)
    assert len(saved) == 1 and f"interrupted: saved step {checkpoint.step_of(saved[0])}" in out + err
    hint = (out + err).split("continue with: ")[1].splitlines()[0]
    assert hint.startswith(f"uv run python {ROOT / 'run.py'} ")  # as it was started
    assert f"hydra.run.dir={run_dir}" in hint and "trainer.resume=auto" in hint
    assert f"data.path={corpus / 'kr3.parquet'}" in hint  # the command as typed, so it continues the same run
    assert checkpoint.load(saved[0]).step == checkpoint.step_of(saved[0]) >= 3


@pytest.mark.e2e
def test_resume_takes_optimizer_settings_from_the_config(corpus, tmp_path):
    _, run_dir = train_in_process(corpus, tmp_path, "trainer.max_steps=4", "trainer.eval_interval=0")
    train_in_process(corpus, tmp_path, "trainer.max_steps=5", "trainer.eval_interval=0", "trainer.resume=auto",
                     "trainer.weight_decay=0.0", "trainer.betas=[0.8,0.9]")
    groups = checkpoint.load(checkpoint.step_path(run_dir, 5)).optimizer["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0, 0.0] and all(g["betas"] == (0.8, 0.9) for g in groups)
    assert checkpoint.load(checkpoint.step_path(run_dir, 4)).optimizer["param_groups"][0]["weight_decay"] == 0.1
    first, whole = checkpoint.load(checkpoint.step_path(run_dir, 4)).wall_s, json.loads((run_dir / "result.json").read_text())
    assert 0 < first < whole["wall_s"] and whole["step"] == 5  # the resumed run's time counts both parts


@pytest.mark.e2e
def test_training_anew_in_a_folder_holding_a_run_is_refused(corpus, tmp_path):
    """Its best.pt would be replaced and its checkpoints mixed with the new run's; resume=auto continues it."""
    _, run_dir = train_in_process(corpus, tmp_path, "trainer.max_steps=4", "trainer.eval_interval=0")
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    with pytest.raises(UserError, match=r"already holds a run's checkpoints \(step-0000004\.pt, best\.pt\) — continue "
                                        r"it with trainer\.resume=auto, or train anew in another folder"):
        train_in_process(corpus, tmp_path, "trainer.max_steps=2", "trainer.eval_interval=0")
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before
    train_in_process(corpus, tmp_path, "trainer.max_steps=6", "trainer.eval_interval=0", "trainer.resume=auto")
    assert checkpoint.step_of(checkpoint.list_steps(run_dir)[-1]) == 6


@pytest.mark.e2e
def test_a_diverged_run_stops_in_one_line_and_saves_no_nan(corpus, tmp_path):
    diverged = r"training diverged by step \d+ \((train loss \S+|weights not finite)\) — lower trainer\.lr"
    with pytest.raises(UserError, match=diverged):
        train_in_process(corpus, tmp_path, "trainer.max_steps=40", "trainer.eval_interval=0", "trainer.log_interval=2",
                         "trainer.ckpt_interval=2", "trainer.lr=1e6", "trainer.embedding_lr=1e6", "trainer.grad_clip=0")
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "result.json").read_text())["state"] == "diverged"
    for path in checkpoint.list_steps(run_dir):
        assert all(torch.isfinite(w).all() for w in checkpoint.load(path).model.values())


@pytest.mark.e2e
def test_a_second_signal_while_saving_on_interrupt_does_not_stop_the_save(corpus, tmp_path, monkeypatch):
    """SIGTERM at step 3, then Ctrl-C in the middle of writing that step's checkpoint: the save goes on, whole."""
    from kr3.trainer import Trainer

    real_save, after = checkpoint.save, Trainer._after_step

    def save_interrupted(state, path):
        signal.raise_signal(signal.SIGINT)
        real_save(state, path)

    def sigterm_at_3(self, bar):
        after(self, bar)
        if self.step == 3:
            monkeypatch.setattr(checkpoint, "save", save_interrupted)
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_after_step", sigterm_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(corpus, tmp_path, "trainer.max_steps=10", "trainer.eval_interval=0", "trainer.ckpt_interval=0")
    run_dir = tmp_path / "run"
    (saved,) = checkpoint.list_steps(run_dir)
    assert checkpoint.step_of(saved) == 3 and checkpoint.load(saved).step == 3
    assert json.loads((run_dir / "result.json").read_text())["state"] == "interrupted"


@pytest.mark.e2e
def test_weights_that_diverge_between_loss_checks_are_never_saved(corpus, tmp_path, monkeypatch):
    """The logged loss is still finite, the weights are not (NaN after the step): the checkpoint check stops it."""
    from kr3.trainer import Trainer

    after = Trainer._after_step

    def nan_weights_at_4(self, bar):
        if self.step == 4:
            with torch.no_grad():
                self.model.head.weight.fill_(float("nan"))
        after(self, bar)

    monkeypatch.setattr(Trainer, "_after_step", nan_weights_at_4)
    with pytest.raises(UserError, match=r"training diverged by step 4 \(weights not finite\)"):
        train_in_process(corpus, tmp_path, "trainer.max_steps=8", "trainer.eval_interval=0", "trainer.log_interval=1",
                         "trainer.ckpt_interval=2")
    run_dir = tmp_path / "run"
    assert [checkpoint.step_of(p) for p in checkpoint.list_steps(run_dir)] == [2]
    assert all(torch.isfinite(w).all() for w in checkpoint.load(checkpoint.list_steps(run_dir)[0]).model.values())


@pytest.mark.e2e
def test_ctrl_c_after_the_weights_diverged_saves_nothing(corpus, tmp_path, monkeypatch, caplog):
    """Ctrl-C usually saves the step reached; not weights that are already NaN (between two loss checks)."""
    from kr3.trainer import Trainer

    def diverge_then_ctrl_c(self, bar):
        if self.step == 3:
            with torch.no_grad():
                self.model.head.weight.fill_(float("nan"))
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_after_step", diverge_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(corpus, tmp_path, "trainer.max_steps=10", "trainer.eval_interval=0")
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "result.json").read_text())["state"] == "interrupted"
    assert not checkpoint.list_steps(run_dir) and "NaN or infinite weights (the run diverged): not saved" in caplog.text


@pytest.mark.e2e
def test_a_diverged_job_of_a_sweep_fails_alone(run_kr3, corpus, tmp_path):
    """One job's divergence is that job's failure, not the end of the sweep: the next runs, the last line names it."""
    proc = run_kr3("-m", *base(corpus, tmp_path), "stage=train", "trainer.max_steps=8", "trainer.eval_interval=0",
                   "trainer.log_interval=2", "trainer.grad_clip=0", "trainer.lr=1e6,1e-3", "trainer.embedding_lr=null")
    assert proc.returncode == 1, proc.stderr
    jobs = sorted((tmp_path / "multirun").glob("*/*/[0-9]"))
    states = [json.loads((j / "result.json").read_text())["state"] for j in jobs]
    assert states == ["diverged", "finished"] and "error: training diverged by step" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 jobs failed — #0 (trainer.lr=1000000.0): training "
                                                           "diverged by step")


@pytest.mark.e2e
def test_resume_auto_takes_best_pt_when_no_step_checkpoint_is_left(corpus, tmp_path, caplog):
    """A run killed after its first evaluation but before its first step checkpoint holds only best.pt."""
    caplog.set_level("INFO", logger="kr3")
    _, run_dir = train_in_process(corpus, tmp_path, "trainer.max_steps=4", "trainer.eval_interval=2",
                                  "trainer.log_interval=1")
    for path in checkpoint.list_steps(run_dir):
        path.unlink()
    best = checkpoint.load(run_dir / "checkpoints" / "best.pt").step
    caplog.clear()
    train_in_process(corpus, tmp_path, "trainer.max_steps=6", "trainer.eval_interval=2", "trainer.log_interval=1",
                     "trainer.resume=auto")
    assert f"resumed from {run_dir / 'checkpoints' / 'best.pt'} at step {best}" in caplog.text
    logged = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6]  # the steps after best.pt's trained again, each logged once
    assert checkpoint.step_of(checkpoint.list_steps(run_dir)[-1]) == 6


@pytest.mark.e2e
def test_resume_into_a_folder_with_later_checkpoints_is_refused(corpus, tmp_path):
    _, run_dir = train_in_process(corpus, tmp_path, "trainer.max_steps=6", "trainer.ckpt_interval=2",
                                  "trainer.eval_interval=0")
    with pytest.raises(UserError, match="already holds checkpoints after step 4"):
        train_in_process(corpus, tmp_path, "trainer.max_steps=8", "trainer.eval_interval=0",
                         f"trainer.resume={checkpoint.step_path(run_dir, 4)}")
    assert [checkpoint.step_of(p) for p in checkpoint.list_steps(run_dir)] == [2, 4, 6]  # nothing deleted


@pytest.mark.parametrize("override, message", [
    ("trainer.batch_size=0", "trainer.batch_size=0 must be an integer ≥ 1"),
    ("trainer.log_interval=0", "trainer.log_interval=0 must be an integer ≥ 1"),
    ("trainer.lr=-1", "trainer.lr=-1 must be a number ≥ 0"),
    ("trainer.muon_lr=-1", "trainer.muon_lr=-1 must be a number ≥ 0"),
    ("trainer.embedding_lr=-1", "trainer.embedding_lr=-1 must be a number ≥ 0, or null"),
    ("trainer.eval_tokens=-5", "trainer.eval_tokens=-5 must be an integer ≥ 1, or null"),
    ("trainer.rating_loss=-1", "trainer.rating_loss=-1 must be a number ≥ 0"),
    ("trainer.rating_loss_rows=0", "trainer.rating_loss_rows=0 must be a number > 0 and ≤ 1"),
    ("trainer.packing=docs", "trainer.packing=docs is not one of stream | reviews"),
    ("trainer.early_stop.patience=0", "trainer.early_stop.patience=0 must be an integer ≥ 1, or null"),
    ("trainer.early_stop.min_delta=-1", "trainer.early_stop.min_delta=-1 must be a number ≥ 0"),
    ("trainer.sample_prompts=[1]", "trainer.sample_prompts: a prompt or review must be text (a str), not int"),
    ("trainer.sample_prompts=5", "trainer.sample_prompts=5 must be a list of prompts"),
    ("generate.top_k=-1 trainer.sample_prompts=['맛']", "generate.top_k=-1 must be an integer ≥ 0, or null"),
])
def test_bad_trainer_values_are_user_errors(corpus, tmp_path, override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        train_in_process(corpus, tmp_path, *override.split(" "))


@pytest.mark.e2e
def test_the_logged_samples_are_what_generate_completes(corpus, tmp_path, caplog):
    """The trainer's samples decode as the `generate:` block says, from `seed`: the finished run's checkpoint,
    loaded, completes each prompt the same way."""
    import kr3

    caplog.set_level("INFO", logger="kr3")
    _, run_dir = train_in_process(corpus, tmp_path, "trainer.max_steps=4", "trainer.eval_interval=0", "seed=7",
                                  "trainer.sample_prompts=['이 집  짜장면은']", "trainer.sample_tokens=8")
    expected = kr3.load(run_dir, device="cpu", precision="fp32").complete("이 집 짜장면은", seed=7, max_new_tokens=8)
    assert f"  이 집  짜장면은 → {expected}\n" in caplog.text


@pytest.mark.e2e
def test_two_processes_match_one(run_kr3, corpus, tmp_path):
    """2 ranks × 2 micro-steps of 2 (gloo, Muon, model.arch=llama) must follow the same losses as 1 process × batch 8:
    the same global batch."""
    common = [*base(corpus, tmp_path), "stage=train", "trainer.max_steps=12", "trainer.eval_interval=0",
              "trainer.optimizer=muon", "model.arch=llama"]
    one = run_kr3(*common, "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *common, "trainer.batch_size=2", "trainer.grad_accum=2", f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(losses(tmp_path / "two", "val/loss")[12], losses(tmp_path / "one", "val/loss")[12], rtol=2e-4)


@pytest.mark.e2e
@pytest.mark.slow  # a group of one: DDP with two is test_two_processes_match_one
def test_torchrun_with_one_process_trains_through_ddp(run_kr3, corpus, tmp_path):
    """torchrun --nproc_per_node=1 joins a process group of one and trains through DDP (what a one-GPU torchrun
    measures), step for step as a plain run."""
    common = [*base(corpus, tmp_path), "stage=train", "trainer.max_steps=4", "trainer.eval_interval=0",
              "trainer.log_interval=1"]
    one = run_kr3(*common, f"hydra.run.dir={tmp_path / 'plain'}")
    assert one.returncode == 0, one.stderr
    ddp = torchrun(1, *common, f"hydra.run.dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr
    assert "1 process(es) (DDP)" in (tmp_path / "ddp" / "run.log").read_text()
    assert "(DDP)" not in (tmp_path / "plain" / "run.log").read_text()
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)


def _rank0_int_of(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from kr3 import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out[rank] = distributed.rank0_int(100 + rank)  # each rank's own budget, as max_time computes it
    dist.destroy_process_group()


@pytest.mark.e2e
def test_ranks_take_rank0s_step_count():
    """max_time's step count comes from each rank's own clock: every rank must take rank 0's, or one would wait in
    a collective the others never reach."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank0_int_of, args=(port, out), nprocs=2)
    assert dict(out) == {0: 100, 1: 100}


@pytest.mark.e2e
def test_two_processes_train_with_the_rating_loss_as_one(run_kr3, corpus, tmp_path):
    """2 ranks × batch 4 (gloo, AdamW) follow 1 process × 2 micro-steps of 4: the rating loss scores each rank's rows
    under every rating in one forward pass through DDP (the same rows scored, each micro-batch's mean averaged), its
    rows starting at reviews (the other DDP test packs the stream). Both ranks write into one Hydra run folder, and
    rank 0 alone logs. trainer.early_stop ends both ranks at the same step: an improvement must be 10 nats, so the
    evaluation at step 4 is the first without one."""
    common = [*base(corpus, tmp_path), "stage=train", "trainer.max_steps=8", "trainer.eval_interval=2",
              "trainer.early_stop.patience=1", "trainer.early_stop.min_delta=10",
              "trainer.optimizer=adamw", "data.condition=rating", "trainer.rating_loss=0.5", "trainer.rating_loss_rows=0.5",
              "trainer.batch_size=4", "trainer.packing=reviews"]
    one = run_kr3(*common, "trainer.grad_accum=2", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *common, f"paths.log_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr
    (run,) = (tmp_path / "two" / "outputs").glob("*/*")  # both ranks wrote into ONE Hydra run folder
    for key in ("train/loss", "train/rating_loss"):
        a, b = losses(tmp_path / "one", key), losses(run, key)
        assert sorted(a) == sorted(b) == list(range(1, 5))  # rank 0 alone logged; both stopped at step 4
        np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(losses(run, "val/loss")[4], losses(tmp_path / "one", "val/loss")[4], rtol=2e-4)
    assert json.loads((run / "result.json").read_text())["early_stopped"] == 4


def wandb_ids(run_dir) -> list[str]:
    return [p.name.rsplit("-", 1)[1] for p in (Path(run_dir) / "wandb").glob("offline-run-*")]


@pytest.mark.e2e
def test_multirun_gives_each_job_its_folder_and_wandb_run(run_kr3, corpus, tmp_path, monkeypatch):
    """Each job of a sweep gets its folder and its own W&B run, also when all jobs resume one checkpoint."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    _, start = train_in_process(corpus, tmp_path, "logger=wandb", "trainer.max_steps=2", "trainer.eval_interval=0")
    proc = run_kr3("-m", *base(corpus, tmp_path), "stage=train", "logger=wandb", "trainer.max_steps=4",
                   "trainer.lr=1e-3,3e-4", f"trainer.resume={start}")
    assert proc.returncode == 0, proc.stderr
    jobs = sorted((tmp_path / "multirun").glob("*/*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = [yaml.safe_load((j / ".hydra" / "config.yaml").read_text())["trainer"]["lr"] for j in jobs]
    assert lrs == [1e-3, 3e-4]
    ids = [*wandb_ids(start), *(i for j in jobs for i in wandb_ids(j))]
    assert len(ids) == len(set(ids)) == 3  # one W&B run per job, inside its folder, none the start's
    for j in jobs:
        assert sorted(losses(j)) == [3, 4] and (j / "checkpoints" / "step-0000004.pt").exists()
    sweep = jobs[0].parent
    out = proc.stdout + proc.stderr
    assert out.count(f"group {sweep.parent.name}/{sweep.name})") == 2  # one W&B group per multirun
    assert len(re.findall(r"upload it with: (uv run wandb|\S+/wandb|wandb) sync ", out)) == 2  # as it can be typed


@pytest.mark.e2e
def test_resume_in_place_continues_the_wandb_run_elsewhere_starts_one(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    common = ["logger=wandb", "trainer.eval_interval=0"]
    _, start = train_in_process(corpus, tmp_path, *common, "trainer.max_steps=2")
    train_in_process(corpus, tmp_path, *common, "trainer.max_steps=4", "trainer.resume=auto")
    ids = wandb_ids(start)
    assert len(ids) == 2 and len(set(ids)) == 1  # one folder, one history, one W&B run
    _, branch = train_in_process(corpus, tmp_path / "b", *common, "trainer.max_steps=4",
                                 f"trainer.resume={checkpoint.step_path(start, 2)}")
    assert len(wandb_ids(branch)) == 1 and wandb_ids(branch)[0] not in ids


@pytest.mark.e2e
def test_early_stop_ends_a_plateaued_run_at_the_right_evaluation_and_after_resume(corpus, tmp_path, caplog):
    """lr 0: every evaluation gives the same val loss, so with patience 2 the evaluations at steps 4 and 6 are the two
    without an improvement and the run ends at 6 — also when resumed from step 4, which kept its count."""
    from kr3 import report

    caplog.set_level("INFO", logger="kr3")
    common = ["trainer.lr=0", "trainer.max_steps=20", "trainer.eval_interval=2", "trainer.ckpt_interval=4",
              "trainer.keep_last=0", "trainer.early_stop.patience=2"]
    val, run_dir = train_in_process(corpus, tmp_path / "a", *common)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["state"] == "finished" and result["early_stopped"] == 6 and result["step"] == 6
    assert max(losses(run_dir)) == 6 and sorted(losses(run_dir, "val/loss")) == [2, 4, 6]
    assert checkpoint.load(run_dir / "checkpoints" / "best.pt").step == 2  # no later evaluation was better
    assert val["best_bpc"] == pytest.approx(losses(run_dir, "val/bpc")[2])  # what a sweep minimizes
    assert report.job_row(run_dir, run_dir)["early_stopped"] == 6
    assert "early stop at step 6: 2 evaluations without a val loss below" in caplog.text
    resumed, resumed_dir = train_in_process(corpus, tmp_path / "b", *common,
                                            f"trainer.resume={checkpoint.step_path(run_dir, 4)}")
    assert json.loads((resumed_dir / "result.json").read_text())["early_stopped"] == 6
    assert resumed["bpc"] == pytest.approx(val["bpc"])
    again, _ = train_in_process(corpus, tmp_path / "a", *common, "trainer.resume=auto")
    assert again == {k: v for k, v in val.items() if k != "best_bpc"} and "ended by trainer.early_stop" in caplog.text
    # an improvement smaller than min_delta does not count: a learning run stops too
    _, learning = train_in_process(corpus, tmp_path / "c", *common[1:], "trainer.early_stop.min_delta=10")
    assert json.loads((learning / "result.json").read_text())["early_stopped"] == 6


def test_a_sweep_minimizes_the_best_bpc_of_an_early_stopped_run():
    from kr3.cli import objective

    assert objective({"bpc": 3.1, "loss": 2.0}) == 3.1
    assert objective({"bpc": 3.1, "best_bpc": 3.0}) == 3.0
    assert objective(None) is None


@pytest.mark.e2e
def test_resume_of_a_finished_run_trains_nothing(corpus, tmp_path, caplog):
    caplog.set_level("INFO", logger="kr3")
    common = ["trainer.eval_interval=0", "trainer.ckpt_interval=2", "trainer.keep_last=0"]
    val, run_dir = train_in_process(corpus, tmp_path, *common, "trainer.max_steps=4")
    rows = (run_dir / "metrics.jsonl").read_text()
    again, _ = train_in_process(corpus, tmp_path, *common, "trainer.max_steps=4", "trainer.resume=auto")
    assert again == val and (run_dir / "metrics.jsonl").read_text() == rows  # no second evaluation, no new rows
    assert "finished at step 4" in caplog.text
    # best.pt of a periodic evaluation (lr 0: step 4 is no better) holds a val, but not the run's last
    _, periodic = train_in_process(corpus, tmp_path / "p", *common, "trainer.max_steps=4", "trainer.eval_interval=2",
                                   "trainer.lr=0")
    assert checkpoint.load(periodic / "checkpoints" / "best.pt").step == 2
    _, rerun = train_in_process(corpus, tmp_path / "q", *common, "trainer.max_steps=2",
                                f"trainer.resume={periodic / 'checkpoints' / 'best.pt'}")
    assert sorted(losses(rerun, "val/loss")) == [2]  # evaluated, as a run that stops at step 2 does
    with pytest.raises(UserError, match="at step 2, past this run's 1 steps"):
        train_in_process(corpus, tmp_path / "b", *common, "trainer.max_steps=1",
                         f"trainer.resume={checkpoint.step_path(run_dir, 2)}")
    _, more = train_in_process(corpus, tmp_path / "c", *common, "trainer.max_steps=6", f"trainer.resume={run_dir}",
                               "model.n_layers=3")
    assert sorted(losses(more)) == [5, 6] and checkpoint.load(checkpoint.step_path(more, 6)).model_config["n_layers"] == 2
    assert "the schedule now ends at step 6, not 4" in caplog.text
    assert "ignored: model.n_layers=3 (checkpoint: 2)" in caplog.text


@pytest.mark.e2e
def test_best_checkpoint_compares_the_same_val_tokens(corpus, tmp_path):
    """Periodic evaluations score whole windows at val's start; the final one scores those again inside its
    pass over all of val (exactly: split at a window boundary, the second part's context is the token
    before it), and best.pt is chosen on that share alone."""
    from kr3.scoring import token_loss

    _, run_dir = train_in_process(corpus, tmp_path, "trainer.max_steps=4", "trainer.eval_interval=2",
                                  "trainer.eval_tokens=100", "trainer.ckpt_interval=2", "trainer.keep_last=0")
    state = checkpoint.load(checkpoint.step_path(run_dir, 4))
    val = np.memmap(Path(state.data.dir) / "val.bin", dtype=state.data.dtype, mode="r")
    eos = state.data.eos_id
    block = state.model_config["block_size"]
    share = -(-100 // block) * block
    assert state.best_val_tokens == share < len(val)

    def score(tokens, step=4, **kw):
        model, _, _ = checkpoint.load_model(checkpoint.step_path(run_dir, step), "cpu")
        return token_loss(model, tokens, eos, block, 4, "cpu", torch.float32, **kw)

    at_2 = score(val[:share], step=2)
    assert losses(run_dir, "val/loss")[2] == pytest.approx(at_2[0] / at_2[1], rel=1e-5)  # whole windows
    whole = score(val)
    head, tail = score(val[:share]), score(val[share:], context=int(val[share - 1]))
    assert head[1] + tail[1] == whole[1] == len(val)
    assert head[0] + tail[0] == pytest.approx(whole[0], rel=1e-6)
    assert losses(run_dir, "val/loss")[4] == pytest.approx(whole[0] / whole[1], rel=1e-5)
    # best: the lower of step 2's share (what it logged) and step 4's share — not step 4's whole val
    assert state.best_val_loss == pytest.approx(min(losses(run_dir, "val/loss")[2], head[0] / head[1]), rel=1e-5)


@pytest.mark.slow
def test_multirun_under_torchrun(corpus, tmp_path):
    proc = torchrun(2, "-m", *base(corpus, tmp_path), "stage=train", "trainer.max_steps=3", "trainer.lr=1e-3,3e-4")
    assert proc.returncode == 0, proc.stderr
    jobs = sorted((tmp_path / "multirun").glob("*/*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"] and all(len(losses(j)) == 3 for j in jobs)


@pytest.mark.e2e
def test_wandb_sweep_command_is_accepted(run_kr3, corpus, tmp_path):
    """Build the command line a W&B agent runs from sweeps/wandb.yaml, then run it (offline)."""
    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb.yaml").read_text())
    params = {"trainer.lr": 0.002, "model.n_layers": 4, "trainer.batch_size": 16}
    assert set(params) == set(sweep["parameters"])
    cmd = []
    for part in sweep["command"]:
        if part == "${env}":
            continue
        cmd += {"${interpreter}": [sys.executable], "${program}": [str(ROOT / sweep["program"])],
                "${args_no_hyphens}": [f"{k}={v}" for k, v in params.items()]}.get(part, [part])
    cmd += [*base(corpus, tmp_path), "logger=wandb", "trainer.max_steps=2"]  # smoke's logger is none
    assert cmd[:2] == [sys.executable, str(ROOT / "run.py")]
    proc = run_kr3(*cmd[2:], env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr
    run = next((tmp_path / "outputs").glob("*/*"))
    assert checkpoint.load(checkpoint.list_steps(run)[-1]).model_config["n_layers"] == 4


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_builds_a_model_and_an_optimizer(tmp_path, name):
    """Each preset composes, and its model and trainer values pass the checks a run makes before training."""
    from kr3 import optim, settings
    from kr3.model import GPT, GPTConfig

    cfg = settings.typed(compose(root=tmp_path, overrides=[f"experiment={name}", f"paths.output_dir={tmp_path}"]))
    if hasattr(cfg.model, "name_or_path"):  # a pretrained model's shape is its own (tests/test_pretrained.py trains this preset)
        assert cfg.tokenizer.kind == "pretrained" and cfg.tokenizer.name_or_path == cfg.model.name_or_path
        model = GPT(GPTConfig(vocab_size=300, n_layers=2, n_heads=2, d_model=32, d_ffn=64, block_size=cfg.model.block_size))
    else:
        model = GPT(GPTConfig.from_cfg(cfg.model, vocab_size=300))
        assert model.cfg.n_layers == cfg.model.n_layers and model.cfg.block_size == cfg.model.block_size
    optim.build(model, cfg.trainer, torch.device("cpu"))


@pytest.mark.e2e
def test_bad_model_override_is_one_line(run_kr3, corpus, tmp_path):
    proc = run_kr3(*base(corpus, tmp_path), "stage=train", "model.n_heads=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: model.d_model=64 is not divisible by model.n_heads=3" in proc.stderr


@pytest.mark.e2e
def test_bad_embedding_lr_is_one_line(run_kr3, corpus, tmp_path):
    proc = run_kr3(*base(corpus, tmp_path), "stage=train", "trainer.lr=0", "trainer.embedding_lr=0.3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: trainer.embedding_lr=0.3 is applied as a multiple of trainer.lr: set trainer.lr > 0" in proc.stderr


@pytest.mark.e2e
def test_ranks_wait_for_rank_zero_beyond_the_collective_timeout(tmp_path):
    """The other ranks wait for rank 0's data preparation on a group of its own: here rank 0 takes longer
    than the default group's timeout (5 s), which a plain barrier would not survive, and rank 1 runs after it;
    when rank 0 fails there, rank 1 stops at once with a one-line error."""
    script = tmp_path / "wait.py"
    script.write_text(
        "from datetime import timedelta\nimport time\nimport torch.distributed as dist\nfrom kr3 import distributed\n"
        "dist.init_process_group('gloo', timeout=timedelta(seconds=5))\n"
        "rank = dist.get_rank()\n"
        "with distributed.main_first():\n"
        "    if rank == 0:\n"
        "        time.sleep(7)\n"
        "    print('rank', rank, 'after', open('done').read() if rank else 'nothing', flush=True)\n"
        "    open('done', 'w').write('rank 0')\n"
        "try:\n"
        "    with distributed.main_first():\n"
        "        if rank == 0:\n"
        "            raise RuntimeError('rank 0 fails')\n"
        "        print('rank 1 ran the body', flush=True)\n"
        "except Exception as e:\n"
        "    print('rank', rank, 'stopped:', type(e).__name__, e, flush=True)\n"
        "dist.destroy_process_group()\n"
    )
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "rank 0 after nothing" in proc.stdout and "rank 1 after rank 0" in proc.stdout
    assert "rank 0 stopped: RuntimeError rank 0 fails" in proc.stdout
    assert "rank 1 stopped: UserError rank 0 failed (see its error" in proc.stdout and "ran the body" not in proc.stdout
