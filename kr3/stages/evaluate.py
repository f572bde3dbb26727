"""stage=evaluate: loss, perplexity and bits per character of a checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from kr3 import checkpoint, hardware, prepared
from kr3 import data as kdata
from kr3.atomic import replacing
from kr3.checkpoint import Checkpoint
from kr3.errors import UserError, check_values
from kr3.scoring import metrics, token_loss
from kr3.tracking import table

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    """Loss, perplexity and bits per character of a checkpoint on a prepared split of the data it was trained
    on, or on any file given with `data=local data.path=...` (cleaned as in training, encoded with the
    checkpoint's tokenizer). Writes eval.json into the run folder."""
    e = cfg.evaluate
    check_values("evaluate", e, {"batch_size": ("int", 1, None, False), "max_tokens": ("int", 1, None, True)})
    dev, dtype = hardware.setup(e.device, e.precision)
    path = checkpoint.locate(cfg.checkpoint, cfg.paths.log_dir)
    model, tok, ckpt = checkpoint.load_model(path, dev)
    tokens, source, chars = file_tokens(cfg, tok, ckpt) if cfg.data.source == "local" else split_tokens(e.split, ckpt)
    n_all = len(tokens)
    if e.max_tokens:
        tokens = tokens[: int(e.max_tokens)]
    nats, n = token_loss(model, tokens, tok.eos_id, model.cfg.block_size, e.batch_size, dev, dtype, show_progress=True)
    result = {"checkpoint": str(path.resolve()), "step": ckpt.step, "source": source, "tokens": n,
              **metrics(nats, n, n_all, chars)}
    with replacing(Path(cfg.paths.output_dir) / "eval.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    log.info("\n" + table([(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items()], "evaluate"))
    return result


def file_tokens(cfg, tok, ckpt: Checkpoint) -> tuple[np.ndarray, str, int]:
    """(tokens, source, characters) of `data.path`, cleaned as the checkpoint's training data was."""
    dcfg = OmegaConf.merge(cfg.data, {"clean": ckpt.config["data"]["clean"], "ratings": None})
    corpus = kdata.clean(kdata.load(dcfg), dcfg)
    ids = tok.encode_batch(corpus.texts)
    tokens = np.fromiter((i for doc in ids for i in (*doc, tok.eos_id)), dtype=np.int64)
    return tokens, corpus.source, sum(map(len, corpus.texts))


def split_tokens(name: str, ckpt: Checkpoint) -> tuple[np.ndarray, str, int]:
    """(tokens, source, characters) of a split of the prepared folder the checkpoint was trained on."""
    split = ckpt.data["splits"].get(name)
    path = Path(ckpt.data["dir"]) / split["file"] if split else None
    if path is None or not path.exists():
        raise UserError(
            f"split {name!r} of {ckpt.data['dir']} is not there — re-run stage=prepare with the training "
            "config, or evaluate a file with data=local data.path=..."
        )
    if prepared.read_meta(path.parent)["fingerprint"] != ckpt.data["fingerprint"]:
        raise UserError(
            f"{path.parent} was prepared again (other data or tokenizer) since this checkpoint was trained on it "
            "— evaluate a file with data=local data.path=..., or prepare the data it was trained on again"
        )
    return np.memmap(path, dtype=np.dtype(ckpt.data["dtype"]), mode="r"), str(path), split["chars"]
