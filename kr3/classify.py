"""A rating-conditioned language model as a sentiment classifier (Bayes' rule): each review is scored under
every rating's control token, and the rating r maximizing P(review | r) · P(r) is its prediction. The same
scores give the bits per character of each rating's reviews (the control token's own loss left out)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kr3 import hardware
from kr3.console import progress


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
    condition = m.checkpoint.condition
    if not condition:
        return {}
    controls = condition.controls
    reviews = reviews_of(tokens, m.tokenizer.eos_id, controls)
    if not reviews:
        return {}
    # each review is scored in one window after [EOS, control]: a longer one is cut, and only what is scored counts
    texts = [t[: m.model.cfg.block_size - 1] for _, t in reviews]
    # reviews are short (about 19 tokens against windows of block_size): 4x evaluate.batch_size rows per pass
    ll = log_likelihoods(m.model, texts, controls, m.tokenizer.eos_id, 4 * batch_size, m.device, m.dtype)
    prior = condition.prior(m.checkpoint.data.splits)
    chars = np.array([len(m.tokenizer.decode(t)) for t in texts])
    return report(ll, np.array([r for r, _ in reviews]), chars, prior, condition.names)
