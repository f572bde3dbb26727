"""stage=train: GPT on the prepared token files, one process or many under torchrun (DDP)."""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from kr3 import checkpoint, distributed, hardware, optim, prepare
from kr3 import tokenizer as ktok
from kr3.errors import UserError, check_values
from kr3.evaluate import metrics, token_loss
from kr3.generate import sample_tokens
from kr3.model import GPT, GPTConfig
from kr3.tracking import Tracker, progress, table

log = logging.getLogger(__name__)


class Batches:
    """Windows of `block_size + 1` tokens from a flat token file. Each epoch cuts the file at a random
    offset into non-overlapping windows in a random order (both fixed by seed and epoch). Optimizer step
    s uses windows [s·G, (s+1)·G) of that order, G = batch × accumulation × world size; rank r's micro-
    batch m takes B consecutive ones at (m·W + r)·B. So the data of a step depends only on the step
    (resume is exact) and on the global batch, not on how it is split across processes."""

    def __init__(self, path: Path, dtype: str, block_size: int, batch_size: int, accum: int, seed: int):
        self.data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.block, self.B, self.accum, self.seed = block_size, batch_size, accum, seed
        self.W, self.rank = distributed.world_size(), distributed.rank()
        self.per_step = batch_size * accum * self.W
        self.windows = (len(self.data) - 1 - block_size) // block_size  # leaves room for any offset
        self.steps_per_epoch = self.windows // self.per_step
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int):
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.block))
            self._order = offset + rng.permutation(self.windows) * self.block
            self._epoch = epoch
        return self._order

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        first = in_epoch * self.per_step + (micro * self.W + self.rank) * self.B
        starts = order[first : first + self.B]
        chunk = torch.from_numpy(np.stack([self.data[s : s + self.block + 1] for s in starts]).astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def position(self, step: int) -> dict:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "step_in_epoch": in_epoch, "windows_per_step": self.per_step, "seed": self.seed}


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


def check_trainer(t) -> None:
    check_values("trainer", t, {
        "batch_size": ("int", 1, None, False), "grad_accum": ("int", 1, None, False),
        "log_interval": ("int", 1, None, False), "eval_batch_size": ("int", 1, None, False),
        "warmup_steps": ("int", 0, None, False), "keep_last": ("int", 0, None, False),
        "eval_tokens": ("int", 1, None, True), "final_eval_tokens": ("int", 1, None, True),
        "lr": ("number", 0, None, False),
    })


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio × lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress_ = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_)))


def find_resume(cfg, run_dir: Path) -> Path | None:
    r = cfg.trainer.resume
    if not r:
        return None
    if r == "auto":
        steps = checkpoint.list_steps(run_dir)
        return steps[-1] if steps else None
    return checkpoint.resolve(r)


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


def model_config(cfg, vocab_size: int) -> GPTConfig:
    m = cfg.model
    return GPTConfig(vocab_size=vocab_size, n_layers=m.n_layers, n_heads=m.n_heads, d_model=m.d_model, d_ffn=m.d_ffn,
                     block_size=m.block_size, dropout=m.dropout, bias=m.bias)


