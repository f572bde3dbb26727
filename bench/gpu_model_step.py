"""Step time of the bare model on a CUDA GPU (no trainer): forward, backward, clipping and fused AdamW in
bf16 autocast, eager and compiled, for the model=small and model=base shapes on random tokens; then a
torch.profiler table of three base steps, after the machine line (bench/harness.py). A yardstick for
`run.py stage=train` (bench/gpu.py).

    python bench/gpu_model_step.py
"""

import time

import harness
import torch
from torch.profiler import ProfilerActivity, profile

from kr3.model import GPT, GPTConfig

dev = "cuda"
print(harness.machine_line(), flush=True)


def bench(cfg, B, compile_=False, label=""):
    torch.manual_seed(0)
    m = GPT(cfg).to(dev)
    opt = torch.optim.AdamW(m.param_groups(0.1), lr=1e-4, fused=True)
    f = torch.compile(m) if compile_ else m
    x = torch.randint(0, cfg.vocab_size, (B, cfg.block_size + 1), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = f(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(8):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 10
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / n
    tps = B * cfg.block_size / dt
    print(f"{label}: {dt * 1e3:.1f} ms/step, {tps:,.0f} tok/s, {m.flops_per_token() * tps / 1e12:.1f} TFLOP/s", flush=True)
    return step


small = GPTConfig(vocab_size=8000, n_layers=6, n_heads=6, d_model=384, d_ffn=1536, block_size=256)
base = GPTConfig(vocab_size=8000, n_layers=12, n_heads=12, d_model=768, d_ffn=3072, block_size=512, dropout=0.0)
bench(small, 256, False, "small eager B256")
bench(small, 256, True, "small compile B256")
step = bench(base, 64, False, "base eager B64 nodrop")
bench(base, 64, True, "base compile B64 nodrop")
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
