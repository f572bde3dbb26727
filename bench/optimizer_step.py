"""Time one optimizer step of the experiment=cpu_15min model (or model=small's shape, --small): torch's fused AdamW
(optimizer=adamw) and its default foreach one, kr3's MuonAdamW (optimizer=muon), and torch.optim.Muon on the same
matrices beside torch's AdamW. Random gradients; median of
--steps steps, one thread; the machine line (bench/harness.py) first. torch's Muon runs its Newton–Schulz iteration
in bf16: to see what that costs on a CPU without native bf16, run it again under ONEDNN_MAX_CPU_ISA=AVX2.

uv run python bench/optimizer_step.py --steps 20 [--small]
ONEDNN_MAX_CPU_ISA=AVX2 uv run python bench/optimizer_step.py --steps 20
"""

import argparse
import statistics
import time

import harness
import torch
from omegaconf import OmegaConf

from kr3 import optim
from kr3.model import GPT, GPTConfig


class TorchMuonAdamW:
    """torch.optim.Muon for optimizer=muon's Muon group, torch.optim.AdamW for the others."""

    def __init__(self, groups, lr, muon_lr):
        self.adamw = torch.optim.AdamW([g for g in groups if not g.get("muon")], lr=lr, betas=(0.9, 0.95))
        self.muon = torch.optim.Muon([g for g in groups if g.get("muon")], lr=muon_lr, weight_decay=0.0,
                                     momentum=optim.MUON_MOMENTUM, adjust_lr_fn="original")

    def step(self):
        self.adamw.step()
        self.muon.step()


def median_ms(opt, steps: int) -> float:
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="model=small's shape (13.8M parameters), not cpu_15min's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = harness.SMALL if args.small else dict(n_layers=2, n_heads=2, d_model=96, d_ffn=384, block_size=64)
    model = GPT(GPTConfig(vocab_size=8000, **shape))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    t = dict(lr=1e-2, embedding_lr=0.3, muon_lr=0.05, weight_decay=0.1, betas=[0.9, 0.95])
    cpu = torch.device("cpu")
    opts = {
        "torch AdamW (optimizer=adamw)": optim.build(model, OmegaConf.create({**t, "optimizer": "adamw"}), cpu),
        "torch AdamW, foreach (default)": torch.optim.AdamW(model.param_groups(0.1, 30.0), lr=1e-2, betas=(0.9, 0.95)),
        "kr3 MuonAdamW (optimizer=muon)": optim.build(model, OmegaConf.create({**t, "optimizer": "muon"}), cpu),
        "torch.optim.Muon + torch AdamW": TorchMuonAdamW(model.param_groups(0.1, 30.0, muon_lr_scale=5.0), 1e-2, 0.05),
    }
    print(harness.machine_line())
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    for name, opt in opts.items():
        print(f"{name:32s} {median_ms(opt, args.steps):7.1f} ms/step")


if __name__ == "__main__":
    main()
