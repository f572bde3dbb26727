"""stage=export: a checkpoint as a Hugging Face transformers folder — GPT2LMHeadModel or LlamaForCausalLM weights (by
model.arch), its tokenizer, the decoding defaults and a model card — that AutoModelForCausalLM, AutoTokenizer and
pipeline() load offline."""

from __future__ import annotations

import logging
from pathlib import Path

from kr3 import api, checkpoint, export, settings
from kr3.sampling import decoding

log = logging.getLogger(__name__)


def run(cfg) -> Path:
    """Write `export.dir` (default: `<the checkpoint's run>/hf`); generation_config.json takes the `generate.*`
    decoding settings of this command."""
    cfg = settings.typed(cfg)
    export.require_hf()
    m = api.load(cfg.checkpoint, "cpu", "fp32", cfg.paths.log_dir, **decoding(cfg.generate))
    out = Path(cfg.export.dir).expanduser() if cfg.export.dir else checkpoint.run_folder(m.path.resolve()) / "hf"
    export.save(m, out, cfg.export.license)
    log.info(f"{m.path} (step {m.checkpoint.step}) → {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) or "
             f"pipeline('text-generation', model={str(out)!r}) loads it; `hf upload USER/NAME {out}` publishes it")
    return out
