"""Resuming a run exactly: which checkpoint `trainer.resume` means, whether it fits this run, and putting its
weights, optimizer moments, step and RNG states back."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kr3 import checkpoint, distributed, settings
from kr3.checkpoint import Checkpoint
from kr3.config import override_key, within
from kr3.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    path: Path
    ckpt: Checkpoint
    in_place: bool  # in the checkpoint's own run folder: one folder, one history, one W&B run

    @property
    def step(self) -> int:
        return self.ckpt.step

    def is_finished(self, total_steps: int) -> bool:
        """It holds its run's final evaluation, and this run would train no further."""
        if self.ckpt.early_stopped is not None and self.ckpt.val is not None:
            return True  # trainer.early_stop ended it
        finished = self.ckpt.val is not None and self.step >= self.ckpt.scheduler.total_steps
        if not finished and self.step > total_steps:
            raise UserError(f"checkpoint {self.path} is at step {self.step}, past this run's {total_steps} steps — "
                            "raise trainer.max_steps (or trainer.epochs)")
        return finished and self.step >= total_steps

    def nothing_to_train(self, t) -> str:
        """What a finished run says when resumed without more steps (`t`: the trainer config)."""
        if self.ckpt.early_stopped is not None:
            return (f"{self.path} was ended by trainer.early_stop at step {self.step} (val loss "
                    f"{self.ckpt.val['loss']:.4f}, bpc {self.ckpt.val['bpc']:.4f}): nothing to train — start a new run "
                    "to train further")
        more = ("drop trainer.max_time (a resumed run keeps the steps it chose) and raise trainer.max_steps"
                if t.max_time else "raise trainer.max_steps (or trainer.epochs)")
        return (f"{self.path} finished at step {self.step} (val loss {self.ckpt.val['loss']:.4f}, bpc "
                f"{self.ckpt.val['bpc']:.4f}): nothing to train — {more} to go on")


def find(resume: str | None, run_dir: Path) -> Path | None:
    """trainer.resume: null (train anew), `auto` (this run folder's newest checkpoint, else its best.pt — a run
    killed between its first evaluation and its first step checkpoint — if any) or a path."""
    if not resume:
        return None
    if resume == "auto":
        return checkpoint.newest(run_dir)
    return checkpoint.resolve(resume)


def refuse_other_run(run_dir: Path) -> None:
    """A run trained anew in a folder that holds another run's checkpoints would replace its best.pt and mix its
    own with them (a later resume=auto would pick the other run's newest)."""
    held = [p.name for p in (*checkpoint.list_steps(run_dir), checkpoint.best_path(run_dir))
            if p.exists()]
    if held:
        raise UserError(f"{run_dir} already holds a run's checkpoints ({', '.join(held)}) — continue it with "
                        "trainer.resume=auto, or train anew in another folder (hydra.run.dir=..., in a sweep "
                        "hydra.sweep.dir=...)")


# what shapes the prepared data: taken from the checkpoint on resume unless the command gives one of them
DATA_KEYS = ("data", "tokenizer", "seed", "paths.data_dir")


def with_checkpoint_data(cfg, ckpt: Checkpoint, given: list[str] | None):
    """`cfg` with the checkpoint's data, tokenizer, seed and data folder, so that `trainer.resume=...` needs no
    data settings repeated. If the command gives any of them (`given`: its overrides; None: not known, as for a
    config built in Python), `cfg` is kept as it is: the fingerprint check then accepts it or refuses it."""
    def sets(override: str) -> bool:
        return any(within(override_key(override), k) for k in DATA_KEYS)

    if given is None or any(map(sets, given)):
        return cfg
    saved = ckpt.config
    data_dir = saved.get("paths", {}).get("data_dir", cfg.paths.data_dir)
    return replace(cfg, data=settings.saved_block(cfg.data, saved["data"]), seed=saved["seed"],
                   tokenizer=settings.saved_block(cfg.tokenizer, saved["tokenizer"]),
                   paths=replace(cfg.paths, data_dir=data_dir))


