"""stage=generate: complete reviews from a checkpoint alone — interactive (a prompt, the completion
streamed token by token), one-shot (`generate.prompt`), or a file of prompts to JSONL. KV-cached."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from kr3 import checkpoint, hardware
from kr3.atomic import replacing
from kr3.errors import UserError, check_values
from kr3.sampling import Completer, stop_strings
from kr3.tracking import progress

log = logging.getLogger(__name__)
EXIT_WORDS = {"exit", "quit"}


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


def run(cfg):
    g = cfg.generate
    check_generate(g)
    dev, dtype = hardware.setup(g.device, g.precision)
    model, tok, ckpt = checkpoint.load_model(cfg.checkpoint, dev, dtype, log_dir=cfg.paths.log_dir)
    completer = Completer(model, tok, g, ckpt.config["data"]["clean"])
    log.info(f"model: step {ckpt.step}, {model.num_params() / 1e6:.2f}M parameters, {dev}, "
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
