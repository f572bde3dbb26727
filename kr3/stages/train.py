"""stage=train: GPT on the prepared token files, one process or many under torchrun (DDP)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import torch

from kr3 import checkpoint, distributed, hardware, optim, prepared, pretrained, resume, settings, sizing
from kr3.batches import Batches
from kr3.config import command_overrides, override_key, started_as
from kr3.model import GPT, GPTConfig
from kr3.trainer import Trainer, check_rating_loss, check_samples, parse_duration, total_steps

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    distributed.init()
    cfg = settings.typed(cfg)
    t = cfg.trainer
    check_samples(cfg)
    run_dir = Path(cfg.paths.output_dir)
    main = distributed.is_main()
    dev, dtype = hardware.setup(t.device, t.precision, t.threads)
    cfg, found = resume.start(cfg, run_dir, command_overrides())
    check_rating_loss(t, cfg.data)
    if not found:
        sizing.check(cfg.model, t, command_overrides())
    # rank 0 finds (downloads) a pretrained model and prepares (or reuses) the data, the others wait
    with distributed.main_first():
        weights = pretrained.find(cfg.model.name_or_path, cfg.data.cache_dir) if pretrained.named(cfg.model) \
            and not found else None
        data = prepared.PreparedData(prepared.ensure(cfg) if main else prepared.prepared_dir(cfg))
    resumed = resume.check(cfg, *found, run_dir, data.meta) if found else None
    if not found and not weights:
        sizing.resolve(cfg, data.meta["vocab_size"], dev, dtype, parse_duration(t.max_time))
    model, base = build_model(cfg, data, resumed, weights)
    model.to(dev)
    opt = optim.build(model, t, dev)
    batches = Batches(data.dir / data.split("train")["file"], data.meta["dtype"], model.cfg.block_size, t.batch_size,
                      t.grad_accum, cfg.seed, data.meta["eos_id"] if t.packing == "reviews" else None)
    batches.check_one_step()
    total = total_steps(t, batches, resumed)
    if resumed:
        resume.restore(resumed, model, opt, run_dir)
        if resumed.is_finished(total):
            if main:
                log.info(resumed.nothing_to_train(t))
            return resumed.ckpt.val
        if main:
            resume.warn_changes(resumed, total, batches.per_step)
    if main:
        checkpoint.remove_temps(run_dir)
    return Trainer(cfg, model, opt, data, batches, total, dev, dtype, resumed, run_dir, command_line(), base).fit()


def build_model(cfg, data: prepared.PreparedData, resumed: resume.Resumed | None,
                weights: Path | None) -> tuple[GPT, dict | None]:
    """(the model, the pretrained model it starts from, if any): on resume the checkpoint's shape (its weights are put
    back later), with model=pretrained the weights in folder `weights`, else random weights drawn from `seed`."""
    torch.manual_seed(cfg.seed)
    if resumed:
        return GPT(GPTConfig(**resumed.ckpt.model_config)), resumed.ckpt.base
    controls = tuple(data.condition.ids) if data.condition else ()
    if weights:
        return pretrained.load(cfg.model, weights, data.tokenizer, data.meta["vocab_size"], controls)
    return GPT(GPTConfig.from_cfg(cfg.model, data.meta["vocab_size"], controls)), None


def command_line() -> str:
    """This command as it was started (`uv run python run.py`, `kr3`, `torchrun …`) with its overrides, less those
    that continuing it sets."""
    kept = [o for o in command_overrides() or ["stage=train"]
            if override_key(o) not in ("hydra.run.dir", "trainer.resume")]
    return f"{started_as()} {shlex.join(kept)}"
