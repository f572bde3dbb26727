import pytest
import torch

from kr3 import checkpoint, hardware
from kr3.errors import UserError


def test_save_load_round_trip_and_resolve(tmp_path):
    path = checkpoint.step_path(tmp_path, 5)
    ckpt = checkpoint.Checkpoint(model_config={}, model={"w": torch.ones(3)}, step=5, config={},
                                 data=checkpoint.DataRecord(), tokenizer=checkpoint.TokenizerRecord())
    checkpoint.save(ckpt, path)
    loaded = checkpoint.load(path)
    assert loaded.step == 5 and torch.equal(loaded.model["w"], torch.ones(3)) and loaded.optimizer is None
    assert checkpoint.resolve(tmp_path) == path
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_truncated_checkpoint(tmp_path):
    path = checkpoint.step_path(tmp_path, 1)
    checkpoint.save(checkpoint.Checkpoint(model_config={}, model={"w": torch.ones(1000)}, step=1, config={},
                                          data=checkpoint.DataRecord(), tokenizer=checkpoint.TokenizerRecord()), path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="is corrupt or not a kr3 checkpoint"):
        checkpoint.load(path)


def test_other_version_and_foreign_file(tmp_path):
    torch.save({"format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(UserError, match="format_version 99"):
        checkpoint.load(tmp_path / "new.pt")
    torch.save({"format_version": checkpoint.FORMAT_VERSION, "model": {}}, tmp_path / "part.pt")
    with pytest.raises(UserError, match=r"is incomplete \(no model_config, step, config, data, tokenizer\)"):
        checkpoint.load(tmp_path / "part.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a kr3 checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")


def test_missing_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.resolve(tmp_path / "nope")
    with pytest.raises(UserError, match="no checkpoints in"):
        checkpoint.resolve(tmp_path)


def test_bad_device_and_precision():
    with pytest.raises(UserError, match="precision=fp8 is not known"):
        hardware.resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(UserError, match="device=tpu is not known"):
        hardware.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is visible"):
            hardware.resolve_device("cuda")


def test_stages_let_fp32_matmuls_use_tf32_on_a_gpu_only(monkeypatch):
    matmul = torch.backends.cuda.matmul
    before, matmul.allow_tf32 = matmul.allow_tf32, False
    try:
        hardware.setup("cpu", "fp32")
        assert not matmul.allow_tf32
        monkeypatch.setattr(hardware, "resolve_device", lambda name: torch.device("cuda", 0))
        assert hardware.setup("cuda", "fp32") == (torch.device("cuda", 0), torch.float32)
        assert matmul.allow_tf32
    finally:
        matmul.allow_tf32 = before
