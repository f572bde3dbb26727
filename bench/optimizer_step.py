"""Time one optimizer step of the experiment=cpu_15min model: AdamW (torch), and kr3's MuonAdamW with
optimizer=adamw's groups and with optimizer=muon's. Random gradients; median of --steps steps.

uv run python bench/optimizer_step.py --steps 20
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kr3 import optim  # noqa: E402
from kr3.model import GPT, GPTConfig  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8000, n_layers=2, n_heads=2, d_model=96, d_ffn=384, block_size=64))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    t = dict(lr=1e-2, embedding_lr=0.3, muon_lr=0.05, weight_decay=0.1, betas=[0.9, 0.95])
    cpu = torch.device("cpu")
    opts = {
        "torch AdamW (optimizer=adamw)": optim.build(model, OmegaConf.create({**t, "optimizer": "adamw"}), cpu),
        "MuonAdamW, all groups AdamW": optim.MuonAdamW(model.param_groups(0.1, 30.0), lr=1e-2),
        "MuonAdamW (optimizer=muon)": optim.build(model, OmegaConf.create({**t, "optimizer": "muon"}), cpu),
    }
    for name, opt in opts.items():
        for _ in range(3):
            opt.step()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        print(f"{name:32s} {statistics.median(times) * 1e3:6.1f} ms/step")


if __name__ == "__main__":
    main()
