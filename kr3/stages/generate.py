"""stage=generate: complete reviews from a checkpoint alone — interactive (a prompt, the completion
streamed token by token), one-shot (`generate.prompt`), or a file of prompts to JSONL. KV-cached."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from kr3 import api, hardware, ratings, settings
from kr3.atomic import replacing
from kr3.config import command_overrides, override_key
from kr3.console import progress
from kr3.errors import UserError
from kr3.repl import answer, repl
from kr3.sampling import check_decoding, decoding

log = logging.getLogger(__name__)


def check_generate(g) -> None:
    check_decoding(decoding(g))
    if g.prompt is not None and not g.prompts_file and not str(g.prompt).strip():
        raise UserError('generate.prompt is empty — give the start of a review, e.g. generate.prompt="이 집 짜장면은"')


def run(cfg):
    cfg = settings.typed(cfg)
    g = cfg.generate
    check_generate(g)
    hardware.setup(g.device, g.precision)
    m = api.load(cfg.checkpoint, g.device, g.precision, cfg.paths.log_dir, **decoding(g))
    ratings.control(g.rating, m.checkpoint.condition)  # a bad rating stops before any output
    log.info(f"{m.describe()}; vocabulary {m.tokenizer.vocab_size:,}")
    if g.prompts_file:
        return batch(cfg, m)
    if g.prompt is not None:
        return answer(m, g, str(g.prompt), sys.stdout)
    if not any(override_key(o) == "generate.seed" for o in command_overrides() or []):
        g.seed = None  # the REPL samples afresh each time unless a seed is given (`:seed N` pins one)
    return repl(m, g, sys.stdin, sys.stdout)


def batch(cfg, m: api.Model) -> Path:
    g = cfg.generate
    src = Path(g.prompts_file).expanduser()
    if not src.is_file():
        raise UserError(f"generate.prompts_file={src} {'is a folder' if src.is_dir() else 'does not exist'} — give a "
                        "text file with one prompt per line")
    try:
        prompts = [line.strip() for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{src} is not UTF-8 text — save it as UTF-8") from None
    if not prompts:
        raise UserError(f"{src} has no prompts — write one prompt per line")
    out = Path(g.output) if g.output else Path(cfg.paths.output_dir) / "generations.jsonl"
    with replacing(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for prompt in progress(prompts, desc="generate", unit="prompt"):
            for row in m.completions(prompt, **decoding(g)):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    log.info(f"{len(prompts)} prompts × {g.num_samples} → {out}")
    return out
