"""stage=evaluate: loss, perplexity and bits per character of a checkpoint."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from kr3 import api, classify, hardware, prepared, settings
from kr3 import data as kdata
from kr3.atomic import replacing
from kr3.checkpoint import Checkpoint
from kr3.console import table
from kr3.errors import UserError

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    """Loss, perplexity and bits per character of a checkpoint on a prepared split of the data it was trained
    on, or on any file given with `data=local data.path=...` (cleaned as in training, encoded with the
    checkpoint's tokenizer). Writes eval.json into the run folder."""
    cfg = settings.typed(cfg)
    e = cfg.evaluate
    harness = lm_eval_harness() if e.tasks else None  # before any work: a missing extra is said at once
    hardware.setup(e.device, e.precision)
    m = api.load(cfg.checkpoint, e.device, e.precision, cfg.paths.log_dir)
    log.info(m.describe())
    options = {"max_tokens": e.max_tokens, "batch_size": e.batch_size, "show_progress": True}
    if cfg.data.source == "local":
        texts, source = file_texts(cfg, m.checkpoint)
        scores = m.score(texts, **options)
    else:
        tokens, path, chars = prepared.trained_split(m.checkpoint.data, e.split)
        source = str(path)
        scores = m.score_tokens(tokens, chars, **options) | classify.rating_scores(m, tokens[: e.max_tokens or None],
                                                                                   e.batch_size)
    result = {"checkpoint": str(m.path.resolve()), "step": m.checkpoint.step, "source": source,
              **({"base_model": m.base["name_or_path"]} if m.base else {}), **scores}
    if harness:
        result["tasks"] = harness.evaluate(m, list(e.tasks), e.include_path, e.limit, e.batch_size,
                                           Path(cfg.paths.output_dir) / "lm_eval.json")
    with replacing(Path(cfg.paths.output_dir) / "eval.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    log.info("\n" + table([(k, shown(v)) for k, v in result.items()], "evaluate"))
    return result


def lm_eval_harness():
    """kr3.harness (lm-eval's tasks on a checkpoint: their results in lm_eval.json beside eval.json), or the line that
    says how to install lm-eval."""
    try:
        from kr3 import harness
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise UserError("evaluate.tasks needs lm-eval — pip install 'kr3[eval]' (uv sync installs it)") from None
    return harness


def shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else str(value)


def file_texts(cfg, ckpt: Checkpoint) -> tuple[list[str], str]:
    """(reviews, source) of `data.path`, cleaned (and filtered) as the checkpoint's training data was."""
    dcfg = replace(cfg.data, clean=settings.saved_block(cfg.data.clean, ckpt.config["data"]["clean"]), ratings=None)
    corpus = kdata.clean(kdata.load(dcfg), dcfg)
    return corpus.texts, corpus.source
