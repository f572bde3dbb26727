import pytest
import torch
import torch.nn.functional as F

import kr3.model
from kr3.errors import UserError
from kr3.model import GPT, GPTConfig, KVCache, linear_cross_entropy


def tiny(**kw):
    return GPTConfig(**{"vocab_size": 97, "n_layers": 2, "n_heads": 2, "d_model": 32, "d_ffn": 64, "block_size": 16, **kw})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_matches_full_forward(arch):
    torch.manual_seed(0)
    model = GPT(tiny(arch=arch)).eval()
    x = torch.randint(0, 97, (2, 12))
    full = model(x)
    cache = KVCache(model.cfg, 2, "cpu", torch.float32)
    steps = [model(x[:, :5], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_rating_embedding_gives_each_token_its_latest_control():
    torch.manual_seed(0)
    model = GPT(tiny(controls=(3, 4, 5))).eval()
    x = torch.tensor([[9, 3, 10, 11, 2, 5, 12, 13], [9, 10, 11, 12, 4, 13, 14, 15]])
    added = model.rating_embedding(x, None)
    emb = model.tok_emb.weight
    expected = [[None, 3, 3, 3, 3, 5, 5, 5], [None, None, None, None, 4, 4, 4, 4]]
    for row, ids in zip(added, expected):
        for vec, i in zip(row, ids):
            torch.testing.assert_close(vec, torch.zeros_like(vec) if i is None else emb[i])
    plain = GPT(tiny()).eval()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(model(x)[:, 2:], plain(x)[:, 2:]) and torch.equal(model(x)[1, :4], plain(x)[1, :4])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_keeps_the_latest_control(arch):
    torch.manual_seed(0)
    model = GPT(tiny(controls=(3, 4, 5), arch=arch)).eval()
    x = torch.tensor([[2, 3, 10, 11, 12, 2, 5, 12, 13, 14], [2, 4, 10, 11, 12, 13, 14, 15, 16, 17]])
    full = model(x)
    cache = KVCache(model.cfg, 2, "cpu", torch.float32)
    steps = [model(x[:, :3], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(3, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_loss_and_shapes():
    model = GPT(tiny())
    x = torch.randint(0, 97, (3, 16))
    assert model(x).shape == (3, 16, 97)
    assert torch.allclose(model(x, hidden=True) @ model.head.weight.t(), model(x), atol=1e-6)  # the head's input
    loss = model(x, x)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # near uniform at init
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.randint(0, 97, (1, 17)))


def test_the_llama_block_has_rotary_positions_rmsnorm_swiglu_and_no_biases():
    torch.manual_seed(0)
    shape = {k: v for k, v in tiny().to_dict().items() if k not in ("vocab_size", "controls")}
    cfg = kr3.model.GPTConfig.from_cfg(type("M", (), {**shape, "arch": "llama", "bias": None})(), 97)
    model = GPT(cfg).eval()
    assert not cfg.bias and model.pos_emb is None and isinstance(model.ln_f, torch.nn.RMSNorm)
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert isinstance(model.blocks[0].mlp, kr3.model.SwiGLU)
    # rotary: attention scores depend on the distance between two tokens, not where they are
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 12, 16)
    cos, sin = kr3.model.rotary(torch.arange(12), 16)
    r = kr3.model.rotate(q, cos, sin)[0, 0]
    torch.testing.assert_close(r[3] @ r[1], r[10] @ r[8])
    torch.testing.assert_close(r[5].norm(), q[0, 0, 0].norm())
    assert not torch.allclose(r[3] @ r[1], r[3] @ r[0])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tied_embeddings_and_param_groups(arch):
    model = GPT(tiny(arch=arch))
    assert model.head.weight is model.tok_emb.weight
    groups = model.param_groups(0.1)
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_params()
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
    assert groups[2]["params"] == [model.tok_emb.weight] and groups[2]["weight_decay"] == 0.0
    assert [g["lr_scale"] for g in model.param_groups(0.1, 30.0)] == [1.0, 1.0, 30.0]
    assert model.flops_per_token() > 6 * model.num_params(embeddings=False)


@pytest.mark.parametrize("chunk_elements", [2**24, 97 * 7])  # one chunk; 7-row chunks, the last one ragged
def test_linear_cross_entropy_matches_torch(monkeypatch, chunk_elements):
    monkeypatch.setattr(kr3.model, "CE_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    h = torch.randn(45, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 97, (45,))
    ref = F.cross_entropy(h @ w.t(), y)
    ref_grads = torch.autograd.grad(3 * ref, (h, w))  # a non-unit upstream gradient
    loss = linear_cross_entropy(h, w, y)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(torch.autograd.grad(3 * loss, (h, w)), ref_grads):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y), ref.detach())


def test_model_loss_is_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    model = GPT(tiny())
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    loss = model(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))  # the tied table gets both paths' gradients
    want = F.cross_entropy(model(x).view(-1, 97), y.view(-1))
    torch.testing.assert_close(loss, want)
    for got, ref in zip(grads, torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(got, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same bf16 logits, the softmax in fp32 in both
        bf16 = model(x, y)
        want = F.cross_entropy(model(x).float().view(-1, 97), y.view(-1))
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, want, atol=1e-4, rtol=1e-4)
    for got, ref in zip(torch.autograd.grad(bf16, list(model.parameters())),  # bf16 products: within bf16's rounding
                        torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-2)
    with pytest.raises(ValueError, match="targets of shape"):
        linear_cross_entropy(torch.zeros(5, 32), model.head.weight, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("kw, msg", [({"d_model": 30, "n_heads": 4}, "not divisible"), ({"n_layers": 0}, "positive"),
                                     ({"arch": "mamba"}, "model.arch=mamba is not one of gpt2 | llama"),
                                     ({"arch": "llama", "d_model": 30, "n_heads": 2}, "an even d_model / n_heads"),
                                     ({"dropout": 1.5}, "dropout")])
def test_inconsistent_sizes(kw, msg):
    with pytest.raises(UserError, match=msg):
        tiny(**kw)


@pytest.mark.e2e
def test_keep_freed_memory_stops_refaulting_large_tensors():
    """After keep_freed_memory, a freed 64 MiB tensor's pages are reused: allocating it again costs (almost)
    no page faults, where glibc's default hands it back to the OS and faults in all 16k pages again.
    In a child process: the setting is process-wide."""
    code = """
import resource, sys, torch
from kr3.hardware import keep_freed_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 2**20)  # 64 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
default = faults()
if not keep_freed_memory():
    sys.exit(3)
for _ in range(3):  # the heap grows to the working set first
    faults()
print(default, faults())
"""
    import platform
    import subprocess
    import sys
    from pathlib import Path

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: keep_freed_memory changes nothing")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages always on: a 64 MiB tensor costs a few dozen faults either way")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, "keep_freed_memory() found no glibc mallopt" if out.returncode == 3 else out.stderr
    default, kept = map(int, out.stdout.split())
    assert default > 5 * 16000 * 0.9 and kept < default / 20


def test_review_bpc_scores_each_whole_review_alone_from_its_start():
    import math

    import numpy as np

    from kr3 import scoring

    torch.manual_seed(0)
    model = GPT(tiny(controls=(3, 4))).eval()
    eos = 2
    reviews = [[3, 10, 11], [12, 13, 14, 15, 16], [4, 22], [23]]  # two with a rating's control token
    tokens = np.array([t for r in reviews for t in (*r, eos)] + [30, 31])  # and the start of one cut off: left out
    got = scoring.review_scores(model, tokens, eos, [3, 4], lambda ids: "가" * len(ids), 3, "cpu", torch.float32)
    nats = chars = n = 0
    for r in reviews:  # [EOS, (control)] before the review, its text and EOS predicted
        head = 2 if r[0] in (3, 4) else 1
        seq = torch.tensor([[eos, *r, eos]])
        logp = model(seq)[0, :-1].log_softmax(-1).gather(1, seq[0, 1:, None])[:, 0]
        nats -= float(logp[head - 1 :].sum().detach())
        n, chars = n + len(r) - head + 2, chars + len(r) - head + 1
    assert got["review_loss"] == pytest.approx(nats / n, rel=1e-5)
    assert got["review_bpc"] == pytest.approx(nats / chars / math.log(2), rel=1e-5)
