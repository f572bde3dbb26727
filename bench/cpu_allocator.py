"""What glibc's handling of freed memory costs a CPU training step: a plain eager fp32 loop (random windows
of the prepared nsmc data, AdamW) with glibc's defaults, or after `kr3.hardware.keep_freed_memory()`.
Prints the median step time, tokens/s, minor page faults and user/system CPU seconds. One process per mode
(the setting is process-wide).

    uv run python bench/cpu_allocator.py plain 60 tiny     # 2 layers, d_model 128, block 64, batch 64
    uv run python bench/cpu_allocator.py mallopt 60 tiny
    uv run python bench/cpu_allocator.py plain 10          # 6 layers, d_model 384, block 256, batch 16
"""

import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kr3.hardware import keep_freed_memory  # noqa: E402
from kr3.model import GPT, GPTConfig  # noqa: E402

mode, steps, tiny = sys.argv[1], int(sys.argv[2]), len(sys.argv) > 3
if mode == "mallopt":
    print("keep_freed_memory:", keep_freed_memory())
T, B = (64, 64) if tiny else (256, 16)
cfg = GPTConfig(vocab_size=8000, n_layers=2, n_heads=2, d_model=128, d_ffn=512, block_size=64) if tiny else \
    GPTConfig(vocab_size=8000, n_layers=6, n_heads=6, d_model=384, d_ffn=1536, block_size=256)
torch.manual_seed(0)
m = GPT(cfg)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
data_dir = next(p for p in (ROOT / "data").glob("local-spbpe8000-*") if (p / "meta.json").exists())
data = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
times = []
r0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(steps):
    t = time.perf_counter()
    ix = np.random.randint(0, len(data) - T - 1, B)
    c = torch.from_numpy(np.stack([data[j : j + T + 1] for j in ix]).astype(np.int64))
    loss = m(c[:, :-1], c[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
r1 = resource.getrusage(resource.RUSAGE_SELF)
med = sorted(times[2:])[len(times[2:]) // 2]
print(f"{mode}: median {med:.3f} s/step, {B * T / med:,.0f} tok/s, minor faults {r1.ru_minflt - r0.ru_minflt:,}, "
      f"sys {r1.ru_stime - r0.ru_stime:.1f} s, user {r1.ru_utime - r0.ru_utime:.1f} s")
