"""Short fixed-wall-time training probes, to choose a 15-minute recipe (BENCHMARKS.md, quality): a plain
loop of kr3's GPT on the prepared nsmc data (random windows, AdamW, warmup then cosine over the time
budget), with the optimizer groups of `GPT.param_groups` (the token table at `--emb` × the learning rate, no
weight decay there). Prints one JSON line: steps, tokens/s, final train loss, val loss and bpc on the first
131,072 val tokens, after a line naming the machine (bench/harness.py). Needs ../shared: the prepared nsmc data is
made first when there is none.

    uv run python bench/quality_probe.py --minutes 3 --L 2 --H 2 --d 128 --ffn 512 --block 64 --batch 64 --lr 1e-2 --emb 30
"""

import argparse
import json
import math
import time

import harness
import numpy as np
import torch

from kr3.model import GPT, GPTConfig
from kr3.scoring import token_loss

p = argparse.ArgumentParser()
defaults = dict(L=4, H=4, d=256, ffn=1024, block=128, batch=32, lr=3e-3, emb=1.0, wd=0.1, minutes=3.0, warm=50, minr=0.1,
                b2=0.95, clip=1.0)
for k, v in defaults.items():
    p.add_argument("--" + k, type=type(v), default=v)
a = p.parse_args()
torch.manual_seed(0)
torch.set_num_threads(2)
d = harness.nsmc_data_dir()
print(harness.machine_line(), flush=True)
meta = json.loads((d / "meta.json").read_text())
tr = np.memmap(d / "train.bin", dtype=np.uint16, mode="r")
va = np.memmap(d / "val.bin", dtype=np.uint16, mode="r")
cfg = GPTConfig(vocab_size=meta["vocab_size"], n_layers=a.L, n_heads=a.H, d_model=a.d, d_ffn=a.ffn, block_size=a.block,
                dropout=0.0, bias=True)
m = GPT(cfg)
opt = torch.optim.AdamW(m.param_groups(a.wd, a.emb), lr=a.lr, betas=(0.9, a.b2))
rng = np.random.default_rng(0)
budget = a.minutes * 60
t0 = time.time()
step = 0
toks = 0
losses = []
while True:
    el = time.time() - t0
    if el > budget:
        break
    frac = el / budget
    lr = a.lr * min(1, (step + 1) / a.warm) * (a.minr + (1 - a.minr) * 0.5 * (1 + math.cos(math.pi * frac)))
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    s = rng.integers(0, len(tr) - a.block - 1, a.batch)
    c = torch.from_numpy(np.stack([tr[i : i + a.block + 1] for i in s]).astype(np.int64))
    loss = m(c[:, :-1], c[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if a.clip:
        torch.nn.utils.clip_grad_norm_(m.parameters(), a.clip)
    opt.step()
    step += 1
    toks += c[:, 1:].numel()
    losses.append(loss.item())
el = time.time() - t0
nats, n = token_loss(m, np.asarray(va[:131072]), 2, a.block, 32, "cpu", torch.float32)
vl = nats / n
print(
    json.dumps(
        dict(
            args=vars(a),
            steps=step,
            tokens=toks,
            tok_s=round(toks / el),
            train=round(float(np.mean(losses[-20:])), 3),
            val=round(vl, 3),
            bpc=round(vl * 598863 / 1187788 / math.log(2), 3),
        )
    ),
    flush=True,
)
