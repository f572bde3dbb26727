"""Does the trainer's input path slow a CUDA step? The model=small shape (batch 256, bf16 autocast, eager)
timed on: random tokens already on the GPU, real tokens already on the GPU, `kr3.batches.Batches` windows
copied each step, and the same from pinned memory. Writes and prepares a synthetic corpus
(`harness.synthetic_corpus`, in /tmp/p); the machine line (bench/harness.py) heads the times.

    python bench/gpu_input_path.py
"""

import time
from pathlib import Path

import harness
import torch

from kr3.batches import Batches
from kr3.model import GPT, GPTConfig

out = Path("/tmp/p")
out.mkdir(exist_ok=True)
harness.run_kr3("stage=prepare", *harness.local_data(harness.synthetic_corpus(out / "c.parquet", 200_000), out / "data"))
d = next((out / "data").glob("*/meta.json")).parent
print(harness.machine_line(), flush=True)
dev = "cuda"
B = 256
cfg = GPTConfig(vocab_size=8000, n_layers=6, n_heads=6, d_model=384, d_ffn=1536, block_size=256)
torch.manual_seed(0)
m = GPT(cfg).to(dev)
opt = torch.optim.AdamW(m.param_groups(0.1), lr=1e-4, fused=True)
bt = Batches(d / "train.bin", "uint16", 256, B, 1, 0)
rnd = torch.randint(0, 8000, (B, 257), device=dev)
real = torch.cat([torch.cat(bt.get(0, 0), 1)[:, :1], bt.get(0, 0)[1]], 1).to(dev)


def step(x, y):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def variant(name, get):
    for i in range(5):
        step(*get(i))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(5, 15):
        step(*get(i))
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 10
    print(f"{name}: {dt * 1e3:.1f} ms/step {B * 256 / dt:,.0f} tok/s", flush=True)


variant("A random on gpu", lambda i: (rnd[:, :-1], rnd[:, 1:]))
variant("B real on gpu", lambda i: (real[:, :-1], real[:, 1:]))
variant("C Batches + to", lambda i: tuple(a.to(dev, non_blocking=True) for a in bt.get(i, 0)))
variant("D Batches pinned", lambda i: tuple(a.pin_memory().to(dev, non_blocking=True) for a in bt.get(i, 0)))
t = time.perf_counter()
[bt.get(i, 0) for i in range(20)]
print(f"Batches.get alone {(time.perf_counter() - t) / 20 * 1e3:.1f} ms", flush=True)
