"""`model.depth`: one dial for the model's shape (as nanochat's --depth), and `model.depth=auto`, which picks the depth
from the measured speed of this machine so that the model's parameters see `model.tokens_per_param` tokens each in
`trainer.max_time` — a faster CPU or a GPU gets a bigger model, not only more steps."""

from __future__ import annotations

import logging
import time

import torch

from kr3 import distributed, hardware, optim
from kr3.errors import UserError
from kr3.model import GPT, GPTConfig
from kr3.settings import DEPTH_SETS, MAX_DEPTH

log = logging.getLogger(__name__)

WIDTH_PER_LAYER = 48  # d_model = 48 × depth; heads of 48 dimensions, so n_heads = depth (depth 2: cpu_15min's shape)
TIMED_STEPS = 3  # after one untimed step: its first step allocates


def shape_at(depth: int, arch: str) -> dict:
    """The shape of a given depth: GPT-2's MLP is 4 × d_model wide, Llama's SwiGLU 8/3 × (its parameters), rounded up
    to a multiple of 32."""
    d_model = WIDTH_PER_LAYER * depth
    d_ffn = 4 * d_model if arch == "gpt2" else -(-8 * d_model // (3 * 32)) * 32
    return {"n_layers": depth, "n_heads": depth, "d_model": d_model, "d_ffn": d_ffn}


def check(model_cfg, t, overrides: list[str]) -> None:
    """Before any work: a depth with a shape given beside it, or auto without a time budget, is a one-line error."""
    depth = getattr(model_cfg, "depth", None)
    if depth is None:
        return
    if depth == "auto" and not t.max_time:
        raise UserError("model.depth=auto sizes the model to trainer.max_time: set it (e.g. trainer.max_time=15m) "
                        "or give a depth (model.depth=4)")
    given = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in {f"model.{k}" for k in DEPTH_SETS}]
    if given:
        raise UserError(f"model.depth={depth} sets n_layers, n_heads, d_model and d_ffn: drop {' '.join(given)}, "
                        "or add model.depth=null to give the shape yourself")


def apply(model_cfg, depth: int) -> None:
    """Write a depth's shape into the `model` settings, so the run's config and checkpoints say what was trained."""
    for key, value in shape_at(depth, model_cfg.arch).items():
        setattr(model_cfg, key, value)
    model_cfg.depth = depth


def measure(model_cfg, t, vocab_size: int, device, dtype) -> tuple[float, int]:
    """(seconds per optimizer step of this shape here, its parameters): forward, backward and update of random tokens
    in the trainer's batch (its micro-steps), without the data, evaluations or DDP's all-reduce."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_cfg(model_cfg, vocab_size)).to(device)
    opt = optim.build(model, t, device)
    x = torch.randint(vocab_size, (t.batch_size, model_cfg.block_size + 1), device=device)

    def one_step():
        for _ in range(t.grad_accum):
            with hardware.autocast(device, dtype):
                loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one_step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        one_step()
    synchronize(device)
    return (time.perf_counter() - start) / TIMED_STEPS, model.num_params()


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_depth(model_cfg, t, budget_s: float, vocab_size: int, device, dtype) -> int:
    """The deepest shape whose parameters each see `model.tokens_per_param` tokens in the budget at its measured step
    time (depth 1 if none does); every rank takes rank 0's choice."""
    tokens_per_step = t.batch_size * t.grad_accum * model_cfg.block_size * distributed.world_size()
    chosen, start = None, time.perf_counter()
    for depth in range(1, MAX_DEPTH + 1):
        apply(model_cfg, depth)
        try:
            seconds, params = measure(model_cfg, t, vocab_size, device, dtype)
        except torch.OutOfMemoryError:
            break
        ratio = budget_s / seconds * tokens_per_step / params
        log.debug(f"depth {depth}: {seconds * 1e3:.0f} ms per step, {params / 1e6:.2f}M parameters, {ratio:.1f} "
                  "tokens per parameter")
        if ratio < model_cfg.tokens_per_param:
            break
        chosen = depth
    why = "the deepest whose parameters see" if chosen else "the smallest: no depth's parameters see"
    chosen = distributed.rank0_int(chosen or 1)
    apply(model_cfg, chosen)
    log.info(f"model.depth=auto: depth {chosen} ({shape_line(model_cfg)}), {why} model.tokens_per_param="
             f"{model_cfg.tokens_per_param:g} tokens each in trainer.max_time={t.max_time} here (measured in "
             f"{time.perf_counter() - start:.0f} s; model.depth={chosen} repeats the choice)")
    return chosen


def shape_line(model_cfg) -> str:
    return " ".join(f"{k}={getattr(model_cfg, k)}" for k in DEPTH_SETS)


def resolve(cfg, vocab_size: int, device, dtype, budget_s: float | None) -> None:
    """Give cfg.model the shape its depth names (measured first for auto); a run without a depth keeps its shape."""
    depth = getattr(cfg.model, "depth", None)
    if depth == "auto":
        choose_depth(cfg.model, cfg.trainer, budget_s, vocab_size, device, dtype)
    elif depth is not None:
        apply(cfg.model, depth)
