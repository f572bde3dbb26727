"""A rating-conditioned language model as a sentiment classifier (Bayes' rule): each review is scored under
every rating's control token, and the rating r maximizing P(review | r) · P(r) is its prediction. The same
scores give the bits per character of each rating's reviews (the control token's own loss left out)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kr3 import hardware
from kr3.model import linear_cross_entropy
from kr3.tracking import progress


def reviews_of(tokens: np.ndarray, eos_id: int, controls: dict[int, int]) -> list[tuple[int, list[int]]]:
    """(rating, token ids of the text) of each rated review in a prepared split; unrated ones left out."""
    rating_of = {i: r for r, i in controls.items()}
    tokens = np.asarray(tokens)
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [(rating_of[int(tokens[s])], tokens[s + 1 : e].tolist()) for s, e in zip(starts, ends)
            if e > s and int(tokens[s]) in rating_of]


@torch.no_grad()
def log_likelihoods(model, texts: list[list[int]], controls: dict[int, int], eos_id: int, batch_size: int, device,
                    dtype) -> np.ndarray:
    """(reviews × ratings) summed log-probabilities (nats) of each text and its end-of-review token after
    `[EOS, control]`: one forward pass per review and rating, batched."""
    ratings = sorted(controls)
    rows = [(i, j, [eos_id, controls[r], *text, eos_id][: model.cfg.block_size + 1])
            for i, text in enumerate(texts) for j, r in enumerate(ratings)]
    out = np.zeros((len(texts), len(ratings)))
    model.eval()
    for start in progress(range(0, len(rows), batch_size), desc="classify", unit="batch"):
        chunk = rows[start : start + batch_size]
        for (i, j, _), ll in zip(chunk, _sequence_log_probs(model, [seq for *_, seq in chunk], device, dtype)):
            out[i, j] = ll
    return out


def _sequence_log_probs(model, seqs: list[list[int]], device, dtype) -> list[float]:
    """Summed log p of tokens 2.. of each sequence (the text after EOS and the control token)."""
    length = max(map(len, seqs))
    x = torch.zeros(len(seqs), length - 1, dtype=torch.long)
    y = torch.zeros_like(x)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for k, seq in enumerate(seqs):
        x[k, : len(seq) - 1] = torch.tensor(seq[:-1])
        y[k, : len(seq) - 1] = torch.tensor(seq[1:])
        mask[k, 1 : len(seq) - 1] = True  # target 0 is the control token itself: not the review's
    with hardware.autocast(device, dtype):
        logits = model(x.to(device))
    logp = -F.cross_entropy(logits.float().transpose(1, 2), y.to(device), reduction="none")
    return (logp * mask.to(device)).sum(1).tolist()


def accuracy(ll: np.ndarray, labels: np.ndarray, prior: np.ndarray, classes: list[int]) -> dict:
    """Accuracy of argmax_r log P(review | r) + log P(r) over `classes`, on the reviews labelled one of them,
    beside the majority-class rate of those reviews."""
    keep = np.isin(labels, classes)
    scores = ll[keep][:, classes] + np.log(prior[classes] / prior[classes].sum())
    predicted = np.array(classes)[scores.argmax(1)]
    counts = np.array([(labels[keep] == c).sum() for c in classes])
    return {"accuracy": float((predicted == labels[keep]).mean()), "majority": float(counts.max() / counts.sum()),
            "reviews": int(keep.sum())}


def report(ll: np.ndarray, labels: np.ndarray, chars: np.ndarray, prior: np.ndarray, names: dict[int, str]) -> dict:
    """What stage=evaluate adds for a conditioned checkpoint: bpc per rating and the classifier's accuracy."""
    own = ll[np.arange(len(labels)), labels]  # under the review's own rating
    per_rating = {names[r]: {"bpc": float(-own[labels == r].sum() / chars[labels == r].sum() / math.log(2)),
                             "reviews": int((labels == r).sum())} for r in sorted(names) if (labels == r).any()}
    return {"rated_bpc": float(-own.sum() / chars.sum() / math.log(2)),  # every rated review, controls not scored
            "per_rating": per_rating, "classifier": {"binary (0/1)": accuracy(ll, labels, prior, [0, 1]),
                                                     "three ratings": accuracy(ll, labels, prior, [0, 1, 2])}}


def rating_prior(splits: dict, controls: dict[int, int]) -> np.ndarray:
    """P(r) of each rating of `controls` (in rating order): its share of the train split's rated reviews."""
    counts = np.array([splits["train"]["ratings"].get(str(r), 0) for r in sorted(controls)], dtype=float)
    return counts / counts.sum()


def training_losses(forward, head: torch.Tensor, x: torch.Tensor, y: torch.Tensor, controls: torch.Tensor,
                    log_prior: torch.Tensor, eos_id: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token loss of the batch, rating loss): the rating loss is the cross-entropy of a review's rating
    under Bayes' rule — log P(review | r) + log P(r) over every rating r, as `accuracy` classifies — for the
    first whole rated review of each of the first `rows` rows. Those rows run once more per other rating, that
    review's control token moved k ratings on, in the same forward pass as the batch; the head (`head`: the
    output layer's weight) makes logits only where the scored reviews are. Only the first review moves: a later
    one would see the earlier ones under ratings that contradict their text, evidence the evaluation never has.
    `controls`: the control token ids in rating order."""
    n, B = len(controls), len(x)
    start, end, whole = first_reviews(x[:rows], y[:rows], controls, eos_id)
    scored = whole.nonzero().squeeze(1)
    if not len(scored):
        return forward(x, y), torch.zeros((), device=x.device)
    start, end = start[scored], end[scored]
    labels = (x[scored, start][:, None] == controls).int().argmax(1)
    moved = [x[scored].index_put((torch.arange(len(scored), device=x.device), start), controls[(labels + k) % n])
             for k in range(1, n)]
    h = forward(torch.cat([x, *moved]), hidden=True)
    lm = linear_cross_entropy(h[:B].flatten(0, 1), head, y.flatten())
    at = torch.arange(x.shape[1], device=x.device)
    span = ((at >= start[:, None]) & (at <= end[:, None])).repeat(n, 1)  # from the control token to before EOS
    where = torch.cat([scored, torch.arange(B, len(h), device=x.device)])  # the review's row under each rating
    review, pos = span.nonzero(as_tuple=True)  # the scored positions, each with its (review, rating) row
    logits = h[where[review], pos] @ head.t()
    logp = -F.cross_entropy(logits.float(), y[scored.repeat(n)[review], pos], reduction="none")
    shifted = torch.zeros(n * len(scored), device=x.device).index_add(0, review, logp).view(n, -1).t()
    scores = shifted.gather(1, (torch.arange(n, device=x.device) - labels[:, None]) % n) + log_prior
    return lm, F.cross_entropy(scores, labels)


def first_reviews(x: torch.Tensor, y: torch.Tensor, controls: torch.Tensor, eos_id: int):
    """Per row, its first rated review: the position of its control token, the position whose next token is its
    EOS, and whether the row has such a review with its EOS (a review cut by the row's end is not whole)."""
    T = x.shape[1]
    at = torch.arange(T, device=x.device)
    start = torch.where(torch.isin(x, controls), at, T).min(1).values
    end = torch.where((y == eos_id) & (at >= start[:, None]), at, T).min(1).values
    return start, end, end < T
