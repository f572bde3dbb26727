"""One training step (forward, backward, AdamW) of GPT with its loss computed two ways, interleaved in one
process: torch's cross-entropy of the whole (tokens, vocab) logits, and kr3's `linear_cross_entropy`
(chunked, gradients from the same softmax). Random tokens, 8k vocab; median ms per step of each variant
over --reps rounds of --steps steps. On CUDA: bf16 autocast, and the peak memory of each variant; on a CPU
the process's peak RSS, which says something with one --variant per process. The machine line (bench/harness.py)
heads the output.

uv run python bench/cross_entropy.py --shape cpu_15min --steps 20 --reps 3
uv run python bench/cross_entropy.py --shape small --steps 5 --reps 3
uv run python bench/cross_entropy.py --shape small --batch 64 --steps 2 --reps 1 --variant torch   # then kr3
python bench/cross_entropy.py --device cuda --shape small --batch 256 --steps 20 --reps 3
"""

import argparse
import resource
import statistics
import time

import harness
import torch
import torch.nn.functional as F

import kr3.model as km
from kr3 import hardware

# (n_layers, n_heads, d_model, d_ffn, block_size, batch): experiment=cpu_15min's model, and model=small
SHAPES = {"cpu_15min": (2, 2, 96, 384, 64, 64), "small": (6, 6, 384, 1536, 256, 16)}


def torch_loss(h, weight, targets):
    return F.cross_entropy((h @ weight.t()).float(), targets)


def time_steps(loss_fn, cfg, batch: int, dev, dtype, steps: int) -> tuple[float, float]:
    """ms per training step with `loss_fn` as GPT's loss, and the last loss."""
    km.linear_cross_entropy = loss_fn  # GPT.forward looks it up at call time
    torch.manual_seed(0)
    model = km.GPT(cfg).to(dev)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3, fused=dev.type == "cuda")
    tokens = torch.randint(0, 8000, (batch, cfg.block_size + 1), device=dev)

    def step():
        with hardware.autocast(dev, dtype):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = loss.item()  # waits for the device
    return (time.perf_counter() - start) / steps * 1e3, loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="cpu_15min")
    ap.add_argument("--batch", type=int, help="sequences per step (default: the shape's)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", choices=["torch", "kr3", "both"], default="both")
    a = ap.parse_args()
    dev = torch.device(a.device)
    L, H, D, FF, T, B = SHAPES[a.shape]
    B = a.batch or B
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dev.type == "cpu":
        hardware.keep_freed_memory()  # as the trainer does
    print(harness.machine_line(), flush=True)
    cfg = km.GPTConfig(vocab_size=8000, n_layers=L, n_heads=H, d_model=D, d_ffn=FF, block_size=T)
    print(f"{a.shape}: {L} layers, d_model {D}, {B} × {T} tokens per step, {dev}, {dtype}, "
          f"{torch.get_num_threads()} threads", flush=True)
    variants = {"torch cross_entropy": torch_loss, "kr3 linear_cross_entropy": km.linear_cross_entropy}
    variants = {k: v for k, v in variants.items() if a.variant in ("both", k.split()[0])}
    times = {name: [] for name in variants}
    for _ in range(a.reps):
        for name, loss_fn in variants.items():
            ms, loss = time_steps(loss_fn, cfg, B, dev, dtype, a.steps)
            times[name].append(ms)
            mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if dev.type == "cuda" else ""
            print(f"  {name}: {ms:.1f} ms/step (loss {loss:.5f}){mem}", flush=True)
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.1f} ms/step, {B * T / statistics.median(ts) * 1e3:,.0f} tokens/s")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
