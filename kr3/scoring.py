"""Scoring a model on a token stream: summed next-token loss, and loss / perplexity / bits per character."""

from __future__ import annotations

import math

import numpy as np
import torch

from kr3 import distributed, hardware
from kr3.console import progress


@torch.no_grad()
def token_loss(model, tokens: np.ndarray, eos_id: int, block_size: int, batch_size: int, device, dtype,
               show_progress: bool = False, context: int | None = None) -> tuple[float, int]:
    """Sum of next-token losses (nats) and the number of tokens scored: every token of `tokens` once,
    the first one predicted from `context` (default: an end-of-review token), in windows of `block_size`.
    Scoring t[:k·block_size] and then t[k·block_size:] with context t[k·block_size - 1] gives the windows
    of one pass over t. Under DDP each rank scores a disjoint share of the windows; the sums are all-reduced."""
    stream = np.concatenate([[eos_id if context is None else context], np.asarray(tokens, dtype=np.int64)])
    starts = list(range(0, len(stream) - 1, block_size))[distributed.rank() :: distributed.world_size()]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    for group in progress(batches, desc="eval", unit="batch", enabled=show_progress and distributed.is_main()):
        full = [s for s in group if s + block_size + 1 <= len(stream)]
        for part in ([full] if full else []) + [[s] for s in group if s not in full]:
            span = min(block_size, len(stream) - 1 - part[0])
            x = torch.from_numpy(np.stack([stream[s : s + span] for s in part])).to(device)
            y = torch.from_numpy(np.stack([stream[s + 1 : s + span + 1] for s in part])).to(device)
            with hardware.autocast(device, dtype):
                total[0] += model(x, y).double() * y.numel()
            total[1] += y.numel()
    distributed.all_reduce_sum(total)
    model.train(was_training)
    return float(total[0]), int(total[1])


def review_rows(tokens: np.ndarray, eos_id: int, controls: set[int]) -> list[tuple[list[int], list[int]]]:
    """Each whole review of a token stream as (its head, the tokens to predict): [end of review] — and its control
    token, where it has one — then its text and its end-of-review token: the review read from its start, as a prompt
    of the REPL, the API or the server is."""
    tokens = np.asarray(tokens)
    ends = np.flatnonzero(tokens == eos_id)
    rows = []
    for start, end in zip(np.concatenate([[0], ends + 1])[: len(ends)], ends, strict=True):
        ids = tokens[start:end].tolist()
        head = [eos_id, ids.pop(0)] if ids and ids[0] in controls else [eos_id]
        if ids:
            rows.append((head, [*ids, eos_id]))
    return rows


@torch.no_grad()
def review_scores(model, tokens: np.ndarray, eos_id: int, controls: list[int], decode, batch_size: int, device,
                  dtype) -> dict:
    """Loss (nats per token) and bits per character of the whole reviews of `tokens`, each scored alone from its start
    (review_rows; the control token's own loss left out), in batches of similar lengths — beside token_loss's stream,
    where a review is read after the ones before it. Its characters are its decoded text's. Under DDP each rank scores
    a share of the reviews; the sums are all-reduced."""
    rows = review_rows(tokens, eos_id, set(controls))[distributed.rank() :: distributed.world_size()]
    was_training = model.training
    model.eval()
    nats = -sum(float(lp.double().sum()) for lp, _, _ in batch_logprobs(model, rows, batch_size, device, dtype))
    model.train(was_training)
    total = torch.tensor([nats, sum(len(t) for _, t in rows), sum(len(decode(t[:-1])) for _, t in rows)],
                         dtype=torch.float64, device=device)
    distributed.all_reduce_sum(total)
    nats, n, chars = total.tolist()
    return {"review_loss": nats / n if n else math.nan, "review_bpc": nats / chars / math.log(2) if chars else math.nan}


def metrics(nats: float, n_tokens: int, split_tokens: int, split_chars: int) -> dict:
    """loss (nats/token), perplexity, and bits per character = loss × tokens / characters / ln 2,
    with the split's token and character counts from meta.json (exact when the whole split is scored)."""
    loss = nats / max(1, n_tokens)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bpc": loss * split_tokens / split_chars / math.log(2)}