def run(cfg) -> dict:
    distributed.init()
    t = cfg.trainer
    check_trainer(t)
    run_dir = Path(cfg.paths.output_dir)
    main = distributed.is_main()
    if t.threads:
        torch.set_num_threads(int(t.threads))
    dev = hardware.resolve_device(t.device)
    dtype = hardware.resolve_precision(t.precision, dev)
    if dev.type == "cpu":
        hardware.keep_freed_memory()

    # prepared data: rank 0 prepares (or reuses) it, the others wait
    with distributed.main_first():
        data_dir = prepare.run(cfg) if main else prepare.prepared_dir(cfg)
    meta = prepare.read_meta(data_dir)

    resume_path = find_resume(cfg, run_dir)
    state = checkpoint.load(resume_path, resume=True) if resume_path else None
    if state and state["data"]["fingerprint"] != meta["fingerprint"]:
        raise UserError(
            f"checkpoint {resume_path} was trained on other data or another tokenizer "
            f"({state['data']['name']}, vocab {state['model_config']['vocab_size']}) than {meta['name']} "
            f"(vocab {meta['vocab_size']}) — resume with the data/tokenizer config it was trained with"
        )
    if state:
        ignored = [f"model.{k}={cfg.model[k]} (checkpoint: {v})" for k, v in state["model_config"].items()
                   if k in cfg.model and cfg.model[k] != v]
        if ignored and main:
            log.warning(f"resuming keeps the checkpoint's model; ignored: {', '.join(ignored)}")
        mcfg = GPTConfig(**state["model_config"])
    else:
        mcfg = model_config(cfg, meta["vocab_size"])

    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(dev)
    opt = optim.build(model, t, dev)
    batches = Batches(data_dir / meta["splits"]["train"]["file"], meta["dtype"], mcfg.block_size, t.batch_size,
                      t.grad_accum, cfg.seed)
    if batches.steps_per_epoch < 1:
        raise UserError(
            f"train.bin has {len(batches.data):,} tokens: not one step of {batches.per_step} windows of "
            f"{mcfg.block_size + 1} — lower trainer.batch_size or model.block_size"
        )
    total_steps = int(t.max_steps) if t.max_steps else int(t.epochs * batches.steps_per_epoch)
    step = 0
    if state:
        model.load_state_dict(state["model"])
        if len(state["optimizer"]["param_groups"]) != len(opt.param_groups):
            raise UserError(f"checkpoint {resume_path} holds optimizer state of other parameter groups (another "
                            "trainer.optimizer, or an older kr3) — resume with the trainer.optimizer it was trained "
                            "with; it still works with stage=generate/evaluate")
        settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(state["optimizer"])  # moments and step counts; settings (lr_scale too) are this run's
        for g, own in zip(opt.param_groups, settings):
            g.update(own)
        step = state["step"]
        newer = [p.name for p in checkpoint.list_steps(run_dir) if checkpoint.step_of(p) > step]
        if newer:
            raise UserError(f"{run_dir} already holds checkpoints after step {step} ({', '.join(newer)}): resuming "
                            "here would mix two histories — resume from the newest (trainer.resume=auto) or into a new "
                            "run folder (hydra.run.dir=...)")
        finished = state["val"] is not None and step >= state["scheduler"]["total_steps"]  # its final evaluation
        if finished and step >= total_steps:
            if main:
                log.info(f"{resume_path} finished at step {step} (val loss {state['val']['loss']:.4f}, bpc "
                         f"{state['val']['bpc']:.4f}): nothing to train — raise trainer.max_steps (or trainer.epochs) to go on")
            return state["val"]
        if step > total_steps:
            raise UserError(f"checkpoint {resume_path} is at step {step}, past this run's {total_steps} steps — raise "
                            "trainer.max_steps (or trainer.epochs)")
        if main:
            if state["data"]["position"]["windows_per_step"] != batches.per_step:
                log.warning("the global batch changed since the checkpoint: the data order after it will differ")
            if state["scheduler"]["total_steps"] != total_steps:
                log.warning(f"the schedule now ends at step {total_steps}, not {state['scheduler']['total_steps']}: "
                            f"from step {step} the learning rate follows the cosine to step {total_steps}")
            log.info(f"resumed from {resume_path} at step {step}")

    if main:
        checkpoint.remove_temps(run_dir)
    tok_dir = data_dir / meta["tokenizer"]["dir"]
    # one run folder, one history, one W&B run: resumed elsewhere (a branch, a multirun's jobs) a new W&B run
    in_place = state is not None and resume_path.resolve().parent.parent == run_dir.resolve()
    tracker = Tracker(cfg, run_dir, enabled=main, resume_id=state.get("wandb_run_id") if in_place else None)
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None) if distributed.is_distributed() else None
    train_model = torch.compile(ddp or model) if t.compile else ddp or model

    tokens_per_step = batches.per_step * mcfg.block_size
    peak = hardware.peak_flops(dev, dtype, t.peak_flops)
    flops_per_token = model.flops_per_token()
    val_tokens = np.memmap(data_dir / meta["splits"]["val"]["file"], dtype=np.dtype(meta["dtype"]), mode="r")
    val_split = meta["splits"]["val"]
    # periodic evaluations score the same whole windows at val's start, so their losses compare (best.pt);
    # the final one scores them again as the start of its pass, then the rest
    final_n = min(len(val_tokens), int(t.final_eval_tokens)) if t.final_eval_tokens else len(val_tokens)
    share_n = min(final_n, -(-int(t.eval_tokens) // mcfg.block_size) * mcfg.block_size) if t.eval_tokens else final_n
    # the checkpoint's best counts only if measured on the same val tokens
    best = state["best_val_loss"] if state and state.get("best_val_tokens") == share_n else float("inf")
    tokenizer = ktok.load(tok_dir)
    if main:
        log.info("\n" + table([
            ("data", f"{data_dir} ({meta['splits']['train']['tokens']:,} train tokens)"),
            ("model", f"{model.num_params() / 1e6:.2f}M parameters, {mcfg.n_layers} layers, d_model {mcfg.d_model}"),
            ("device", f"{dev} × {distributed.world_size()} process(es), {str(dtype).replace('torch.', '')}"
                       f"{', compiled' if t.compile else ''}, {torch.get_num_threads()} threads"),
            ("steps", f"{step} → {total_steps} ({batches.steps_per_epoch} per epoch, {tokens_per_step:,} tokens each)"),
            ("run folder", str(run_dir)),
        ], "train"))

    def evaluate(final: bool) -> tuple[dict, dict]:
        """(metrics of the periodic share, metrics of this evaluation)"""
        def score(start, end):
            context = int(val_tokens[start - 1]) if start else None
            return token_loss(model, val_tokens[start:end], meta["eos_id"], mcfg.block_size, t.eval_batch_size, dev,
                              dtype, show_progress=final, context=context)

        nats, n = score(0, share_n)
        share = metrics(nats, n, val_split["tokens"], val_split["chars"])
        if not final or share_n == final_n:
            return share, share
        rest_nats, rest_n = score(share_n, final_n)
        return share, metrics(nats + rest_nats, n + rest_n, val_split["tokens"], val_split["chars"])

    def samples() -> list[tuple[str, str]]:
        rows = []
        model.eval()  # no dropout, and no draws from the training RNG (resume stays exact)
        for prompt in t.sample_prompts or []:
            ids = list(sample_tokens(model, tokenizer.encode(prompt), t.sample_tokens, tokenizer.eos_id,
                                     temperature=0.8, top_k=50, generator=torch.Generator().manual_seed(cfg.seed)))
            rows.append((prompt, tokenizer.decode(ids)))
        model.train()
        return rows

    def save(kind: str, val: dict | None = None):
        if not main:
            return
        ckpt = {
            "model_config": mcfg.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": {"kind": "warmup_cosine", "total_steps": total_steps, "warmup_steps": t.warmup_steps},
            "step": step, "best_val_loss": best, "best_val_tokens": share_n, "val": val, "rng": rng_state(),
            "data": {"dir": str(data_dir), "name": meta["name"], "fingerprint": meta["fingerprint"],
                     "position": batches.position(step), "splits": meta["splits"], "eos_id": meta["eos_id"],
                     "dtype": meta["dtype"]},
            "tokenizer": {"dir": str(tok_dir), "spec": meta["tokenizer"], "files": ktok.to_files(tok_dir)},
            "config": OmegaConf.to_container(cfg, resolve=True), "wandb_run_id": tracker.run_id,
            "torch_version": str(torch.__version__),
        }
        if kind == "best":
            checkpoint.save(ckpt, run_dir / checkpoint.CKPT_DIR / checkpoint.BEST)
        else:
            checkpoint.save(ckpt, checkpoint.step_path(run_dir, step))
            checkpoint.prune(run_dir, t.keep_last)

    def eval_and_log(final=False):
        nonlocal best
        share, val = evaluate(final)
        is_best = share["loss"] < best
        best = min(best, share["loss"])
        tracker.log({f"val/{k}": v for k, v in val.items()}, step)
        if main:
            log.info(f"step {step}: val loss {val['loss']:.4f}, ppl {val['ppl']:.2f}, bpc {val['bpc']:.4f}")
            if t.sample_prompts:
                rows = samples()
                tracker.log_samples(rows, step)
                for p, c in rows:
                    log.info(f"  {p} → {c}")
        if is_best:
            save("best", val)
        return val

    if state:
        set_rng_state(state["rng"])  # last: the setup above (peak-FLOPs measurement) draws random numbers
    model.train()
    bar = progress(total=total_steps, initial=step, desc="train", unit="step", enabled=main)
    window_loss, window_steps, t_log = torch.zeros((), device=dev), 0, time.perf_counter()
    val = None
    interrupts = Interrupts()
    try:
        while step < total_steps:
            lr = lr_at(step, total_steps, t)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            for micro in range(t.grad_accum):
                x, y = (a.to(dev, non_blocking=True) for a in batches.get(step, micro))
                # all-reduce the gradients on the last micro-step only (also when compiled: ddp is the inner module)
                sync = ddp is None or micro == t.grad_accum - 1
                with (nullcontext() if sync else ddp.no_sync()), hardware.autocast(dev, dtype):
                    loss = train_model(x, y) / t.grad_accum
                loss.backward()
                window_loss += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
            with interrupts.update():
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
            window_steps += 1
            bar.update(1)
            if step % t.log_interval == 0 or step == total_steps:
                loss_avg = distributed.all_reduce_sum(window_loss.clone()).item() / window_steps / distributed.world_size()
                dt = time.perf_counter() - t_log
                tps = tokens_per_step * window_steps / dt
                row = {"train/loss": loss_avg, "train/lr": lr, "train/grad_norm": float(grad_norm),
                       "train/tokens_per_s": tps, "train/epoch": step / batches.steps_per_epoch}
                if peak:
                    row["train/mfu"] = flops_per_token * tps / (peak * distributed.world_size())
                if dev.type == "cuda":
                    row["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                tracker.log(row, step)
                bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{tps:,.0f}")
                window_loss.zero_()
                window_steps, t_log = 0, time.perf_counter()
            if t.eval_interval and step % t.eval_interval == 0 and step < total_steps:
                eval_and_log()
                t_log = time.perf_counter()
            if t.ckpt_interval and step % t.ckpt_interval == 0 and step < total_steps:
                save("step")
        bar.close()
        val = eval_and_log(final=True)
        save("step", val)
    except KeyboardInterrupt:
        interrupts.ignore()
        if main and step > 0:
            save("step")
            log.warning(f"interrupted: saved step {step}; continue with trainer.resume={run_dir}")
        raise
    finally:
        interrupts.restore()
        tracker.finish()
    if main:
        log.info(f"done: step {step}, val loss {val['loss']:.4f}, bpc {val['bpc']:.4f}; checkpoints in "
                 f"{run_dir / checkpoint.CKPT_DIR}")
    return val

