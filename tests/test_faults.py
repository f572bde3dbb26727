"""What the machine does to a prepare or a write: a SIGKILL's leftovers, a full disk, two prepares at once."""

import errno
import os
import subprocess
import sys
import textwrap

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
