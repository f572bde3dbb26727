"""stage=generate: complete reviews from a checkpoint alone — interactive (a prompt, the completion
streamed token by token), one-shot (`generate.prompt`), or a file of prompts to JSONL. KV-cached."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kr3 import checkpoint, hardware
from kr3.atomic import replacing
from kr3.data import clean_text
from kr3.errors import UserError, check_values
from kr3.model import GPT, KVCache
from kr3.tracking import progress

log = logging.getLogger(__name__)
EXIT_WORDS = {"exit", "quit"}


@torch.no_grad()
def sample_tokens(model: GPT, prompt_ids: list[int], max_new_tokens: int, eos_id: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                  generator: torch.Generator | None = None):
    """Yield new token ids one at a time, stopping at EOS or `max_new_tokens`. The prompt is left-truncated
    to leave room in the context; temperature 0 is greedy. When the context fills up, the cache restarts
    on the most recent half-context."""
    cfg = model.cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    room = cfg.block_size - 1
    ids = list(prompt_ids)[-room:] or [eos_id]
    cache = KVCache(cfg, 1, device, dtype)
    logits = model(torch.tensor([ids], device=device), cache=cache)[0, -1]
    seen = list(ids)
    for _ in range(max_new_tokens):
        nxt = pick(logits.float(), seen, temperature, top_k, top_p, repetition_penalty, generator)
        if nxt == eos_id:
            return
        yield nxt
        seen.append(nxt)
        if cache.length >= cfg.block_size:
            cache = KVCache(cfg, 1, device, dtype)
            logits = model(torch.tensor([seen[-(cfg.block_size // 2) :]], device=device), cache=cache)[0, -1]
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
        sorted_p[sorted_p.cumsum(0) - sorted_p > top_p] = 0  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class Completer:
    """A loaded model + tokenizer + decoding settings; completes one prompt at a time."""

    def __init__(self, model, tokenizer, g, clean_cfg):
        self.model, self.tok, self.g = model, tokenizer, g
        self.stops = stop_strings(g)
        self.clean = (bool(clean_cfg.get("nfc", True)), bool(clean_cfg.get("strip_control", True)),
                      bool(clean_cfg.get("collapse_whitespace", True)))

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tok.encode(clean_text(prompt, *self.clean))  # the same normalization as the training data
        room = self.model.cfg.block_size - 1
        if len(ids) > room:
            log.warning(f"the prompt has {len(ids)} tokens; keeping its last {room} (model.block_size)")
            ids = ids[-room:]
        return ids

    def stream(self, prompt: str, sample: int = 0):
        """Yield pieces of completion text as they are decoded; the last item is a stats dict."""
        g = self.g
        ids = self.encode_prompt(prompt)
        generator = torch.Generator().manual_seed(int(g.seed) + sample)
        start = time.perf_counter()
        prefix = self.tok.decode(ids)
        text, shown, new, first = "", "", [], None
        for t in sample_tokens(self.model, ids, g.max_new_tokens, self.tok.eos_id, g.temperature, g.top_k, g.top_p,
                               g.repetition_penalty, generator):
            new.append(t)
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
        yield {"completion": text, "tokens": len(new), "seconds": round(seconds, 4),
               "first_token_s": round(first or seconds, 4), "tokens_per_s": round(len(new) / seconds, 2) if new else 0.0}

    def complete(self, prompt: str, sample: int = 0) -> dict:
        *_, stats = self.stream(prompt, sample)
        return {"prompt": prompt, "sample": sample, **stats}

    def next_tokens(self, prompt: str, k: int) -> list[tuple[str, float]]:
        ids = self.encode_prompt(prompt) or [self.tok.eos_id]
        with torch.no_grad():
            logits = self.model(torch.tensor([ids], device=next(self.model.parameters()).device))[0, -1].float()
        probs = torch.softmax(logits, -1)
        top = torch.topk(probs, min(k, probs.numel()))
        return [(self.tok.id_to_piece(int(i)), float(p)) for p, i in zip(top.values, top.indices)]


def check_generate(g) -> None:
    check_values("generate", g, {
        "max_new_tokens": ("int", 1, None, False), "num_samples": ("int", 1, None, False),
        "temperature": ("number", 0, None, False), "top_k": ("int", 0, None, True),
        "top_p": ("number", ("above", 0), 1, True), "repetition_penalty": ("number", ("above", 0), None, False),
        "show_next": ("int", 0, None, True), "seed": ("int", 0, None, False),
    })
    if not all(isinstance(s, str) and s for s in stop_strings(g)):
        raise UserError(f"generate.stop={g.stop} must be non-empty strings, e.g. generate.stop='[\"!\",\"다\"]'")
    if g.prompt is not None and not g.prompts_file and not str(g.prompt).strip():
        raise UserError('generate.prompt is empty — give the start of a review, e.g. generate.prompt="이 집 짜장면은"')


def stop_strings(g) -> list:
    """generate.stop as a list: one string is one stop string (not its characters)."""
    if g.stop is None:
        return []
    return list(g.stop) if OmegaConf.is_list(g.stop) or isinstance(g.stop, list) else [g.stop]


def run(cfg):
    g = cfg.generate
    check_generate(g)
    dev = hardware.resolve_device(g.device)
    dtype = hardware.resolve_precision(g.precision, dev)
    model, tok, state = checkpoint.load_model(cfg.checkpoint, dev, dtype, log_dir=cfg.paths.log_dir)
    completer = Completer(model, tok, g, state["config"]["data"]["clean"])
    log.info(f"model: step {state['step']}, {model.num_params() / 1e6:.2f}M parameters, {dev}, "
             f"{str(dtype).replace('torch.', '')}; vocabulary {tok.vocab_size:,}")
    if g.prompts_file:
        return batch(cfg, completer)
    if g.prompt is not None:
        return answer(completer, str(g.prompt), sys.stdout)
    return repl(completer, sys.stdin, sys.stdout)


def answer(completer: Completer, prompt: str, out) -> None:
    g = completer.g
    if g.show_next:
        for piece, p in completer.next_tokens(prompt, int(g.show_next)):
            out.write(f"  {p:6.1%}  {piece}\n")
    for sample in range(int(g.num_samples)):
        out.write(prompt)
        for piece in completer.stream(prompt, sample):
            if isinstance(piece, str):
                out.write(piece)
                out.flush()
        out.write("\n")
        out.flush()


def repl(completer: Completer, stdin, out) -> None:
    """Read prompts until `exit`/`quit`, end of input (Ctrl-D) or Ctrl-C. Works on a terminal and on a pipe."""
    interactive = stdin.isatty()
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 gets a message, not a traceback
    if interactive:
        out.write("Type the start of a review; `exit` or Ctrl-D quits.\n")
    try:
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = stdin.readline()
            if not line:
                break
            prompt = line.strip()
            if not prompt:
                continue
            try:
                prompt.encode("utf-8")  # undecodable input bytes arrive as surrogates
            except UnicodeEncodeError:
                out.write("(that line is not UTF-8 text: set your terminal to UTF-8)\n")
                continue
            if prompt.lower() in EXIT_WORDS:
                break
            answer(completer, prompt, out)
    except KeyboardInterrupt:
        out.write("\n")


def batch(cfg, completer: Completer) -> Path:
    g = cfg.generate
    src = Path(g.prompts_file).expanduser()
    if not src.is_file():
        raise UserError(f"generate.prompts_file={src} does not exist — give a text file with one prompt per line")
    try:
        prompts = [line.strip() for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{src} is not UTF-8 text — save it as UTF-8") from None
    if not prompts:
        raise UserError(f"{src} has no prompts — write one prompt per line")
    out = Path(g.output) if g.output else Path(cfg.paths.output_dir) / "generations.jsonl"
    with replacing(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for prompt in progress(prompts, desc="generate", unit="prompt"):
            for sample in range(int(g.num_samples)):
                f.write(json.dumps(completer.complete(prompt, sample), ensure_ascii=False) + "\n")
    log.info(f"{len(prompts)} prompts × {g.num_samples} → {out}")
    return out
