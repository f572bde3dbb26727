"""stage=evaluate: loss, perplexity and bits per character of a checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from kr3 import api, classify, hardware, prepared
from kr3 import data as kdata
from kr3.atomic import replacing
from kr3.checkpoint import Checkpoint
from kr3.errors import UserError, check_values
from kr3.tracking import table

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    """Loss, perplexity and bits per character of a checkpoint on a prepared split of the data it was trained
    on, or on any file given with `data=local data.path=...` (cleaned as in training, encoded with the
    checkpoint's tokenizer). Writes eval.json into the run folder."""
    e = cfg.evaluate
    check_values("evaluate", e, {"batch_size": ("int", 1, None, False), "max_tokens": ("int", 1, None, True)})
    hardware.setup(e.device, e.precision)
    m = api.load(cfg.checkpoint, e.device, e.precision, cfg.paths.log_dir)
    options = {"max_tokens": e.max_tokens, "batch_size": e.batch_size, "show_progress": True}
    if cfg.data.source == "local":
        texts, source = file_texts(cfg, m.checkpoint)
        scores = m.score(texts, **options)
    else:
        tokens, source, chars = split_tokens(e.split, m.checkpoint)
        scores = m.score_tokens(tokens, chars, **options) | rating_scores(m, tokens[: e.max_tokens or None], e.batch_size)
    result = {"checkpoint": str(m.path.resolve()), "step": m.checkpoint.step, "source": source, **scores}
    with replacing(Path(cfg.paths.output_dir) / "eval.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    log.info("\n" + table([(k, shown(v)) for k, v in result.items()], "evaluate"))
    return result


def shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else str(value)


def rating_scores(m: api.Model, tokens: np.ndarray, batch_size: int) -> dict:
    """For a checkpoint trained with data.condition=rating: bits per character of each rating's reviews and the
    model's accuracy as a generative classifier (kr3.classify); nothing otherwise."""
    condition = m.checkpoint.data.get("condition")
    if not condition:
        return {}
    controls = prepared.rating_controls(condition)
    reviews = classify.reviews_of(tokens, m.tokenizer.eos_id, controls)
    if not reviews:
        return {}
    # each review is scored in one window after [EOS, control]: a longer one is cut, and only what is scored counts
    texts = [t[: m.model.cfg.block_size - 1] for _, t in reviews]
    # short sequences: 4x the batch keeps about the tokens per forward pass of the windows scored above
    ll = classify.log_likelihoods(m.model, texts, controls, m.tokenizer.eos_id, 4 * batch_size, m.device, m.dtype)
    prior = classify.rating_prior(m.checkpoint.data["splits"], controls)
    chars = np.array([len(m.tokenizer.decode(t)) for t in texts])
    names = {int(r): name for r, name in condition["names"].items()}
    return classify.report(ll, np.array([r for r, _ in reviews]), chars, prior, names)


def file_texts(cfg, ckpt: Checkpoint) -> tuple[list[str], str]:
    """(reviews, source) of `data.path`, cleaned (and filtered) as the checkpoint's training data was."""
    dcfg = OmegaConf.merge(cfg.data, {"clean": ckpt.config["data"]["clean"], "ratings": None})
    corpus = kdata.clean(kdata.load(dcfg), dcfg)
    return corpus.texts, corpus.source


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
