"""torch's attention kernel on a CPU in bf16 and in fp32, forward and backward, one thread, at kr3's shapes: why
kr3.model.attention runs it in fp32 under bf16 up to FP32_ATTENTION_UP_TO keys. Median ms of 3 rounds of 5 calls.
The machine line (bench/harness.py) heads the output.

    uv run python bench/attention_kernel.py
"""

import statistics
import time

import harness
import torch
import torch.nn.functional as F

SHAPES = [(64, 2, 64, 48), (16, 6, 256, 64), (4, 12, 1024, 64)]  # cpu_15min at depth 2; model=small; a long context


def ms_per_call(q: torch.Tensor, dtype: torch.dtype) -> float:
    def call():
        y = F.scaled_dot_product_attention(q.to(dtype), q.to(dtype), q.to(dtype), is_causal=True)
        y.float().sum().backward()

    call()
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(5):
            call()
        rounds.append((time.perf_counter() - start) / 5 * 1e3)
    return statistics.median(rounds)


def main():
    torch.set_num_threads(1)
    rows = []
    for shape in SHAPES:
        q = torch.randn(*shape, requires_grad=True)
        bf16, fp32 = ms_per_call(q, torch.bfloat16), ms_per_call(q, torch.float32)
        rows.append([" × ".join(map(str, shape)), f"{bf16:.1f}", f"{fp32:.1f}", f"{bf16 / fp32:.2f}x"])
    harness.print_table(["batch × heads × keys × head dim", "bf16 ms", "fp32 ms", "bf16 / fp32"], rows,
                        "uv run python bench/attention_kernel.py (forward + backward, causal, one thread)")


if __name__ == "__main__":
    main()
