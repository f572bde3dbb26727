"""model.depth: one dial for the shape, and depth=auto, which sizes the model to trainer.max_time on this machine."""

from types import SimpleNamespace

import pytest

from kr3 import checkpoint, sizing


def test_a_depth_sets_the_shape_of_each_arch():
    """Depth 2 is cpu_15min's shapes before it took model.depth=auto: Llama (2 layers, 2 heads of 48, SwiGLU 256) and
    GPT-2 (MLP 384)."""
    assert sizing.shape_at(2, "llama") == {"n_layers": 2, "n_heads": 2, "d_model": 96, "d_ffn": 256}
    assert sizing.shape_at(2, "gpt2") == {"n_layers": 2, "n_heads": 2, "d_model": 96, "d_ffn": 384}
    assert sizing.shape_at(8, "llama") == {"n_layers": 8, "n_heads": 8, "d_model": 384, "d_ffn": 1024}


@pytest.mark.parametrize("tokens_per_param, chosen, measured", [(10, 4, 5), (1000, 1, 2), (2000, 1, 1), (1, 10, 11)])
def test_auto_takes_the_deepest_model_whose_parameters_get_their_tokens(monkeypatch, tokens_per_param, chosen, measured):
    """A budget of 100 s, 1,000 tokens a step; depth d takes 0.1·d s a step and has 1,000·d² parameters: each
    parameter sees 1,000 / d³ tokens. 10 per parameter: depth 4 (15.6), not 5 (8); 1,000: depth 1 alone; 2,000: none,
    so the smallest; 1: depth 10 (exactly 1). The search stops at the first depth that falls short."""
    seen = []

    def fake_measure(model_cfg, t, vocab_size, device, dtype):
        seen.append(model_cfg.n_layers)
        return 0.1 * model_cfg.n_layers, 1000 * model_cfg.n_layers ** 2

    monkeypatch.setattr(sizing, "measure", fake_measure)
    model_cfg = SimpleNamespace(arch="llama", block_size=100, tokens_per_param=tokens_per_param, depth="auto",
                                n_layers=2, n_heads=2, d_model=64, d_ffn=256)
    t = SimpleNamespace(batch_size=5, grad_accum=2, max_time="100s")
    assert sizing.choose_depth(model_cfg, t, 100.0, 500, None, None) == chosen
    assert seen == list(range(1, measured + 1))
    assert (model_cfg.n_layers, model_cfg.n_heads, model_cfg.d_model, model_cfg.depth) == (chosen, chosen, 48 * chosen, chosen)


@pytest.mark.parametrize("overrides, error", [
    (["model.depth=auto", "trainer.max_time=null"], "model.depth=auto sizes the model to trainer.max_time: set it"),
    (["model.depth=3", "model.d_model=128"], "model.depth=3 sets n_layers, n_heads, d_model and d_ffn: drop model.d_model=128"),
    (["model.depth=0"], "model.depth=0 must be a number of layers from 1 to 64, auto or null"),
    (["model.depth=deep"], "model.depth=deep must be a number of layers from 1 to 64, auto or null"),
])
def test_a_bad_depth_is_one_line_before_any_work(run_kr3, tmp_path, overrides, error):
    proc = run_kr3("stage=train", "experiment=smoke", f"paths.root_dir={tmp_path}", "data=local",
                   f"data.path={tmp_path / 'absent.parquet'}", *overrides)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and error in proc.stderr, proc.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.e2e
def test_auto_trains_the_depth_it_chose_and_the_checkpoint_says_which(run_kr3, make_reviews, write_parquet, tmp_path):
    """The choice is logged with the override that repeats it; the checkpoint's shape and config are the chosen
    depth's, so a later stage or a resume needs nothing else. (No depth gives a billion tokens per parameter in a
    second: the smallest is measured alone and taken.)"""
    src = write_parquet(tmp_path / "kr3.parquet", make_reviews(2000, seed=4))
    proc = run_kr3("stage=train", "experiment=smoke", f"paths.root_dir={tmp_path}", "data=local", f"data.path={src}",
                   "tokenizer.vocab_size=400", "trainer.precision=fp32", "model.arch=llama", "model.depth=auto",
                   "model.tokens_per_param=1e9", "trainer.max_time=1s", "trainer.max_steps=null",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "run" / "run.log").read_text()
    [line] = [x for x in log.splitlines() if "model.depth=auto: depth" in x]
    assert "depth 1 (n_layers=1 n_heads=1 d_model=48 d_ffn=128), the smallest" in line
    assert "model.depth=1 repeats the choice" in line
    depth = 1
    state = checkpoint.load(checkpoint.list_steps(tmp_path / "run")[-1])
    shape = sizing.shape_at(depth, "llama")
    assert {k: state.model_config[k] for k in shape} == shape
    assert state.config["model"]["depth"] == depth and state.config["model"]["d_model"] == 48 * depth
