import pytest
import torch

from kr3.errors import UserError
from kr3.model import GPT, GPTConfig, KVCache


def tiny(**kw):
    return GPTConfig(**{"vocab_size": 97, "n_layers": 2, "n_heads": 2, "d_model": 32, "d_ffn": 64, "block_size": 16, **kw})


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    x = torch.randint(0, 97, (2, 12))
    full = model(x)
    cache = KVCache(model.cfg, 2, "cpu", torch.float32)
    steps = [model(x[:, :5], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_loss_and_shapes():
    model = GPT(tiny())
    x = torch.randint(0, 97, (3, 16))
    assert model(x).shape == (3, 16, 97)
    loss = model(x, x)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # near uniform at init
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.randint(0, 97, (1, 17)))


def test_tied_embeddings_and_param_groups():
    model = GPT(tiny())
    assert model.head.weight is model.tok_emb.weight
    groups = model.param_groups(0.1)
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_params()
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
    assert model.flops_per_token() > 6 * model.num_params(embeddings=False)


@pytest.mark.parametrize("kw, msg", [({"d_model": 30, "n_heads": 4}, "not divisible"), ({"n_layers": 0}, "positive"),
                                     ({"dropout": 1.5}, "dropout")])
def test_inconsistent_sizes(kw, msg):
    with pytest.raises(UserError, match=msg):
        tiny(**kw)