def load(cfg, run_dir: Path) -> tuple[Path, Checkpoint] | None:
    """The checkpoint `trainer.resume` names, read with everything resuming needs."""
    path = find(cfg.trainer.resume, run_dir)
    return (path, checkpoint.load(path, resume=True)) if path else None


def start(cfg, run_dir: Path, given: list[str] | None) -> tuple:
    """(the run's config, the checkpoint `trainer.resume` names as (path, Checkpoint) or None): resuming takes the
    checkpoint's data settings unless the command `given` sets some; a new run refuses a folder holding another's."""
    found = load(cfg, run_dir)
    if found:
        return with_checkpoint_data(cfg, found[1], given), found
    refuse_other_run(run_dir)
    return cfg, None


def check(cfg, path: Path, ckpt: Checkpoint, run_dir: Path, meta: dict) -> Resumed:
    """The checkpoint as a Resumed, refused when trained on other prepared data than `meta`'s."""
    if ckpt.data.fingerprint != meta["fingerprint"]:
        raise UserError(
            f"checkpoint {path} was trained on other data or another tokenizer ({ckpt.data.name}, vocab "
            f"{ckpt.model_config['vocab_size']}) than {meta['name']} (vocab {meta['vocab_size']}) "
            "— leave the data and tokenizer settings out (resuming takes the checkpoint's) or give those it was trained with"
        )
    derived = settings.DEPTH_SETS if getattr(cfg.model, "depth", None) is not None else ()  # model.depth's, not given
    given = {k: getattr(cfg.model, k) for k in ckpt.model_config
             if getattr(cfg.model, k, None) is not None and k not in derived}
    ignored = [f"model.{k}={v} (checkpoint: {ckpt.model_config[k]})" for k, v in given.items()
               if v != ckpt.model_config[k]]  # null: the model's own
    if ignored and distributed.is_main():
        log.warning(f"resuming keeps the checkpoint's model; ignored: {', '.join(ignored)}")
    return Resumed(path, ckpt, in_place=checkpoint.run_folder(path.resolve()) == Path(run_dir).resolve())


def restore(resumed: Resumed, model, opt, run_dir: Path) -> None:
    """Weights and optimizer state back into `model` and `opt` (the optimizer's settings stay this run's)."""
    model.load_state_dict(resumed.ckpt.model)
    if len(resumed.ckpt.optimizer["param_groups"]) != len(opt.param_groups):
        raise UserError(f"checkpoint {resumed.path} holds optimizer state of other parameter groups (another "
                        "trainer.optimizer, or an older kr3) — resume with the trainer.optimizer it was trained "
                        "with; it still works with stage=generate/evaluate")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(resumed.ckpt.optimizer)  # moments and step counts; settings (lr_scale too) are this run's
    for group, own in zip(opt.param_groups, settings):
        group.update(own)
    newer = [p.name for p in checkpoint.list_steps(run_dir) if checkpoint.step_of(p) > resumed.step]
    if newer:
        raise UserError(f"{run_dir} already holds checkpoints after step {resumed.step} ({', '.join(newer)}): resuming "
                        "here would mix two histories — resume from the newest (trainer.resume=auto) or into a new "
                        "run folder (hydra.run.dir=...)")


def warn_changes(resumed: Resumed, total_steps: int, windows_per_step: int) -> None:
    if resumed.ckpt.data.position["windows_per_step"] != windows_per_step:
        log.warning("the global batch changed since the checkpoint: the data order after it will differ")
    if resumed.ckpt.scheduler.total_steps != total_steps:
        log.warning(f"the schedule now ends at step {total_steps}, not {resumed.ckpt.scheduler.total_steps}: "
                    f"from step {resumed.step} the learning rate follows the cosine to step {total_steps}")
    log.info(f"resumed from {resumed.path} at step {resumed.step}")


def rng_state() -> dict:
    # the only randomness in a step is torch's (dropout); the data order is a function of seed and epoch
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
