"""Process-group setup for `torchrun` (DDP): NCCL on CUDA, gloo on CPU; a plain `python run.py` is rank 0 of 1."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from kr3.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """Started by torchrun (its agent sets TORCHELASTIC_RUN_ID: a group to join, also of one process) or as one
    of several tasks (submitit's, through adopt_submitit_tasks); a stray WORLD_SIZE=1 alone is no launch."""
    return "TORCHELASTIC_RUN_ID" in os.environ or world_size() > 1


def adopt_submitit_tasks() -> None:
    """Under hydra/launcher=submitit_* every task of a job is one process of it: give each the variables
    torchrun would (rank, local rank, world size, rendezvous on the first node)."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
                          MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(20000 + int(env.job_id) % 20000))


def init() -> None:
    """Join the process group torchrun (or a submitit job) describes, once per process (a Hydra multirun
    reuses it), and agree on one start time so that every rank resolves the same Hydra run folder."""
    adopt_submitit_tasks()
    if not launched() or is_distributed():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    stamp = [time.time()]
    dist.broadcast_object_list(stamp, src=0)
    os.environ["KR3_RUN_TIME"] = repr(stamp[0])


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


@contextmanager
def main_first():
    """Rank 0 runs the body first while the other ranks wait, then they run it. Its one-off work (preparing
    the data: a Hub download, a tokenizer) may outlast the process group's timeout (30 minutes: torch's default
    for gloo and for kr3's cpu:gloo,cuda:nccl group), so they wait on a gloo group of their own, made before it
    starts, with a long one; if rank 0 fails, they stop at once (a Hydra multirun would otherwise go on to its
    next job while they still wait)."""
    if not is_distributed():
        yield
        return
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=6))
    done = [False]
    try:
        if is_main():
            try:
                yield
                done[0] = True
            finally:
                dist.broadcast_object_list(done, src=0, group=group)
        else:
            dist.broadcast_object_list(done, src=0, group=group)
            if not done[0]:
                raise UserError("rank 0 failed (see its error, in its node's log) — fix that and run again")
            yield
    finally:
        dist.destroy_process_group(group)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def rank0_int(value: int) -> int:
    """Rank 0's value on every rank: a decision each rank could take differently (from its own clock) must be one."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown() -> None:
    if is_distributed():
        dist.destroy_process_group()
