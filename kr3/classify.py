"""A rating-conditioned language model as a sentiment classifier (Bayes' rule): each review is scored under
every rating's control token, and the rating r maximizing P(review | r) · P(r) is its prediction. The same
scores give the bits per character of each rating's reviews (the control token's own loss left out)."""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kr3 import hardware
from kr3.model import linear_cross_entropy
from kr3.prepared import rating_controls
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


def rating_scores(m, tokens: np.ndarray, batch_size: int) -> dict:
    """What stage=evaluate adds for `m` (a kr3.Model) trained with data.condition=rating: bits per character of
    each rating's reviews and the model's accuracy as a generative classifier, on the rated reviews of `tokens`
    (a prepared split); nothing otherwise."""
    condition = m.checkpoint.data.get("condition")
    if not condition:
        return {}
    controls = rating_controls(condition)
    reviews = reviews_of(tokens, m.tokenizer.eos_id, controls)
    if not reviews:
        return {}
    # each review is scored in one window after [EOS, control]: a longer one is cut, and only what is scored counts
    texts = [t[: m.model.cfg.block_size - 1] for _, t in reviews]
    # reviews are short (about 19 tokens against windows of block_size): 4x evaluate.batch_size rows per pass
    ll = log_likelihoods(m.model, texts, controls, m.tokenizer.eos_id, 4 * batch_size, m.device, m.dtype)
    prior = rating_prior(m.checkpoint.data["splits"], controls)
    chars = np.array([len(m.tokenizer.decode(t)) for t in texts])
    names = {int(r): name for r, name in condition["names"].items()}
    return report(ll, np.array([r for r, _ in reviews]), chars, prior, names)


def rating_prior(splits: dict, controls: dict[int, int]) -> np.ndarray:
    """P(r) of each rating of `controls` (in rating order): its share of the train split's rated reviews."""
    counts = np.array([splits["train"]["ratings"].get(str(r), 0) for r in sorted(controls)], dtype=float)
    return counts / counts.sum()


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