@torch.no_grad()
def token_logprobs(model, head: list[int], tokens: list[int], device, dtype, top: int = 0,
                   never: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-probability of each of `tokens` given `head` (its context: at least one token) and the tokens before
    it, in token_loss's windows of the model's block_size — with head [end of review] their sum is −token_loss's
    nats — and, with `top`, the `top` most likely tokens at each position (never one of `never`) and theirs:
    (logprobs (n,), top ids (n, top), top logprobs (n, top)), on the CPU."""
    if not tokens:
        return torch.zeros(0), torch.zeros(0, top, dtype=torch.long), torch.zeros(0, top)
    block = model.cfg.block_size
    stream = torch.tensor([*head, *tokens], dtype=torch.long, device=device)
    first, n = len(head) - 1, len(stream) - 1  # predictions first..n-1 are of `tokens`
    chosen, top_ids, top_lp = [], [], []
    for s in range(0, n, block):
        span = min(block, n - s)
        with hardware.autocast(device, dtype):
            logits = model(stream[s : s + span][None])[0]
        keep = slice(max(0, first - s), span)  # the head's own predictions are not asked for
        logp = logits[keep].float().log_softmax(-1)
        chosen.append(logp.gather(1, stream[s + 1 : s + span + 1][keep, None])[:, 0])
        if top:
            if never:
                logp[:, never] = -float("inf")
            values, ids = logp.topk(min(top, logp.size(-1)), -1)
            top_ids.append(ids)
            top_lp.append(values)
    if not top:
        return torch.cat(chosen).cpu(), torch.zeros(len(tokens), 0, dtype=torch.long), torch.zeros(len(tokens), 0)
    return torch.cat(chosen).cpu(), torch.cat(top_ids).cpu(), torch.cat(top_lp).cpu()


def padded_logits(model, seqs: list[list[int]], device, dtype) -> torch.Tensor:
    """The logits (B, T, V) of `seqs` (each at most block_size tokens) in one forward pass, padded on the right: causal
    attention never lets an earlier position see the padding."""
    x = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for b, seq in enumerate(seqs):
        x[b, : len(seq)] = torch.tensor(seq)
    with hardware.autocast(device, dtype):
        return model(x.to(device))


def by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of `batch_size`, the longest first: rows of similar lengths padded together."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def batch_logprobs(model, rows: list[tuple[list[int], list[int]]], batch_size: int, device, dtype, top: int = 0,
                   never: list[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """token_logprobs of many (head, tokens) rows: those that fit one window (block_size + 1 tokens) scored in batches
    (padded_logits), a longer row alone, in its windows."""
    block, out = model.cfg.block_size, [None] * len(rows)
    short = [i for i, (h, t) in enumerate(rows) if t and len(h) + len(t) <= block + 1]
    for i in set(range(len(rows))) - set(short):
        out[i] = token_logprobs(model, *rows[i], device, dtype, top, never)
    for group in by_length([len(rows[i][0]) + len(rows[i][1]) for i in short], batch_size):
        group = [short[g] for g in group]
        seqs = [[*rows[i][0], *rows[i][1]] for i in group]
        logits = padded_logits(model, [seq[:-1] for seq in seqs], device, dtype)
        for b, (i, seq) in enumerate(zip(group, seqs, strict=True)):
            first, end = len(rows[i][0]) - 1, len(seq) - 1
            logp = logits[b, first:end].float().log_softmax(-1)
            chosen = logp.gather(1, torch.tensor(seq[first + 1 :], device=logp.device)[:, None])[:, 0].cpu()
            if not top:
                out[i] = (chosen, torch.zeros(end - first, 0, dtype=torch.long), torch.zeros(end - first, 0))
                continue
            if never:
                logp[:, never] = -float("inf")
            values, ids = logp.topk(min(top, logp.size(-1)), -1)
            out[i] = (chosen, ids.cpu(), values.cpu())
    return out


@torch.no_grad()
def last_logits(model, seqs: list[list[int]], batch_size: int, device, dtype) -> torch.Tensor:
    """The next token's logits (fp32, on the CPU) after each of `seqs` (each at most block_size tokens), in batches
    (padded_logits)."""
    out = torch.empty(len(seqs), model.cfg.vocab_size)
    for group in by_length(list(map(len, seqs)), batch_size):
        logits = padded_logits(model, [seqs[i] for i in group], device, dtype)
        for b, i in enumerate(group):
            out[i] = logits[b, len(seqs[i]) - 1].float().cpu()
    return out
