"""The optimizer: AdamW, or Muon for the blocks' weight matrices with AdamW for everything else."""

from __future__ import annotations

import torch

from kr3.errors import UserError

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton–Schulz coefficients tuned for few steps (Muon)
MUON_MOMENTUM = 0.95


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U·Vᵀ of g = U·S·Vᵀ: every singular value pushed into roughly [0.7, 1.2]."""
    a, b, c = NS_COEFFS
    x = g / (g.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, so that checkpoints and the lr schedule see one list of groups. Groups with
    `muon=True` take Nesterov momentum orthogonalized per matrix (Muon, Keller Jordan 2024); the others
    take AdamW, step for step the same as torch.optim.AdamW."""

    def __init__(self, groups, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = MUON_MOMENTUM):
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0, muon=False,
                                      momentum=momentum))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                p.mul_(1 - lr * wd)
                if g["muon"]:
                    buf = st.setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(g["momentum"]).add_(p.grad)
                    update = orthogonalize(p.grad.add(buf, alpha=g["momentum"]))
                    # same RMS step for wide and tall matrices
                    p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
                    continue
                if not st:
                    st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                b1, b2 = g["betas"]
                st["step"] += 1
                st["m"].lerp_(p.grad, 1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (st["v"] / (1 - b2 ** st["step"])).sqrt_().add_(g["eps"])
                p.addcdiv_(st["m"], denom, value=-lr / (1 - b1 ** st["step"]))


def build(model, t, device: torch.device) -> torch.optim.Optimizer:
    """The trainer's optimizer from `trainer.*`. Every group carries `lr_scale`, its peak rate over `lr`.
    Muon is ours, not torch.optim.Muon: torch's runs its Newton–Schulz iteration in bf16, which CPUs without
    native bf16 emulate ~90x slower (BENCHMARKS.md, "Muon: torch's or ours")."""
    if t.optimizer not in ("adamw", "muon"):
        raise UserError(f"trainer.optimizer={t.optimizer!r}: choose adamw or muon")
    rates = {"embedding_lr": t.embedding_lr, **({"muon_lr": t.muon_lr} if t.optimizer == "muon" else {})}
    for key, rate in rates.items():  # each ≥ 0 already (kr3.settings.Trainer)
        if rate is not None and t.lr == 0:
            raise UserError(f"trainer.{key}={rate} is applied as a multiple of trainer.lr: set trainer.lr > 0")
    emb_scale = 1.0 if t.embedding_lr is None else t.embedding_lr / t.lr
    if t.optimizer == "adamw":
        # fused: one kernel over all tensors; on a CPU 3.8x (model=small) to 8.5x (cpu_15min) faster than foreach
        # (bench/optimizer_step.py, one thread)
        return torch.optim.AdamW(model.param_groups(t.weight_decay, emb_scale), lr=t.lr, betas=tuple(t.betas),
                                 fused=device.type in ("cuda", "cpu"))
    groups = model.param_groups(t.weight_decay, emb_scale, muon_lr_scale=t.muon_lr / t.lr)
    return MuonAdamW(groups, lr=t.lr, betas=tuple(t.betas))
