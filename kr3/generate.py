"""Sampling with a KV cache."""

from __future__ import annotations

import torch

from kr3.model import GPT, KVCache


@torch.no_grad()
def sample_tokens(model: GPT, prompt_ids: list[int], max_new_tokens: int, eos_id: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                  generator: torch.Generator | None = None):
    """Yield new token ids one at a time, stopping at EOS or `max_new_tokens`. The prompt is left-truncated
    to leave room in the context; temperature 0 is greedy."""
    cfg = model.cfg
    device = next(model.parameters()).device
    room = cfg.block_size - 1
    ids = list(prompt_ids)[-room:] or [eos_id]
    cache = KVCache(cfg, 1, device, next(model.parameters()).dtype)
    logits = model(torch.tensor([ids], device=device), cache=cache)[0, -1]
    seen = list(ids)
    for _ in range(max_new_tokens):
        nxt = pick(logits.float(), seen, temperature, top_k, top_p, repetition_penalty, generator)
        if nxt == eos_id:
            return
        yield nxt
        seen.append(nxt)
        if cache.length >= cfg.block_size:  # context full: restart the cache on the most recent tokens
            cache = KVCache(cfg, 1, device, cache.k[0].dtype)
            logits = model(torch.tensor([seen[-room:]], device=device), cache=cache)[0, -1]
        else:
            logits = model(torch.tensor([[nxt]], device=device), cache=cache)[0, -1]


def pick(logits, seen, temperature, top_k, top_p, repetition_penalty, generator) -> int:
    if repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), device=logits.device)
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    if top_p and top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
