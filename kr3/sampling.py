"""Sampling from a GPT: picking the next token (temperature, top-k, top-p, repetition penalty), streaming
a completion through the KV cache, stop strings, and the K most likely next tokens."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import fields

import torch

from kr3.config import as_list
from kr3.data import clean_options, clean_text
from kr3.errors import UserError
from kr3.model import GPT, KVCache
from kr3.settings import Decoding, plain

END_OF_REVIEW = "<end of review>"  # next_tokens' text for the end-of-review (EOS) token
DECODING = tuple(f.name for f in fields(Decoding))  # every decoding option; their defaults: the `generate:` block


def decoding(settings) -> dict:
    """The decoding options among settings (the `generate:` block, typed or a config node), as plain values."""
    return {k: plain(getattr(settings, k)) for k in DECODING}


def check_decoding(options: Mapping) -> None:
    """One-line errors for decoding values out of range (kr3.settings.Decoding's), named `generate.<option>=...`."""
    Decoding(**{k: options[k] for k in DECODING})
    if not all(isinstance(s, str) and s for s in as_list(options["stop"])):
        raise UserError(f"generate.stop={options['stop']} must be non-empty strings, e.g. generate.stop='[\"!\",\"다\"]'")


@torch.no_grad()
def sample_tokens(model: GPT, prompt_ids: list[int], max_new_tokens: int, eos_id: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                  generator: torch.Generator | None = None, banned: list[int] | None = None,
                  heads: list[list[int]] = ((),), guidance: float = 1.0):
    """Yield new token ids one at a time, stopping at EOS or `max_new_tokens`. The prompt is left-truncated
    to leave room in the context; temperature 0 is greedy; `banned` ids are never picked (the rating control
    tokens: they begin a review, they are no text). Each of `heads` (equal lengths) is put before the text:
    one, or a rating's [EOS, control] and the other ratings' for `guidance` (see `next_logits`). When the context
    fills up, the cache restarts on the heads and the most recent half-context."""
    cfg = model.cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    text = list(prompt_ids)[-(cfg.block_size - 1 - len(heads[0])) :] or ([] if heads[0] else [eos_id])
    cache = KVCache(cfg, len(heads), device, dtype)
    logits = next_logits(model, [[*h, *text] for h in heads], guidance, cache)
    if torch.isnan(logits).any():  # once per completion: NaN scores come from NaN weights, so from the first token
        raise UserError("the model's next-token scores are NaN: its weights are — use a checkpoint from before the "
                        "run diverged")
    for _ in range(max_new_tokens):
        if banned:
            logits[banned] = -float("inf")
        nxt = pick(logits, text, temperature, top_k, top_p, repetition_penalty, generator)
        if nxt == eos_id:
            return
        yield nxt
        text.append(nxt)
        if cache.length >= cfg.block_size:
            cache = KVCache(cfg, len(heads), device, dtype)
            logits = next_logits(model, [[*h, *text[-(cfg.block_size // 2) :]] for h in heads], guidance, cache)
        else:
            logits = next_logits(model, [[nxt]] * len(heads), guidance, cache)


def next_logits(model: GPT, rows: list[list[int]], guidance: float = 1.0, cache: KVCache | None = None):
    """The next token's logits (fp32) after the first row. With more rows (the other ratings' contexts), its
    log-probabilities move away from the mean of theirs by `guidance`: log p + (guidance − 1)(log p − mean log q),
    classifier-free guidance with the other ratings as the negative prompt."""
    logits = model(torch.tensor(rows, device=model.tok_emb.weight.device), cache=cache)[:, -1].float()
    if len(rows) == 1:
        return logits[0]
    logp = logits.log_softmax(-1)
    return logp[0] + (guidance - 1) * (logp[0] - logp[1:].mean(0))


def pick(logits, seen, temperature, top_k, top_p, repetition_penalty, generator) -> int:
    if repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), device=logits.device)
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
    if temperature <= 0:
        return int(logits.argmax())
    # ≤ 0 and in fp64: a tiny temperature gives −inf or a finite number, never 0/0 or inf − inf
    logits = (logits.double() - logits.max()) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    if top_p and top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        sorted_p[sorted_p.cumsum(0) - sorted_p > top_p] = 0  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def cut_note(total: int, kept: int) -> str:
    return f"the prompt has {total} tokens; the model is given its last {kept} (model.block_size)"


class Completer:
    """A loaded model + tokenizer + decoding settings; completes one prompt at a time. With `control` (a rating's
    control token) the prompt is given as a review of that rating: [end of review, control, prompt…], as the
    conditioned training data has it; with `g.guidance` above 1, also as a review of each other rating (the other
    `banned` control tokens), which the sampled tokens are steered away from (`next_logits`)."""

    def __init__(self, model, tokenizer, g, clean_cfg, control: int | None = None, banned: list[int] | None = None):
        self.model, self.tok, self.g = model, tokenizer, g
        self.stops = as_list(g.stop)
        self.clean_cfg = clean_cfg
        self.banned = banned or []  # the control tokens
        # ids never sampled nor offered as a next token: the control tokens, and rows past the tokenizer's vocabulary
        # (a pretrained model's spare rows: no token decodes from them)
        self.never = [*self.banned, *range(tokenizer.vocab_size, model.cfg.vocab_size)]
        others = [c for c in self.banned if c != control] if g.guidance != 1 else []
        self.heads = [[]] if control is None else [[tokenizer.eos_id, c] for c in (control, *others)]

    def prompt_ids(self, prompt: str | list[int]) -> tuple[list[int], int]:
        """The prompt's token ids as the model is given them — cleaned, and only its last ones when it is longer
        than the context leaves room for — and how many it has in all (callers say it was cut: `cut_note`). A
        prompt of token ids is taken as it is."""
        ids = list(prompt) if isinstance(prompt, list) else self.tok.encode(cleaned(prompt, self.clean_cfg))
        room = self.model.cfg.block_size - 1 - len(self.heads[0])
        return ids[-room:] if len(ids) > room else ids, len(ids)

    def stream(self, prompt: str | list[int], sample: int = 0):
        """Yield pieces of completion text as they are decoded; the last item is a stats dict, which also holds the
        token ids the model was given after its head (`given`) and those it chose (`ids`)."""
        g = self.g
        ids, _ = self.prompt_ids(prompt)
        generator = torch.Generator().manual_seed((int(g.seed) + sample) % 2**63)
        start = time.perf_counter()
        prefix = self.tok.decode(ids)
        text, shown, new, first = "", "", [], None
        for token in sample_tokens(self.model, ids, g.max_new_tokens, self.tok.eos_id, g.temperature, g.top_k, g.top_p,
                               g.repetition_penalty, generator, self.never, self.heads, g.guidance):
            new.append(token)
            first = first or time.perf_counter() - start
            decoded = self.tok.decode(ids + new)[len(prefix) :]  # decode with the prompt: keeps the joining space
            if decoded.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            text = decoded
            stop = min((text.index(s) for s in self.stops if s in text), default=None)
            if stop is not None:
                text = text[:stop]
                break
            # hold back an end that may be the start of a stop string, so none of one is ever shown
            held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            if len(text) - held > len(shown):
                yield text[len(shown) : len(text) - held]
                shown = text[: len(text) - held]
        if len(text) > len(shown):
            yield text[len(shown) :]
        seconds = time.perf_counter() - start
        yield {"completion": text, "prompt_tokens": len(ids), "tokens": len(new), "seconds": round(seconds, 4),
               "first_token_s": round(first or seconds, 4), "tokens_per_s": round(len(new) / seconds, 2) if new else 0.0,
               "given": ids or ([] if self.heads[0] else [self.tok.eos_id]), "ids": new}  # as sample_tokens gives them

    def complete(self, prompt: str, sample: int = 0) -> dict:
        *_, stats = self.stream(prompt, sample)
        return {"prompt": prompt, "sample": sample, **{k: v for k, v in stats.items() if k not in ("given", "ids")}}

    def next_tokens(self, prompt: str, k: int) -> list[tuple[str, float]]:
        """The k most likely next tokens after the prompt as (text, probability), most likely first."""
        ids, _ = self.prompt_ids(prompt)
        with torch.no_grad():
            rows = [[*h, *ids] or [self.tok.eos_id] for h in self.heads]
            logits = next_logits(self.model, rows, self.g.guidance)
        logits[self.never] = -float("inf")
        probs = torch.softmax(logits, -1)
        top = torch.topk(probs, min(k, probs.numel()))
        prefix = self.tok.decode(ids)  # once, not per candidate
        return [(self.token_text(ids, int(i), prefix), float(p)) for p, i in zip(top.values, top.indices)]

    def token_text(self, ids: list[int], i: int, prefix: str | None = None) -> str:
        """The text token i adds after `ids`: decoded with them, so a leading space stays (" 좋은"). EOS is
        END_OF_REVIEW; a token with no text of its own (a control token, one byte of a longer character) is its
        piece, e.g. <0xEC>."""
        if i == self.tok.eos_id:
            return END_OF_REVIEW
        prefix = self.tok.decode(ids) if prefix is None else prefix
        text = self.tok.decode([*ids, i])[len(prefix) :]
        return text if text and not text.endswith("\ufffd") else self.tok.id_to_piece(i)


def cleaned(prompt: str, clean_cfg: Mapping) -> str:
    """The prompt as the model is given it: normalized like the training data (`data.clean` of its checkpoint)."""
    if not isinstance(prompt, str):
        raise UserError(f"a prompt or review must be text (a str), not {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"the prompt is not valid Unicode text ({e.reason} at character {e.start})") from None
    return clean_text(prompt, *clean_options(clean_cfg))


