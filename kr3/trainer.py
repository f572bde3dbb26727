"""The training loop, nanoGPT-style: step, log, evaluate, checkpoint. One `Trainer` holds the run's state
(step, best val loss, the logging window) as attributes; each concern is a small method."""

from __future__ import annotations

import logging
import math
import re
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from kr3 import checkpoint, distributed, hardware, pretrained, rating_loss, ratings, resume, sampling, scoring, settings
from kr3 import tokenizer as ktok
from kr3.batches import Batches
from kr3.checkpoint import Checkpoint, DataRecord, Schedule, TokenizerRecord
from kr3.config import as_list
from kr3.console import logs_above_bars, progress, table
from kr3.errors import Diverged, UserError
from kr3.prepared import PreparedData
from kr3.profiling import StepProfiler
from kr3.tracking import RESULT, Tracker, stamp_process, write_result

log = logging.getLogger(__name__)


def check_samples(cfg) -> None:
    """trainer.sample_prompts and the `generate:` settings they are decoded with, before any work: a bad one would
    otherwise stop the run at its first evaluation."""
    prompts = sample_prompts(cfg.trainer.sample_prompts)
    for p in prompts:
        try:
            sampling.cleaned(p, cfg.data.clean)
        except UserError as e:
            raise UserError(f"trainer.sample_prompts: {e}") from None
    if prompts:
        sampling.check_decoding(sampling.decoding(cfg.generate))


def check_rating_loss(t, data_cfg) -> None:
    if t.rating_loss and data_cfg.condition != "rating":
        raise UserError(f"trainer.rating_loss={t.rating_loss} trains the model as a rating classifier: it needs "
                        "data.condition=rating (e.g. experiment=cpu_15min_rating)")


def lr_at(step: int, total: int, t) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio × lr."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    done = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


CALIBRATION_STEPS = 20  # steps before trainer.max_time fixes max_steps: at most warmup_steps, at least 2 (the first is not timed)


def parse_duration(value) -> float | None:
    """trainer.max_time in seconds: a number of seconds, or a number with s, m or h (90s, 15m, 2h)."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(value))
    if not match or float(match[1]) <= 0:
        raise UserError(f"trainer.max_time={value} is not a duration — e.g. trainer.max_time=15m, 2h or 90s")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def total_steps(t, batches: Batches, resumed: resume.Resumed | None = None) -> int:
    """The schedule's last step: max_steps, else epochs. Under max_time this is provisional (the run fixes it
    after timing its first steps), except on resume, which keeps the one the run chose."""
    if t.max_time and resumed and resumed.ckpt.scheduler.max_time:
        return int(resumed.ckpt.scheduler.total_steps)
    return int(t.max_steps) if t.max_steps else int(t.epochs * batches.steps_per_epoch)


def scoring_seconds(tokens: int, train_tokens_per_s: float) -> float:
    """Time to score `tokens` at a training speed: a forward pass only, about a third of a step's work per token."""
    return tokens / (3 * train_tokens_per_s)


