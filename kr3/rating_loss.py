"""The rating loss (trainer.rating_loss): a rating-conditioned model trained as its own rating classifier — the
cross-entropy of a review's rating under Bayes' rule, as kr3.classify scores it at evaluation — beside the next-token
loss, in the same forward pass."""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F

from kr3.model import linear_cross_entropy


@dataclass
class ScoredReviews:
    """Where the rating loss scores a micro-batch, found on the host from its CPU tensors, so that the device
    never waits for a count (no `nonzero` on the device: a sync per step on a GPU)."""
    rows: torch.Tensor  # (R,) the rows with a whole first rated review
    start: torch.Tensor  # (R,) the position of that review's control token
    labels: torch.Tensor  # (R,) its rating's index
    swapped: torch.Tensor  # (n − 1, R) its control token moved k = 1 … n − 1 ratings on
    review: torch.Tensor  # (P,) for each scored position (control token to before EOS): its review, in 0 … R − 1
    pos: torch.Tensor  # (P,) and its position in the row

    def to(self, device) -> ScoredReviews:
        return ScoredReviews(*(t.to(device, non_blocking=True) for t in astuple(self)))


def scored_reviews(x: torch.Tensor, y: torch.Tensor, controls: torch.Tensor, eos_id: int) -> ScoredReviews:
    """The first whole rated review of each row of `x` (the rows the rating loss runs again). `controls`: the
    control token ids in rating order."""
    n = len(controls)
    start, end, whole = first_reviews(x, y, controls, eos_id)
    rows = whole.nonzero().squeeze(1)
    start, end = start[rows], end[rows]
    labels = (x[rows, start][:, None] == controls).int().argmax(1)
    swapped = controls[(labels + torch.arange(1, n)[:, None]) % n]
    at = torch.arange(x.shape[1])
    review, pos = ((at >= start[:, None]) & (at <= end[:, None])).nonzero(as_tuple=True)
    return ScoredReviews(rows, start, labels, swapped, review, pos)


def training_losses(forward, head: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scored: ScoredReviews,
                    log_prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token loss of the batch, rating loss): the rating loss is the cross-entropy of a review's rating
    under Bayes' rule — log P(review | r) + log P(r) over every rating r, as `accuracy` classifies — for the
    `scored` reviews (`scored_reviews` of some rows of `x`). Their rows run once more per other rating, the
    review's control token moved k ratings on, in the same forward pass as the batch; the head (`head`: the
    output layer's weight) makes logits only where the scored reviews are. Only the first review moves: a later
    one would see the earlier ones under ratings that contradict their text, evidence the evaluation never has."""
    n, B, R = len(log_prior), len(x), len(scored.rows)
    if not R:
        return forward(x, y), torch.zeros((), device=x.device)
    moved = [x[scored.rows].index_put((torch.arange(R, device=x.device), scored.start), ids) for ids in scored.swapped]
    h = forward(torch.cat([x, *moved]), hidden=True)
    lm = linear_cross_entropy(h[:B].flatten(0, 1), head, y.flatten())
    k = torch.arange(n, device=x.device)[:, None]
    where = torch.cat([scored.rows, torch.arange(B, len(h), device=x.device)])  # review i's row under shift k: kR + i
    review = (scored.review + k * R).flatten()  # each scored position once per shift: (shift, review) in 0 … nR − 1
    pos = scored.pos.repeat(n)
    logits = h[where[review], pos] @ head.t()
    logp = -F.cross_entropy(logits.float(), y[scored.rows[scored.review].repeat(n), pos], reduction="none")
    shifted = torch.zeros(n * R, device=x.device).index_add(0, review, logp).view(n, -1).t()
    scores = shifted.gather(1, (k.squeeze(1) - scored.labels[:, None]) % n) + log_prior
    return lm, F.cross_entropy(scores, scored.labels)


def first_reviews(x: torch.Tensor, y: torch.Tensor, controls: torch.Tensor, eos_id: int):
    """Per row, its first rated review: the position of its control token, the position whose next token is its
    EOS, and whether the row has such a review with its EOS (a review cut by the row's end is not whole)."""
    T = x.shape[1]
    at = torch.arange(T, device=x.device)
    start = torch.where(torch.isin(x, controls), at, T).min(1).values
    end = torch.where((y == eos_id) & (at >= start[:, None]), at, T).min(1).values
    return start, end, end < T
