"""What the machine does to a prepare or a write: a SIGKILL's leftovers, a full disk, two prepares at once."""

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kr3 import prepared
from kr3.atomic import replacing
from kr3.config import ROOT
from kr3.errors import UserError


def leftovers(data_dir):
    return sorted(p.name for p in data_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_prepare_removes_what_a_killed_prepare_left(local_cfg):
    cfg = local_cfg()
    out = prepared.prepared_dir(cfg)
    dead, live = dead_pid(), os.getppid()  # the parent, not us: our own pid's temp folder is always redone
    names = [f".{out.name}.tmp-{dead}", f".{out.name}.old-{dead}", f".{out.name}.tmp-{live}", f".other.tmp-{dead}"]
    for name in names:
        (out.parent / name).mkdir(parents=True)
        (out.parent / name / "train.bin").write_bytes(b"half")
    prepared.ensure(cfg)
    assert leftovers(out.parent) == sorted(names[2:])  # a live process's folder and another name's stay


def test_a_full_disk_during_prepare_is_one_line_and_leaves_nothing(local_cfg, monkeypatch):
    cfg = local_cfg()
    out = prepared.ensure(cfg)
    before = (out / "train.bin").read_bytes()

    def full(tok, corpus, path, dtype, controls):
        path.write_bytes(b"\0" * 64)  # some tokens made it before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepared, "_encode_split", full)
    with pytest.raises(UserError) as e:
        prepared.ensure(local_cfg("prepare.force=true"))
    message = str(e.value)
    assert message.startswith(f"no space left on the device of {out.absolute()} — ")
    assert "nothing half-written was left" in message and "\n" not in message
    assert (out / "train.bin").read_bytes() == before and not leftovers(out.parent)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_replacing_turns_a_full_disk_into_one_line(tmp_path, code):
    path = tmp_path / "eval.json"
    path.write_text("old")
    with pytest.raises(UserError) as e, replacing(path) as tmp:
        tmp.write_text("half")
        raise OSError(code, os.strerror(code))
    assert str(e.value).startswith(f"no space left on the device of {path} — free space (nothing half-written was left)")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["eval.json"]


def test_replacing_lets_other_errors_through(tmp_path):
    with pytest.raises(PermissionError), replacing(tmp_path / "x.json") as tmp:
        tmp.write_text("half")
        raise PermissionError(errno.EACCES, "denied")
    assert os.listdir(tmp_path) == []


PREPARE_ONCE_READY = textwrap.dedent("""
    import logging, sys, time
    from pathlib import Path
    from kr3 import prepared
    from kr3.config import compose

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root, source, me = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = compose(["data=local", f"data.path={source}", "tokenizer.vocab_size=400"], root)
    build = prepared.build

    def slow_build(*args):
        time.sleep(2)  # hold the lock long enough that the other process has to wait for it
        return build(*args)

    prepared.build = slow_build
    (root / f"ready-{me}").touch()
    while len(list(root.glob("ready-*"))) < 2:  # start both prepares at the same moment
        time.sleep(0.02)
    print(prepared.ensure(cfg))
""")


@pytest.mark.e2e
def test_two_prepares_at_once_build_once(tmp_path, corpus_parquet, local_cfg):
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE_ONCE_READY, str(tmp_path), str(corpus_parquet), str(i)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    results = [(p.communicate(timeout=120), p.returncode) for p in procs]
    assert [rc for _, rc in results] == [0, 0], [err[-2000:] for (_, err), _ in results]
    out = prepared.prepared_dir(local_cfg())
    assert {o.strip() for (o, _), _ in results} == {str(out)}
    logs = [err for (_, err), _ in results]
    assert sum("up to date" in log for log in logs) == 1
    assert any("waiting" in log and "up to date" in log for log in logs)
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == [out.name]
    assert not leftovers(out.parent)


@pytest.mark.e2e
def test_a_full_disk_while_training_is_one_line_and_tears_no_metrics_row(tmp_path, train_tiny, monkeypatch,
                                                                          make_reviews):
    """The disk fills in the middle of a metrics row (a short write, then ENOSPC): the row is cut back off, the run
    stops with one line, and every row left reads."""
    from kr3 import atomic

    real, calls = os.write, []

    def filling(fd, data):
        calls.append(len(data))
        if len(calls) == 7:
            return real(fd, bytes(data[:10]))  # the disk had room for 10 bytes of the 7th row
        if len(calls) > 7:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(atomic.os, "write", filling)
    with pytest.raises(UserError) as e:
        train_tiny(tmp_path, make_reviews(1500, seed=1), "tokenizer.vocab_size=400", "trainer.max_steps=20")
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert str(e.value).startswith(f"no space left on the device of {metrics} — ") and "\n" not in str(e.value)
    text = metrics.read_text()
    assert text.endswith("\n") and [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.e2e
def test_a_torn_metrics_line_is_cut_off_when_the_run_resumes(tmp_path, train_tiny, make_reviews, caplog):
    rows = make_reviews(1500, seed=1)
    run = train_tiny(tmp_path, rows, "tokenizer.vocab_size=400", "trainer.max_steps=4")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # killed while writing step 5's row
    train_tiny(tmp_path, rows, "tokenizer.vocab_size=400", "trainer.max_steps=6", "trainer.resume=auto")
    assert "its last line is cut short" in caplog.text
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_writing_token_files_is_one_line(local_cfg, monkeypatch):
    """numpy's tofile says "N requested and 0 written" with no errno on a full disk: the token files are written
    through Python's file object, whose OSError says ENOSPC. /dev/full plays the disk."""
    cfg = local_cfg()
    out = prepared.prepared_dir(cfg)

    def full_disk(path, mode="r", *args, **kwargs):
        return open("/dev/full", mode) if str(path).endswith(".bin") else open(path, mode, *args, **kwargs)

    monkeypatch.setattr(prepared, "open", full_disk, raising=False)
    with pytest.raises(UserError, match=f"^no space left on the device of {re.escape(str(out.absolute()))} — "):
        prepared.ensure(cfg)
    assert not out.exists() and not leftovers(out.parent)


def test_a_full_disk_in_the_datasets_cache_says_so_and_removes_what_it_cached(local_cfg, monkeypatch, tmp_path):
    """datasets' DatasetGenerationError around pyarrow's ENOSPC read as a malformed file; now: a full disk, and the
    cache this load began is gone."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    cache = tmp_path / "cache"

    def filling_cache(*args, cache_dir, **kwargs):
        (Path(cache_dir) / "parquet" / "default-1").mkdir(parents=True)
        (Path(cache_dir) / "parquet" / "default-1" / "half.arrow").write_bytes(b"\0" * 100)
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise DatasetGenerationError("An error occurred while generating the dataset") from e

    monkeypatch.setattr(datasets, "load_dataset", filling_cache)
    with pytest.raises(UserError) as e:
        prepared.ensure(local_cfg(f"data.cache_dir={cache}"))
    assert str(e.value).startswith(f"no space left on the device of {cache} (the datasets cache, data.cache_dir) — ")
    assert not cache.exists()


def test_a_full_disk_during_export_is_one_line(trained, monkeypatch, tmp_path):
    pytest.importorskip("safetensors")
    import safetensors.torch
    from safetensors import SafetensorError

    from kr3 import export, load

    def full(*args, **kwargs):  # what safetensors raises on a full disk: no errno, the words only
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "hf"
    with pytest.raises(UserError, match=f"^no space left on the device of {re.escape(str(out))} — "):
        export.save(load(trained[0], device="cpu", precision="fp32"), out)
    assert os.listdir(tmp_path) == []


# python -c FULL_DISK_FOR <part of a path> <kr3's arguments>: kr3 on a disk full where that part is in the path
FULL_DISK_FOR = textwrap.dedent("""
    import builtins, errno, io, os, sys
    from kr3 import cli

    real, where = io.open, sys.argv[1]

    def full(file, *args, **kwargs):  # the disk is full where these files go
        if where in str(file) and "w" in (args[0] if args else kwargs.get("mode", "r")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real(file, *args, **kwargs)

    builtins.open = io.open = full
    sys.argv = ["run.py", *sys.argv[2:]]
    cli.main()
""")


@pytest.mark.e2e
@pytest.mark.parametrize("where, args", [
    ("/.hydra/", ["stage=train"]),
    ("multirun.yaml", ["-m", "stage=train", "trainer.lr=1e-3,3e-3"]),
])
def test_a_full_disk_for_the_run_folders_own_files_is_one_line(tmp_path, where, args):
    """Hydra's .hydra/*.yaml (kr3 writes them now, each whole) and a sweep's multirun.yaml."""
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_FOR, where, *args, f"paths.root_dir={tmp_path}",
                           "data=local", "data.path=unused.parquet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no space left on the device of "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.yaml"))


def test_max_time_and_max_steps_together_are_refused_before_any_work(local_cfg):
    from kr3.stages import train

    cfg = local_cfg("stage=train", "experiment=cpu_15min", "trainer.max_steps=100")
    with pytest.raises(UserError, match=r"^trainer.max_time=14m and trainer.max_steps=100 both set how long the run is "
                                        r"— drop one \(trainer.max_time=null trains 100 steps\)$"):
        train.run(cfg)
    assert not prepared.prepared_dir(cfg).exists()
