"""Run-to-run variance of one training step (the model=small shape of bench/train_throughput.py, batch 16, random
tokens) with and without the parameter groups and gradient clipping that kr3 adds. Prints, after the machine line
(bench/harness.py), one line per configuration: groups, clip, the median seconds of steps 2–6 of 6;
the first configuration runs again last, so the spread of the same configuration shows.

    uv run python bench/step_variance.py
"""

import statistics
import time

import harness
import torch

from kr3.model import GPT, GPTConfig

torch.manual_seed(0)
m = GPT(GPTConfig(vocab_size=8000, **harness.SMALL))
x = torch.randint(0, 8000, (16, 257))


def run(groups, clip, n=6):
    opt = torch.optim.AdamW(m.param_groups(0.1) if groups else m.parameters(), lr=1e-4)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[1:])


print(harness.machine_line())
for g, c in [(False, False), (True, False), (False, True), (True, True), (False, False)]:
    print(g, c, round(run(g, c), 3))
