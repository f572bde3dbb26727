import pytest
import torch
from omegaconf import OmegaConf

from kr3 import optim
from kr3.errors import UserError
from kr3.model import GPT, GPTConfig


def trainer_cfg(**kw):
    return OmegaConf.create({"optimizer": "adamw", "lr": 1e-2, "muon_lr": 0.05, "embedding_lr": None,
                             "weight_decay": 0.1, "betas": [0.9, 0.95], **kw})


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, n_layers=2, n_heads=2, d_model=16, d_ffn=32, block_size=8))


@pytest.mark.parametrize("shape", [(96, 384), (384, 96)])
def test_orthogonalize_flattens_the_spectrum_and_keeps_the_directions(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    u, s, vt = torch.linalg.svd(g, full_matrices=False)
    assert s.max() / s.min() > 2.5  # the input is far from orthogonal
    o = optim.orthogonalize(g)
    so = torch.linalg.svdvals(o)
    assert o.shape == g.shape and so.min() > 0.6 and so.max() < 1.25
    assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ vt).flatten(), dim=0) > 0.97


def test_adamw_groups_step_like_torch_adamw():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]

    def groups(ps):
        return [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0, "lr": 3e-2}]

    ref = torch.optim.AdamW(groups(a), lr=1e-2, betas=(0.9, 0.95))
    ours = optim.MuonAdamW(groups(b), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(20):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ref.step()
        ours.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p)


def test_muon_takes_exactly_the_block_matrices():
    model = tiny_gpt()
    opt = optim.build(model, trainer_cfg(optimizer="muon"), torch.device("cpu"))
    muon = [g for g in opt.param_groups if g["muon"]]
    assert len(muon) == 1 and muon[0]["lr_scale"] == pytest.approx(5.0) and muon[0]["weight_decay"] == 0
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon[0]["params"]) == sorted(
        n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2)
    every = [p for g in opt.param_groups for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))


def test_muon_step_lowers_the_loss():
    model = tiny_gpt()
    opt = optim.build(model, trainer_cfg(optimizer="muon"), torch.device("cpu"))
    x = torch.randint(0, 50, (4, 9))
    first = None
    for _ in range(30):
        loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < first - 1.0


@pytest.mark.parametrize("kw, message", [
    ({"optimizer": "sgd"}, "trainer.optimizer='sgd': choose adamw or muon"),
    ({"optimizer": "muon", "lr": 0}, "trainer.muon_lr=0.05 is applied as a multiple of trainer.lr: set trainer.lr > 0"),
])
def test_bad_optimizer_settings_are_user_errors(kw, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        optim.build(tiny_gpt(), trainer_cfg(**kw), torch.device("cpu"))
