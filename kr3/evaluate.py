"""Loss, perplexity and bits per character of a model over a token stream."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from kr3 import checkpoint, distributed, hardware, prepare
from kr3 import data as kdata
from kr3.atomic import replacing
from kr3.errors import UserError, check_values
from kr3.tracking import progress, table

log = logging.getLogger(__name__)


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


def metrics(nats: float, n_tokens: int, split_tokens: int, split_chars: int) -> dict:
    """loss (nats/token), perplexity, and bits per character = loss × tokens / characters / ln 2,
    with the split's token and character counts from meta.json (exact when the whole split is scored)."""
    loss = nats / max(1, n_tokens)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bpc": loss * split_tokens / split_chars / math.log(2)}


def run(cfg) -> dict:
    """stage=evaluate: loss, perplexity and bits per character of a checkpoint on a prepared split of the
    data it was trained on, or on any file given with `data=local data.path=...` (cleaned as in training,
    encoded with the checkpoint's tokenizer). Writes eval.json into the run folder."""
    e = cfg.evaluate
    check_values("evaluate", e, {"batch_size": ("int", 1, None, False), "max_tokens": ("int", 1, None, True)})
    dev = hardware.resolve_device(e.device)
    dtype = hardware.resolve_precision(e.precision, dev)
    if dev.type == "cpu":
        hardware.keep_freed_memory()
    model, tok, state = checkpoint.load_model(cfg.checkpoint, dev, log_dir=cfg.paths.log_dir)
    if cfg.data.source == "local":
        dcfg = OmegaConf.merge(cfg.data, {"clean": state["config"]["data"]["clean"], "ratings": None})
        corpus = kdata.clean(kdata.load(dcfg), dcfg)
        ids = tok.encode_batch(corpus.texts)
        tokens = np.fromiter((t for doc in ids for t in (*doc, tok.eos_id)), dtype=np.int64)
        source, chars = corpus.source, sum(map(len, corpus.texts))
    else:
        split = state["data"]["splits"].get(e.split)
        path = Path(state["data"]["dir"]) / split["file"] if split else None
        if path is None or not path.exists():
            raise UserError(
                f"split {e.split!r} of {state['data']['dir']} is not there — re-run stage=prepare with the training "
                "config, or evaluate a file with data=local data.path=..."
            )
        if prepare.read_meta(path.parent)["fingerprint"] != state["data"]["fingerprint"]:
            raise UserError(
                f"{path.parent} was prepared again (other data or tokenizer) since this checkpoint was trained on it "
                "— evaluate a file with data=local data.path=..., or prepare the data it was trained on again"
            )
        tokens = np.memmap(path, dtype=np.dtype(state["data"]["dtype"]), mode="r")
        source, chars = str(path), split["chars"]
    n_all = len(tokens)
    if e.max_tokens:
        tokens = tokens[: int(e.max_tokens)]
    nats, n = token_loss(model, tokens, tok.eos_id, model.cfg.block_size, e.batch_size, dev, dtype, show_progress=True)
    result = {"checkpoint": str(cfg.checkpoint), "step": state["step"], "source": source, "tokens": n,
              **metrics(nats, n, n_all, chars)}
    with replacing(Path(cfg.paths.output_dir) / "eval.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    log.info("\n" + table([(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items()], "evaluate"))
    return result
