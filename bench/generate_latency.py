"""Generation speed on CPU, `model=small` shape (6 layers, d_model 384, block 256, 8k vocab), batch 1:
256 new tokens with the KV cache vs a full re-forward of the whole context at each step, and the time
to first token for a 32-token prompt. Latency does not depend on the weights, so the model is freshly
initialized; EOS is disabled so every run makes all 256 tokens. The table is headed by the machine (bench/harness.py).

    uv run python bench/generate_latency.py [--device cuda] [--new 256] [--repeats 3]
"""

import argparse
import statistics
import time

import harness
import torch

from kr3.model import GPT, GPTConfig
from kr3.sampling import sample_tokens


@torch.no_grad()
def full_reforward(model, prompt, n):
    ids = list(prompt)
    dev = next(model.parameters()).device
    for _ in range(n):
        ctx = ids[-model.cfg.block_size :]
        ids.append(int(model(torch.tensor([ctx], device=dev))[0, -1].argmax()))
    return ids[len(prompt) :]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8000, **harness.SMALL)).to(dev).eval()
    prompt = torch.randint(0, 8000, (32,)).tolist()
    cached = lambda: list(sample_tokens(model, prompt, args.new, eos_id=-1, temperature=0))  # noqa: E731
    first = lambda: next(iter(sample_tokens(model, prompt, 1, eos_id=-1, temperature=0)))  # noqa: E731
    cached(), full_reforward(model, prompt, 8), first()  # warm-up
    t_cache = statistics.median(timed(cached, dev)[0] for _ in range(args.repeats))
    t_full = statistics.median(timed(lambda: full_reforward(model, prompt, args.new), dev)[0] for _ in range(args.repeats))
    ttft = statistics.median(timed(first, dev)[0] for _ in range(10))
    harness.print_table(["decoding", "ms/token", "tokens/s"],
                        [["KV cache", f"{t_cache / args.new * 1e3:.2f}", f"{args.new / t_cache:,.0f}"],
                         ["full re-forward", f"{t_full / args.new * 1e3:.2f}", f"{args.new / t_full:,.0f}"]],
                        f"device {dev}, batch 1, greedy, {args.new} new tokens after a 32-token prompt, "
                        f"median of {args.repeats}")
    print(f"speed-up {t_full / t_cache:.1f}x; time to first token (32-token prompt) {ttft * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
