"""The training data order: which windows of train.bin each optimizer step, micro-step and rank reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kr3 import distributed
from kr3.errors import UserError


class Batches:
    """Non-overlapping windows of `block_size + 1` tokens from a flat token file, in a random order each epoch (fixed
    by seed and epoch). Stream packing (`review_end` None) cuts the file at a random offset each epoch, so a window
    starts anywhere in a review; review packing starts every window at an end-of-review token `review_end` (the
    start of the review after it, as a prompt is read), filled with the reviews that follow and cut at its end
    (`review_windows`). Optimizer step s uses windows [s·G, (s+1)·G) of the order, G = batch × accumulation × world
    size; rank r's micro-batch m takes B consecutive ones at (m·W + r)·B. So the data of a step depends only on the
    step (resume is exact) and on the global batch, not on how it is split across processes."""

    def __init__(self, path: Path, dtype: str, block_size: int, batch_size: int, accum: int, seed: int,
                 review_end: int | None = None):
        self.data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.block, self.B, self.accum, self.seed = block_size, batch_size, accum, seed
        self.W, self.rank = distributed.world_size(), distributed.rank()
        self.per_step = batch_size * accum * self.W
        self.starts = None if review_end is None else review_windows(self.data, review_end, block_size)
        # stream: leaves room for any offset
        self.windows = (len(self.data) - 1 - block_size) // block_size if self.starts is None else len(self.starts)
        self.steps_per_epoch = self.windows // self.per_step
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int):
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.block))
            order = rng.permutation(self.windows)
            self._order = offset + order * self.block if self.starts is None else self.starts[order]
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

    def check_one_step(self) -> None:
        if self.steps_per_epoch < 1:
            raise UserError(
                f"train.bin has {len(self.data):,} tokens: not one step of {self.per_step} windows of "
                f"{self.block + 1} — lower trainer.batch_size or model.block_size"
            )


def review_windows(data: np.ndarray, review_end: int, block_size: int) -> np.ndarray:
    """Where each window of review packing starts: at an end-of-review token, the first one after the previous
    window's inputs end (greedily, from the file's start). The rest of the review a window cuts is skipped: no window
    starts inside a review. The cuts fall at the same places every epoch, so that each epoch has as many windows."""
    ends = np.flatnonzero(np.asarray(data[: len(data) - block_size - 1]) == review_end)
    starts, at = [], 0
    while (i := int(np.searchsorted(ends, at))) < len(ends):
        starts.append(ends[i])
        at = ends[i] + block_size
    return np.array(starts, dtype=np.int64)