def eval_sizes(t, n_val: int, block_size: int) -> tuple[int, int]:
    """(share, final): periodic evaluations score the same whole windows at val's start, so their losses
    compare (best.pt); the final one scores them again as the start of its pass, then the rest."""
    final = min(n_val, int(t.final_eval_tokens)) if t.final_eval_tokens else n_val
    share = min(final, -(-int(t.eval_tokens) // block_size) * block_size) if t.eval_tokens else final
    return share, final


def work_passes(model, ratings: int, t) -> float:
    """The model's work per trained token, in whole passes: the rating loss runs some rows again through the
    blocks, once per other rating; the head at their scored reviews is left out (a lower bound: MFU reads low,
    max_time's evaluation estimate is generous)."""
    if not t.rating_loss:
        return 1.0
    blocks = 1 - 6 * model.head.weight.numel() / model.flops_per_token()
    return 1 + (ratings - 1) * t.rating_loss_rows * blocks


def sample_prompts(prompts) -> list:
    """trainer.sample_prompts as a list (one may be given as a string)."""
    if prompts is not None and not isinstance(prompts, str | list | tuple):
        raise UserError(f"trainer.sample_prompts={prompts} must be a list of prompts, e.g. "
                        "trainer.sample_prompts=\"['분위기가 좋고']\", or null")
    return as_list(prompts)


class Interrupts:
    """Ctrl-C and SIGTERM (how torchrun and schedulers stop a job) raise KeyboardInterrupt, so the trainer
    saves where it is; never inside `update()`, since a checkpoint of a half-applied optimizer step would
    not resume exactly: the signal waits for its end. `ignore()` while saving on the way out: `uv run` and
    torchrun forward a second signal, which must not kill the save."""

    def __init__(self):
        self.in_update = self.pending = False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if not self.in_update:
            raise KeyboardInterrupt
        self.pending = True

    @contextmanager
    def update(self):
        self.in_update = True
        try:
            yield
        finally:
            self.in_update = False
        if self.pending:
            raise KeyboardInterrupt

    def ignore(self):
        for s in self.previous:
            signal.signal(s, signal.SIG_IGN)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Trainer:
    def __init__(self, cfg, model, opt, data: PreparedData, batches: Batches, total: int, device, dtype,
                 resumed: resume.Resumed | None, run_dir: Path, command: str, base: dict | None = None):
        """`command`: how this run was started, for the line that says how to continue it; `base`: the pretrained
        model the weights started from (kr3.pretrained.provenance), kept in every checkpoint."""
        self.cfg, self.t = cfg, cfg.trainer
        self.model, self.opt, self.data, self.batches = model, opt, data, batches
        self.total, self.device, self.dtype, self.run_dir = total, device, dtype, Path(run_dir)
        self.main = distributed.is_main()
        self.command, self.base = command, base
        self.step = resumed.step if resumed else 0
        self.val_tokens = data.tokens("val")
        self.share_n, self.final_n = eval_sizes(self.t, len(self.val_tokens), model.cfg.block_size)
        # the checkpoint's best counts only if measured on the same val tokens
        same = resumed is not None and resumed.ckpt.best_val_tokens == self.share_n
        self.best = resumed.ckpt.best_val_loss if same else float("inf")
        self.stale = resumed.ckpt.stale_evals if same else 0  # evaluations without an improvement (early_stop)
        self.early_stopped = None  # the step at which early_stop ended the run
        in_place = resumed is not None and resumed.in_place
        self.tracker = Tracker(cfg, run_dir, enabled=self.main, resume_id=resumed.ckpt.wandb_run_id if in_place else None,
                               history_until=resumed.step if in_place else None)
        # buffers (the control ids) never change: no broadcast before each forward
        self.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False) \
            if distributed.is_distributed() else None
        self.forward = torch.compile(self.ddp or model) if self.t.compile else self.ddp or model
        self.tokenizer = data.tokenizer
        self.sample_prompts = sample_prompts(self.t.sample_prompts)  # checked by check_samples
        self.condition = data.condition
        self.controls = self.condition.ids if self.condition else []  # never sampled as text
        if self.t.rating_loss:
            self._set_up_rating_loss(self.condition)
        self.passes = work_passes(model, len(self.controls), self.t)
        self.tokens_per_step = batches.per_step * model.cfg.block_size
        self.peak = hardware.peak_flops(device, dtype, self.t.peak_flops)
        self.tokens_per_s = None  # of the latest logged window
        self.budget_s = parse_duration(self.t.max_time) if not (resumed and resumed.ckpt.scheduler.max_time) else None
        self.calibrated_at = self.step + max(2, min(CALIBRATION_STEPS, self.t.warmup_steps))
        self.first_step = self.first_step_done = None  # when this process finished its first step
        self.profiler = StepProfiler(self.t.profile, self.run_dir / "profile", enabled=self.main)
        self.wall_before = resumed.ckpt.wall_s if resumed else 0.0  # the parts of the run before this one
        if resumed:
            resume.set_rng_state(resumed.ckpt.rng)  # last: measuring the peak above draws random numbers

    def _set_up_rating_loss(self, condition: ratings.Condition) -> None:
        """The control ids in rating order, as the rating loss scores them (on the host, where it finds the reviews),
        and log P(r) on the device."""
        self.rating_control_ids = torch.tensor(condition.ids)
        prior = condition.prior(self.data.meta["splits"])
        self.log_prior = torch.tensor(prior, dtype=torch.float32, device=self.device).log()

    def describe(self) -> str:
        m, meta = self.model, self.data.meta
        return table([
            ("data", f"{self.data.dir} ({meta['splits']['train']['tokens']:,} train tokens)"),
            ("model", f"{m.num_params() / 1e6:.2f}M parameters, {m.cfg.n_layers} layers, d_model {m.cfg.d_model}"),
            *([("from", pretrained.describe(self.base))] if self.base else []),
            ("device", f"{self.device} × {distributed.world_size()} process(es){' (DDP)' if self.ddp else ''}, "
                       f"{str(self.dtype).replace('torch.', '')}"
                       f"{', compiled' if self.t.compile else ''}, {torch.get_num_threads()} threads"),
            ("steps", f"{self.step} → {self.last_step()} ({self.batches.steps_per_epoch} per epoch, "
                      f"{self.tokens_per_step:,} tokens each)"),
            ("run folder", str(self.run_dir)),
        ], "train")

    def last_step(self) -> str:
        if not self.budget_s:
            return str(self.total)
        return (f"as many as trainer.max_time={self.t.max_time} allows: chosen after {self.calibrated_at - self.step} "
                "timed steps")

    def fit(self) -> dict:
        """Train to the last step, evaluate on val, save; on Ctrl-C or SIGTERM save the step reached."""
        if self.main:
            log.info("\n" + self.describe())
        if not self.budget_s:
            self._warn_if_warmup_outlasts_the_run()
        self.started = time.perf_counter()
        if self.main:
            (self.run_dir / RESULT).unlink(missing_ok=True)  # running again: no longer how it ended
            stamp_process(self.run_dir)
        self.model.train()
        bar = progress(total=None if self.budget_s else self.total, initial=self.step, desc="train", unit="step",
                       enabled=self.main)  # under max_time: no total until the run has chosen it
        self._start_window()
        interrupts = Interrupts()
        try:
            with logs_above_bars():
                while self.step < self.total and self.early_stopped is None:
                    self.profiler.at(self.step)
                    self._train_step(interrupts)
                    bar.update(1)
                    self._after_step(bar)
            bar.close()  # before the final evaluation's own bar
            self._announce_final_evaluation()
            val = self._evaluate_and_log(final=True)
            self._save_step(val)
            self._write_result("finished", val)
        except Diverged as e:
            self._write_result("diverged", None, error=str(e))
            raise
        except KeyboardInterrupt:
            interrupts.ignore()
            self._save_on_interrupt()
            self._write_result("interrupted", None)
            raise
        finally:
            bar.close()  # a run that stopped early too: a later job's bar would start a line lower
            interrupts.restore()
            self.profiler.close()
            self.tracker.finish()
        if self.main:
            log.info(f"done: step {self.step}, val loss {val['loss']:.4f}, bpc {val['bpc']:.4f}; checkpoints in "
                     f"{self.run_dir / checkpoint.CKPT_DIR}")
        if self.t.early_stop.patience is None:
            return val
        split = self.data.split("val")  # what a sweep minimizes: the best evaluation, on the same val tokens each time
        return {**val, "best_bpc": scoring.metrics(self.best, 1, split["tokens"], split["chars"])["bpc"]}

    def _train_step(self, interrupts: Interrupts) -> None:
        self.lr = lr_at(self.step, self.total, self.t)
        for g in self.opt.param_groups:
            g["lr"] = self.lr * g["lr_scale"]
        accum = self.t.grad_accum
        for micro in range(accum):
            x, y = self.batches.get(self.step, micro)
            # all-reduce the gradients on the last micro-step only (also when compiled: ddp is the inner module)
            sync = self.ddp is None or micro == accum - 1
            with (nullcontext() if sync else self.ddp.no_sync()), hardware.autocast(self.device, self.dtype):
                loss, rating_loss = self.losses(x, y)
            (loss if rating_loss is None else loss + self.t.rating_loss * rating_loss).div(accum).backward()
            self.window_loss += loss.detach() / accum
            if rating_loss is not None:
                self.window_rating_loss += rating_loss.detach() / accum
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip or float("inf"))
        with interrupts.update():
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
        self.window_steps += 1
        if self.first_step_done is None:
            self.first_step, self.first_step_done = self.step, time.perf_counter()

    def losses(self, x, y) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(next-token loss, rating loss) of a batch still on the host; the rating loss only with
        trainer.rating_loss > 0 (else None), its reviews found on the host so that the device never waits."""
        dev_x, dev_y = (a.to(self.device, non_blocking=True) for a in (x, y))
        if not self.t.rating_loss:
            return self.forward(dev_x, dev_y), None
        rows = max(1, round(self.t.rating_loss_rows * len(x)))
        scored = rating_loss.scored_reviews(x[:rows], y[:rows], self.rating_control_ids, self.data.meta["eos_id"])
        return rating_loss.training_losses(self.forward, self.model.head.weight, dev_x, dev_y, scored.to(self.device),
                                        self.log_prior)

    def _after_step(self, bar) -> None:
        """Metrics, periodic evaluation and checkpoints, each at its own interval."""
        if self.budget_s and self.step == self.calibrated_at:
            self._fit_schedule_to_budget(bar)
        t, step, last = self.t, self.step, self.step == self.total
        if step % t.log_interval == 0 or last:
            self._log_window(bar)
        if t.eval_interval and step % t.eval_interval == 0 and not last:
            self._evaluate_and_log()
            self.window_start = time.perf_counter()
            if self._plateaued():
                return
        if t.ckpt_interval and step % t.ckpt_interval == 0 and not last:
            self._check_weights()
            self._save_step()

    def _plateaued(self) -> bool:
        """trainer.early_stop: after `patience` periodic evaluations in a row without an improvement of min_delta,
        the run ends here (rank 0's count decides for every rank, so all stop at the same step)."""
        patience = self.t.early_stop.patience
        if patience is None or distributed.rank0_int(self.stale) < patience:
            return False
        self.early_stopped = self.step
        if self.main:
            log.info(f"early stop at step {self.step}: {self.stale} evaluations without a val loss below "
                     f"{self.best:.4f} − {self.t.early_stop.min_delta} (trainer.early_stop.patience={patience})")
        return True

    def _fit_schedule_to_budget(self, bar) -> None:
        """trainer.max_time: fix the last step so that training and its evaluations end on time, from the
        speed of the steps since the first (which pays one-off costs such as compilation)."""
        now = time.perf_counter()
        step_s = (now - self.first_step_done) / (self.step - self.first_step)
        tokens_per_s = self.tokens_per_step * self.passes / step_s
        share_s = scoring_seconds(self.share_n, tokens_per_s)
        per_step = step_s + (share_s / self.t.eval_interval if self.t.eval_interval else 0.0)
        left = self.budget_s - (now - self.started) - scoring_seconds(self.final_n, tokens_per_s)
        self.total = distributed.rank0_int(max(self.step + 1, self.step + int(left / per_step)))
        bar.total = self.total
        bar.refresh()
        log.info(f"trainer.max_time={self.t.max_time}: {step_s * 1e3:.0f} ms per step here, so max_steps={self.total} "
                 f"(trainer.max_steps={self.total} without max_time repeats this run)")
        self._warn_if_warmup_outlasts_the_run()

    def _warn_if_warmup_outlasts_the_run(self) -> None:
        if self.main and self.t.warmup_steps >= self.total:
            log.warning(f"trainer.warmup_steps={self.t.warmup_steps} is not below the run's {self.total} steps: the "
                        f"learning rate never reaches trainer.lr={self.t.lr} — lower warmup_steps (in a search space "
                        "too)")

    def _start_window(self) -> None:
        self.window_loss = torch.zeros((), device=self.device)
        self.window_rating_loss = torch.zeros((), device=self.device)
        self.window_steps, self.window_start = 0, time.perf_counter()

    def _log_window(self, bar) -> None:
        world = distributed.world_size()
        loss = self._window_mean(self.window_loss)
        if not math.isfinite(loss):
            raise self._diverged(f"train loss {loss:.4g}")
        tps = self.tokens_per_step * self.window_steps / (time.perf_counter() - self.window_start)
        row = {"train/loss": loss, "train/lr": self.lr, "train/grad_norm": float(self.grad_norm),
               "train/tokens_per_s": tps, "train/epoch": self.step / self.batches.steps_per_epoch}
        if self.t.rating_loss:
            row["train/rating_loss"] = self._window_mean(self.window_rating_loss)
        if self.peak:
            row["train/mfu"] = self.model.flops_per_token() * tps * self.passes / (self.peak * world)
        if self.device.type == "cuda":
            row["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.tracker.log(row, self.step)
        self.tokens_per_s = tps
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
        self._start_window()

    def _weights_finite(self) -> bool:
        return bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all())

    def _check_weights(self) -> None:
        """Before an evaluation or a checkpoint (a logged loss is checked as it is logged, with no pass over the
        weights in the loop): a diverged run stops and its last checkpoint stays the newest."""
        if not self._weights_finite():
            raise self._diverged("weights not finite")

    def _diverged(self, what: str) -> Diverged:
        return Diverged(f"training diverged by step {self.step} ({what}) — lower trainer.lr (or embedding_lr, muon_lr) "
                        "or set trainer.grad_clip; the checkpoints before it are kept")

    def _window_mean(self, total: torch.Tensor) -> float:
        """A loss summed over the window's steps: its mean per step and process."""
        return distributed.all_reduce_sum(total.clone()).item() / self.window_steps / distributed.world_size()

    def _announce_final_evaluation(self) -> None:
        """Its cost before it starts: all of val by default, which on a large corpus outlasts a short run."""
        if not self.main:
            return
        estimate = (f", about {scoring_seconds(self.final_n, self.tokens_per_s * self.passes):,.0f} s at this run's speed"
                    if self.tokens_per_s else "")
        log.info(f"final evaluation: {self.final_n:,} val tokens{estimate} (trainer.final_eval_tokens bounds it)")

    def _score(self, start: int, end: int, final: bool) -> tuple[float, int]:
        context = int(self.val_tokens[start - 1]) if start else None
        return scoring.token_loss(self.model, self.val_tokens[start:end], self.data.meta["eos_id"],
                                  self.model.cfg.block_size, self.t.eval_batch_size, self.device, self.dtype,
                                  show_progress=final, context=context)

    def evaluate(self, final: bool) -> tuple[dict, dict]:
        """(metrics of the periodic share, metrics of this evaluation)"""
        split = self.data.split("val")
        nats, n = self._score(0, self.share_n, final)
        share = scoring.metrics(nats, n, split["tokens"], split["chars"]) | self._review_scores(self.share_n)
        if not final or self.share_n == self.final_n:
            return share, share
        rest_nats, rest_n = self._score(self.share_n, self.final_n, final)
        return share, (scoring.metrics(nats + rest_nats, n + rest_n, split["tokens"], split["chars"])
                       | self._review_scores(self.final_n))

    def _review_scores(self, end: int) -> dict:
        """review_loss and review_bpc of the whole reviews among val's first `end` tokens, each read from its start."""
        return scoring.review_scores(self.model, self.val_tokens[:end], self.data.meta["eos_id"], self.controls,
                                     self.tokenizer.decode, self.t.eval_batch_size, self.device, self.dtype)

    def sample_completer(self) -> sampling.Completer:
        """trainer.sample_prompts are completed as stage=generate completes them (the `generate:` block's decoding,
        no rating), from seed `seed` and its own generator: no draws from the training RNG (resume stays exact)."""
        g = {**sampling.decoding(self.cfg.generate), "rating": None, "seed": self.cfg.seed,
             "max_new_tokens": self.t.sample_tokens}
        return sampling.Completer(self.model, self.tokenizer, SimpleNamespace(**g), settings.plain(self.cfg.data.clean),
                                  banned=self.controls)

    def samples(self) -> list[tuple[str, str]]:
        self.model.eval()  # no dropout
        completer = self.sample_completer()
        rows = [(prompt, completer.complete(prompt)["completion"]) for prompt in self.sample_prompts]
        self.model.train()
        return rows

    def _evaluate_and_log(self, final: bool = False) -> dict:
        self._check_weights()  # its samples would meet NaN scores first, and best.pt must not hold them
        share, val = self.evaluate(final)
        is_best = share["loss"] < self.best
        self.stale = 0 if share["loss"] < self.best - self.t.early_stop.min_delta else self.stale + 1
        self.best = min(self.best, share["loss"])
        self.tracker.log({f"val/{k}": v for k, v in val.items()}, self.step)
        if final and self.early_stopped is not None:
            self.tracker.log({"train/early_stopped": self.early_stopped}, self.step)
        if self.main:
            log.info(f"step {self.step}: val loss {val['loss']:.4f}, ppl {val['ppl']:.2f}, bpc {val['bpc']:.4f}, "
                     f"review bpc {val['review_bpc']:.4f}")
            self._log_samples()
        if is_best and self.main:
            checkpoint.save(self.checkpoint(val), checkpoint.best_path(self.run_dir))
        return val

    def _log_samples(self) -> None:
        if not self.sample_prompts:
            return
        rows = self.samples()
        self.tracker.log_samples(rows, self.step)
        for prompt, completion in rows:
            log.info(f"  {prompt} → {completion}")

    def _save_step(self, val: dict | None = None) -> None:
        if self.main:
            checkpoint.save(self.checkpoint(val), checkpoint.step_path(self.run_dir, self.step))
            checkpoint.prune(self.run_dir, self.t.keep_last)

    def _write_result(self, state: str, val: dict | None, error: str | None = None) -> None:
        """result.json: how the run ended, for `stage=report` (a run with none failed or is running)."""
        if self.main:
            write_result(self.run_dir, {"state": state, "step": self.step, "val": val, "tokens_per_s": self.tokens_per_s,
                                        "wall_s": self.wall_s(), "early_stopped": self.early_stopped,
                                        **({"error": error} if error else {})})

    def _save_on_interrupt(self) -> None:
        if not (self.main and self.step > 0):
            return
        if not self._weights_finite():
            log.warning(f"interrupted at step {self.step} with NaN or infinite weights (the run diverged): not saved")
        else:
            self._save_step()
            log.warning(f"interrupted: saved step {self.step}; continue with: {self.command} "
                        f"hydra.run.dir={self.run_dir} trainer.resume=auto")

    def checkpoint(self, val: dict | None) -> Checkpoint:
        """The run as it stands: everything generate, evaluate and an exact resume need."""
        meta, t = self.data.meta, self.t
        return Checkpoint(
            model_config=self.model.cfg.to_dict(), model=self.model.state_dict(), optimizer=self.opt.state_dict(),
            scheduler=Schedule("warmup_cosine", self.total, t.warmup_steps, str(t.max_time) if t.max_time else None),
            step=self.step, best_val_loss=self.best, best_val_tokens=self.share_n, val=val, rng=resume.rng_state(),
            data=DataRecord(str(self.data.dir), meta["name"], meta["fingerprint"], self.batches.position(self.step),
                            meta["splits"], meta["eos_id"], meta["dtype"], self.condition),
            tokenizer=TokenizerRecord(str(self.data.tokenizer_dir), meta["tokenizer"], ktok.to_files(self.data.tokenizer_dir)),
            config=settings.plain(self.cfg), wandb_run_id=self.tracker.run_id,
            torch_version=str(torch.__version__), base=self.base, wall_s=self.wall_s(), stale_evals=self.stale,
            early_stopped=self.early_stopped,
        )

    def wall_s(self) -> float:
        """Seconds the run has trained, its earlier parts included."""
        return round(self.wall_before + time.perf_counter() - self.started, 1)
