"""Completing text with a GPT: a prompt cleaned and cut to fit, its completion as pieces of text as the tokens come
(kr3.decoder picks and decodes them), stop strings, and the K most likely next tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import fields

import torch

from kr3.config import as_list
from kr3.data import clean_options, clean_text
from kr3.decoder import Sampler, alone, guided
from kr3.errors import UserError
from kr3.model import GPT
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


def sample_tokens(model: GPT, prompt_ids: list[int], max_new_tokens: int, eos_id: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                  generator: torch.Generator | None = None, banned: list[int] | None = None,
                  heads: list[list[int]] = ((),), guidance: float = 1.0, min_new_tokens: int = 0) -> Iterator[int]:
    """Yield new token ids one at a time, stopping at EOS or `max_new_tokens`: a kr3.decoder.Sampler (which says what
    each argument does) decoded alone."""
    s = Sampler(prompt_ids, max_new_tokens, eos_id, model.cfg.block_size, temperature, top_k, top_p,
                repetition_penalty, generator, banned or (), heads, guidance, min_new_tokens)
    shown = 0
    for _ in alone(model, s):
        yield from s.new[shown:]
        shown = len(s.new)


class Generation(Sampler):
    """A completion of text being decoded: a kr3.decoder.Sampler whose tokens become pieces of text — decoded with the
    prompt, so a joining space stays; half of a multi-byte character waits for the rest; an end that may be the start
    of a stop string is held back, so no piece of one is ever shown — and at its end, its stats. `taken()` gives what
    it made since the last call."""

    def __init__(self, completer: Completer, prompt: str | list[int], sample: int):
        g, self.tok = completer.g, completer.tok
        ids, _ = completer.prompt_ids(prompt)
        generator = torch.Generator().manual_seed((int(g.seed) + sample) % 2**63)
        super().__init__(ids, g.max_new_tokens, self.tok.eos_id, completer.model.cfg.block_size, g.temperature, g.top_k,
                         g.top_p, g.repetition_penalty, generator, completer.never, completer.heads, g.guidance,
                         g.min_new_tokens)
        self.ids, self.stops, self.prefix = ids, completer.stops, self.tok.decode(ids)
        self.completion, self.shown, self.items = "", "", []
        self.start, self.first = time.perf_counter(), None

    def took(self, token: int) -> None:
        self.first = self.first or time.perf_counter() - self.start
        decoded = self.tok.decode(self.ids + self.new)[len(self.prefix) :]
        if decoded.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        self.completion = decoded
        stop = min((decoded.index(s) for s in self.stops if s in decoded), default=None)
        if stop is not None:
            self.completion = decoded[:stop]
            return self.end()
        held = max((k for s in self.stops for k in range(1, len(s)) if decoded.endswith(s[:k])), default=0)
        self.show(len(decoded) - held)

    def show(self, upto: int) -> None:
        if upto > len(self.shown):
            self.items.append(self.completion[len(self.shown) : upto])
            self.shown = self.completion[:upto]

    def end(self) -> None:
        if self.done:
            return
        super().end()
        if self.failed is None:
            self.show(len(self.completion))
            self.items.append(self.stats())

    def stats(self) -> dict:
        """{completion, prompt_tokens (as the model was given them: cleaned, cut to fit), tokens, seconds,
        first_token_s, tokens_per_s, given (the prompt's ids after the head, as the model was given them), ids (the
        completion's)}."""
        seconds, n = time.perf_counter() - self.start, len(self.new)
        return {"completion": self.completion, "prompt_tokens": len(self.ids), "tokens": n,
                "seconds": round(seconds, 4), "first_token_s": round(self.first or seconds, 4),
                "tokens_per_s": round(n / seconds, 2) if n else 0.0, "given": self.given, "ids": self.new}

    def taken(self) -> list[str | dict]:
        items, self.items = self.items, []
        return items


def cut_note(total: int, kept: int) -> str:
    return f"the prompt has {total} tokens; the model is given its last {kept} (model.block_size)"


class Completer:
    """A loaded model + tokenizer + decoding settings; completes one prompt at a time. With `control` (a rating's
    control token) the prompt is given as a review of that rating: [end of review, control, prompt…], as the
    conditioned training data has it; with `g.guidance` above 1, also as a review of each other rating (the other
    `banned` control tokens), which the sampled tokens are steered away from (kr3.decoder.guided)."""

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

    def generation(self, prompt: str | list[int], sample: int = 0) -> Generation:
        """The completion of `prompt` to decode (sample i: seed + i), alone (`stream`) or in a kr3.decoder.Batch."""
        return Generation(self, prompt, sample)

    def stream(self, prompt: str | list[int], sample: int = 0) -> Iterator[str | dict]:
        """Yield pieces of completion text as they are decoded; the last item is its stats (Generation.stats)."""
        g = self.generation(prompt, sample)
        for _ in alone(self.model, g):
            yield from g.taken()

    def complete(self, prompt: str, sample: int = 0) -> dict:
        *_, stats = self.stream(prompt, sample)
        return {"prompt": prompt, "sample": sample, **{k: v for k, v in stats.items() if k not in ("given", "ids")}}

    def next_tokens(self, prompt: str, k: int) -> list[tuple[str, float]]:
        """The k most likely next tokens after the prompt as (text, probability), most likely first."""
        ids, _ = self.prompt_ids(prompt)
        with torch.no_grad():
            rows = [[*h, *ids] or [self.tok.eos_id] for h in self.heads]
            ids_rows = torch.tensor(rows, device=self.model.tok_emb.weight.device)
            logits = guided(self.model(ids_rows)[:, -1].float(), self.g.guidance)
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


