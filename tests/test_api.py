"""kr3's Python API: `from kr3 import load`, then complete / stream / next_tokens / score on one loaded checkpoint."""

import math
import re
import subprocess
import sys

import pytest
import torch

import kr3
from kr3 import checkpoint
from kr3.config import compose
from kr3.errors import UserError
from kr3.sampling import DECODING, END_OF_REVIEW


@pytest.fixture(scope="module")
def m(trained):
    from kr3 import load

    return load(trained[0], device="cpu", precision="fp32")


@pytest.mark.e2e
def test_import_kr3_is_light_and_load_is_there():
    code = "import sys, kr3; assert 'torch' not in sys.modules; from kr3 import Model, load; print(load.__module__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "kr3.api", proc.stderr
    with pytest.raises(AttributeError, match="has no attribute 'lod'"):
        import kr3

        kr3.lod  # noqa: B018


@pytest.mark.e2e
def test_load_takes_a_run_a_file_or_latest(trained):
    from kr3 import load

    run_dir, root = trained
    best = run_dir / "checkpoints" / "best.pt"
    assert load(run_dir, "cpu").path == load("latest", "cpu", log_dir=root).path == best
    step = checkpoint.list_steps(run_dir)[-1]
    assert load(step, "cpu").checkpoint.step == 150
    with pytest.raises(UserError, match="checkpoint=latest found no checkpoints"):
        load("latest", log_dir=root / "nowhere")


def test_defaults_are_the_generate_block_of_the_config(m, tmp_path):
    g = compose(root=tmp_path).generate
    assert m.defaults == {k: list(g[k]) if k == "stop" else g[k] for k in DECODING}


def test_complete_stream_and_samples(m):
    greedy = m.complete("이 집 짜장면은", temperature=0, max_new_tokens=12)
    assert isinstance(greedy, str) and greedy
    assert "".join(m.stream("이 집 짜장면은", temperature=0, max_new_tokens=12)) == greedy
    samples = m.complete("이 가게", num_samples=3, seed=5, max_new_tokens=8)
    assert isinstance(samples, list) and len(samples) == 3
    assert samples == m.complete("이 가게", num_samples=3, seed=5, max_new_tokens=8)  # same seed, same samples
    assert ["".join(m.stream("이 가게", i, seed=5, max_new_tokens=8)) for i in range(3)] == samples  # sample i
    rows = m.completions("이 가게", num_samples=2, max_new_tokens=4)
    assert [r["sample"] for r in rows] == [0, 1] and all(r["tokens"] <= 4 for r in rows)
    first = greedy.split()[0]
    assert first not in m.complete("이 집 짜장면은", temperature=0, max_new_tokens=12, stop=first)


def test_next_tokens_and_score(m):
    choices = m.next_tokens("이 집", k=m.tokenizer.vocab_size)
    assert abs(sum(p for _, p in choices) - 1) < 1e-3 and choices[0][1] >= choices[-1][1]
    assert [t for t, _ in choices].count(END_OF_REVIEW) == 1 and len(m.next_tokens("이 집")) == 5
    texts = ["이 집 짜장면 정말 맛있어요", "여기   냉면 별로였어요 ㅋㅋ 龍 🍜"]
    s = m.score(texts)
    chars = sum(len(m.cleaned(t)) for t in texts)  # cleaned as in training: the spaces collapse
    assert s["tokens"] == sum(len(m.tokenizer.encode(m.cleaned(t))) + 1 for t in texts)
    assert s["ppl"] == pytest.approx(math.exp(s["loss"])) and s["bpc"] == pytest.approx(
        s["loss"] * s["tokens"] / chars / math.log(2))
    assert m.score(texts, max_tokens=5)["tokens"] == 5
    import numpy as np
    import pandas as pd

    assert m.score(pd.Series(texts)) == m.score(np.array(texts)) == s  # columns and arrays of reviews too
    assert m.score(texts, max_tokens=np.int64(5))["tokens"] == 5


@pytest.mark.parametrize("call, message", [
    (lambda m: m.complete("x", temprature=1), "temprature is not a decoding option — use temperature, "),
    (lambda m: m.complete("x", top_p=1.5), "generate.top_p=1.5 must be a number > 0 and ≤ 1"),
    (lambda m: m.complete("x", stop=[""]), "generate.stop=[''] must be non-empty strings"),
    (lambda m: list(m.stream("x", max_new_tokens=0)), "generate.max_new_tokens=0 must be an integer ≥ 1"),
    (lambda m: m.next_tokens("x", k=0), "k=0 must be an integer ≥ 1"),
    (lambda m: m.score(["", " "]), "score() got no text"),
    (lambda m: m.score(None), "score() takes a review or a list of reviews, not NoneType"),
    (lambda m: m.score(["좋아요", 3]), "a prompt or review must be text (a str), not int"),
    (lambda m: m.score("좋아요", max_tokens=0), "score.max_tokens=0 must be an integer ≥ 1, or null"),
    (lambda m: m.complete(None), "a prompt or review must be text (a str), not NoneType"),
    (lambda m: m.complete("\ud800"), "the prompt is not valid Unicode text"),
    (lambda m: m.complete("x", seed=2**70), "generate.seed=1180591620717411303424 must be an integer ≥ 0 and ≤"),
    (lambda m: m.complete("x", guidance=float("inf")), "generate.guidance=inf must be a number ≥ 1 and ≤ 100"),
    (lambda m: kr3.load(5), "a checkpoint is a path (a .pt file or a run folder) or \"latest\", not int"),
])
def test_bad_values_are_one_line(m, call, message):
    with pytest.raises(UserError, match=re.escape(message)):
        call(m)


def test_bf16_decodes_on_a_copy_and_keeps_fp32_weights(trained):
    from kr3 import load

    m16 = load(trained[0], device="cpu", precision="bf16", temperature=0, max_new_tokens=6)
    assert m16.dtype == torch.bfloat16 and {p.dtype for p in m16.model.parameters()} == {torch.float32}
    assert isinstance(m16.complete("이 집"), str) and m16.score("이 집 짜장면")["tokens"] > 0
    assert m16.defaults["temperature"] == 0
    assert "bfloat16" in repr(m16)


def test_bf16_decoding_copies_the_weights_once_and_again_after_they_change(trained):
    from kr3 import load

    m16 = load(trained[0], device="cpu", precision="bf16", temperature=0, max_new_tokens=6)
    first = m16._decoder()
    assert m16._decoder() is first and first.tok_emb.weight.dtype == torch.bfloat16
    before, original = m16.next_tokens("이 집", 3), m16.model.ln_f.bias.detach().clone()
    with torch.no_grad():
        m16.model.ln_f.bias.add_(m16.model.tok_emb.weight[m16.tokenizer.eos_id] * 5)  # in place: the same tensor
    assert m16._decoder() is not first
    assert torch.equal(m16._decoder().ln_f.bias, m16.model.ln_f.bias.to(torch.bfloat16))
    assert m16.next_tokens("이 집", 3) != before
    changed = m16._decoder()
    with torch.no_grad():
        m16.model.ln_f.bias.data.copy_(original)  # through .data: not seen, until refresh()
    assert m16._decoder() is changed
    m16.refresh()
    assert m16._decoder() is not changed and m16.next_tokens("이 집", 3) == before
