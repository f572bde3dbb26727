"""kr3 from Python: `kr3.load(checkpoint)` gives a `Model` that completes reviews, streams them, ranks the next
tokens and scores text. stage=generate (its REPL too) and stage=evaluate run on it, so a notebook gets what the
command line gets.

    >>> import kr3
    >>> m = kr3.load("latest")
    >>> m.complete("이 집 짜장면은", temperature=0)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import torch

from kr3 import checkpoint as kckpt
from kr3 import hardware, pretrained, ratings
from kr3.config import ROOT, default_block
from kr3.decoder import Batch
from kr3.errors import UserError
from kr3.sampling import DECODING, Completer, Generation, check_decoding, cleaned, cut_note, decoding
from kr3.scoring import batch_logprobs, last_logits, metrics, review_scores, token_loss
from kr3.settings import check_range

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from kr3.checkpoint import Checkpoint
    from kr3.model import GPT
    from kr3.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Options(TypedDict, total=False):
    """Decoding options; one left out takes `Model.defaults`' value (conf/config.yaml's `generate:` block)."""

    max_new_tokens: int  # at most this many new tokens
    min_new_tokens: int  # the end of the review is not chosen before this many
    temperature: float  # 0: greedy
    top_k: int | None  # sample from the k most likely tokens; 0 or None: off
    top_p: float | None  # sample from the smallest set reaching this probability; 1 or None: off
    repetition_penalty: float  # > 1 makes tokens already seen less likely
    stop: str | list[str] | None  # a completion ends before the first of these strings
    seed: int  # sample i of a call uses seed + i
    num_samples: int  # complete(): more than 1 returns a list
    rating: str | int | None  # a rating-conditioned checkpoint: "negative", "positive", "ambiguous" (or 0, 1, 2)
    guidance: float  # with a rating: > 1 steers away from the other ratings (classifier-free guidance); 1: off


@cache
def decoding_defaults() -> dict:
    """The `generate:` block of conf/config.yaml, its decoding options only: the one place they are written."""
    return decoding(default_block("generate"))


def decoding_options(options: Mapping, base: Mapping) -> dict:
    """`base` with `options` on top, checked: a misspelt option or a value out of range is one line."""
    unknown = [k for k in options if k not in DECODING]
    if unknown:
        raise UserError(f"{', '.join(unknown)} is not a decoding option — use {', '.join(DECODING)}")
    merged = {**base, **options}
    check_decoding(merged)
    return merged


class Model:
    """A kr3 checkpoint, loaded: `model` is the GPT (fp32 weights, eval mode, on `device`), `tokenizer` its tokenizer
    (`encode`, `decode`), `checkpoint` what the file holds and `path` the file; `defaults` are the decoding options a
    call leaves out. Prompts and texts are normalized as the training data was (`cleaned`)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, ckpt: Checkpoint, path: Path, device: torch.device,
                 dtype: torch.dtype, defaults: dict):
        self.model, self.tokenizer, self.checkpoint, self.path = model, tokenizer, ckpt, path
        self.device, self.dtype, self.defaults = device, dtype, defaults
        self.clean = ckpt.config["data"]["clean"]
        self._decoder_copy, self._decoder_of = None, None

    def __repr__(self) -> str:
        return f"kr3.Model({self.describe()})"

    def describe(self) -> str:
        """What is loaded, in one line: the file, its step, the model's size, where and in what it runs, and the
        pretrained model it was fine-tuned from."""
        base = pretrained.describe(self.base)
        return (f"checkpoint {self.path}: step {self.checkpoint.step}, {self.model.num_params() / 1e6:.2f}M parameters, "
                f"{self.device}, {str(self.dtype).replace('torch.', '')}" + (f"; fine-tuned from {base}" if base else ""))

    @property
    def base(self) -> dict | None:
        """The pretrained model the weights started from (name_or_path, folder, sha256 per file, license), or None."""
        return self.checkpoint.base

    def complete(self, prompt: str, **options: Unpack[Options]) -> str | list[str]:
        """The completion of `prompt` (the text after it), or a list of `num_samples` of them when that is above 1."""
        texts = [c["completion"] for c in self.completions(prompt, **options)]
        return texts if len(texts) > 1 else texts[0]

    def completions(self, prompt: str, **options: Unpack[Options]) -> list[dict]:
        """`num_samples` completions with their timing: prompt, sample, completion, prompt_tokens, tokens, seconds,
        first_token_s, tokens_per_s (stage=generate's JSONL rows)."""
        completer = self._completer(options)
        ids, total = completer.prompt_ids(prompt)
        if len(ids) < total:
            log.warning(cut_note(total, len(ids)))
        return [completer.complete(prompt, sample) for sample in range(int(completer.g.num_samples))]

    def stream(self, prompt: str, sample: int = 0, **options: Unpack[Options]) -> Iterator[str]:
        """The completion of `prompt` in pieces of text, as it is decoded; `sample` i is complete()'s i-th sample
        (seed + i). No piece of a stop string is ever yielded."""
        for piece in self.stream_with_stats(prompt, sample, **options):
            if isinstance(piece, str):
                yield piece

    def stream_with_stats(self, prompt: str, sample: int = 0, **options: Unpack[Options]) -> Iterator[str | dict]:
        """stream(), then one last item: the completion's stats {completion, prompt_tokens (as the model was given
        them: cleaned, cut to fit), tokens, seconds, first_token_s, tokens_per_s, given, ids} (a server's usage
        counts, finish reason and logprobs need them; `given` are the prompt's token ids as the model was given
        them after its head, `ids` the completion's). A generator: nothing runs before its first item is asked for,
        so the server's model thread does all of it."""
        yield from self._completer(options).stream(prompt, sample)

    def generation(self, prompt: str | list[int], sample: int = 0, **options: Unpack[Options]) -> Generation:
        """The completion of `prompt` (sample i: seed + i) to decode with others in a `batch()`: each step gives it
        what stream_with_stats() yields, which its `taken()` hands over."""
        return self._completer(options, self.model).generation(prompt, sample)  # the batch has the decoder

    def batch(self, max_rows: int = 64) -> Batch:
        """A kr3.decoder.Batch that decodes `generation()`s together (in `dtype`), at most `max_rows` rows at once."""
        return Batch(self._decoder(), max_rows)

    def next_tokens(self, prompt: str, k: int = 5, rating: str | int | None = None,
                    guidance: float | None = None) -> list[tuple[str, float]]:
        """The k most likely next tokens after `prompt` (in a review of `rating`, if given, steered by `guidance` or
        the default's) as (text they add, probability), most likely first; the end-of-review token is
        kr3.sampling.END_OF_REVIEW."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UserError(f"k={k} must be an integer ≥ 1")
        given = {"rating": rating} if guidance is None else {"rating": rating, "guidance": guidance}
        return self._completer(given).next_tokens(prompt, k)

    @property
    def ratings(self) -> list[str] | None:
        """The ratings a completion can be asked for (`rating=`), for a checkpoint trained with
        data.condition=rating; None otherwise."""
        condition = self.checkpoint.condition
        return list(condition.names.values()) if condition else None

    def given(self, prompt: str, rating: str | int | None = None) -> tuple[str, int, int]:
        """What the model is given of `prompt` (in a review of `rating`): its text — cleaned, and only its last tokens
        when it is longer than the context leaves room for — their count, and the prompt's."""
        ids, total = self._completer({"rating": rating}).prompt_ids(prompt)
        return self.tokenizer.decode(ids) if len(ids) < total else self.cleaned(prompt), len(ids), total

    def cleaned(self, prompt: str) -> str:
        """`prompt` as the model is given it: normalized like the training data (NFC, control characters, spaces)."""
        return cleaned(prompt, self.clean)

    def score(self, texts: str | Sequence[str], max_tokens: int | None = None, batch_size: int = 32,
              show_progress: bool = False) -> dict:
        """Loss (nats per token), perplexity and bits per character of reviews, each cleaned as in training and
        followed by the end-of-review token, read as one stream, as stage=evaluate scores a file; `tokens` is how many
        were scored (at most `max_tokens`; the bpc still divides by all the texts' characters). `review_loss` and
        `review_bpc`: the same reviews (those whole within `max_tokens`) each scored alone from its start, as a
        prompt is (kr3.scoring.review_scores)."""
        if not isinstance(texts, Iterable) or isinstance(texts, bytes | Mapping):  # a Series, an array: fine
            raise UserError(f"score() takes a review or a list of reviews, not {type(texts).__name__}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        reviews = [self.cleaned(t) for t in texts]
        if not any(reviews):
            raise UserError("score() got no text — give a review or a list of reviews")
        eos = self.tokenizer.eos_id
        tokens = np.fromiter((i for doc in self.tokenizer.encode_batch(reviews) for i in (*doc, eos)), dtype=np.int64)
        return self.score_tokens(tokens, sum(map(len, reviews)), max_tokens, batch_size, show_progress)

    def score_tokens(self, tokens: np.ndarray, chars: int, max_tokens: int | None = None, batch_size: int = 32,
                     show_progress: bool = False) -> dict:
        """score() of a token stream (reviews each followed by the end-of-review token) holding `chars` characters:
        {tokens, loss, ppl, bpc}, the first `max_tokens` scored."""
        check_range("score.max_tokens", max_tokens, "int | None", low=1)
        scored = tokens[: int(max_tokens)] if max_tokens else tokens
        eos = self.tokenizer.eos_id
        nats, n = token_loss(self.model, scored, eos, self.model.cfg.block_size, batch_size, self.device, self.dtype,
                             show_progress=show_progress)
        controls = self.checkpoint.condition.ids if self.checkpoint.condition else []
        reviews = review_scores(self.model, scored, eos, controls, self.tokenizer.decode, batch_size, self.device,
                                self.dtype)
        return {"tokens": n, **metrics(nats, n, len(tokens), chars), **reviews}

    def logprobs(self, ids: Sequence[int], top: int = 0, rating: str | int | None = None) -> list[dict]:
        """Each token of `ids` with the text it adds (see pieces) and its log-probability given the tokens before it
        (in a review of `rating`, if given) — None for the first, which has none before it — and, with `top`, the
        `top` most likely tokens there as (text, log-probability), most likely first: [{id, text, logprob, top}].
        Token ids, not text: a client's tokenization is scored as it is. Scored in the windows score() uses: ids
        [end of review, *review, end of review] give −score(review)'s nats in all."""
        return self.logprobs_of_many([ids], top, rating)[0]

    def logprobs_of_many(self, many: Sequence[Sequence[int]], top: int = 0, rating: str | int | None = None,
                         batch_size: int = 32) -> list[list[dict]]:
        """logprobs() of each of `many`, those that fit the context scored `batch_size` at a time."""
        completer = self._completer({"rating": rating})
        many = [[int(i) for i in ids] for ids in many]
        rows = [([*completer.heads[0], ids[0]], ids[1:]) for ids in many if ids]
        scored = iter(batch_logprobs(self._decoder(), rows, batch_size, self.device, self.dtype, top, completer.never))
        return [self._entries(ids, *next(scored), completer) if ids else [] for ids in many]

    def greedy_next_of_many(self, many: Sequence[Sequence[int]], rating: str | int | None = None,
                            batch_size: int = 32) -> list[int]:
        """The token greedy decoding picks first after each of `many` (token ids, cut as complete() cuts a prompt),
        `batch_size` at a time: what complete(ids, max_new_tokens=1, temperature=0) decodes, without guidance."""
        completer = self._completer({"rating": rating})
        head = completer.heads[0]
        seqs = [[*head, *(completer.prompt_ids([int(i) for i in ids])[0] or ([] if head else [self.tokenizer.eos_id]))]
                for ids in many]
        logits = last_logits(self._decoder(), seqs, batch_size, self.device, self.dtype)
        logits[:, completer.never] = -float("inf")
        return logits.argmax(-1).tolist()

    def _entries(self, ids: list[int], lp, top_ids, top_lp, completer: Completer) -> list[dict]:
        pieces = self.pieces(ids)
        entries = [{"id": ids[0], "text": pieces[0], "logprob": None, "top": None}]
        for i, (p, t, v) in enumerate(zip(lp.tolist(), top_ids.tolist(), top_lp.tolist(), strict=True), start=1):
            prefix = self.tokenizer.decode(ids[:i])
            entries.append({"id": ids[i], "text": pieces[i], "logprob": p,
                            "top": [(completer.token_text(ids[:i], c, prefix), q) for c, q in zip(t, v, strict=True)]})
        return entries

    def token_ids(self, text: str) -> list[int]:
        """The text's token ids as the tokenizer gives them (not cleaned), the end-of-review token's own text (its
        piece, e.g. </s>) read as its id: how a client writes where a review starts (the server's /tokenize)."""
        eos = self.tokenizer.eos_id
        parts = text.split(self.tokenizer.id_to_piece(eos))
        return [i for n, part in enumerate(parts) for i in ([eos] if n else []) + (self.tokenizer.encode(part) if part else [])]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The text each token of `ids` adds after the ones before it (a leading space kept), so that the pieces join
        to their text: a token holding part of a character (one byte of it) adds nothing, the one completing it
        the whole character; the end of review adds nothing."""
        ids, out, shown = [int(i) for i in ids], [], ""
        for i, token in enumerate(ids):
            text = self.tokenizer.decode(ids[: i + 1])
            whole = token != self.tokenizer.eos_id and text.startswith(shown) and not text.endswith("\ufffd")
            out.append(text[len(shown) :] if whole else "")
            shown = text if whole else shown
        return out

    def _completer(self, options: Mapping, model: GPT | None = None) -> Completer:
        settings = SimpleNamespace(**decoding_options(options, self.defaults))
        condition = self.checkpoint.condition
        control = ratings.control(settings.rating, condition)
        banned = condition.ids if condition else []
        return Completer(model or self._decoder(), self.tokenizer, settings, self.clean, control, banned)

    def _decoder(self) -> GPT:
        """The GPT that decodes: `model` itself in fp32, else a copy in `dtype`, so `model` keeps its fp32 weights.
        The copy is kept (with the model's train/eval mode of that moment) and made again when a weight tensor of
        `model` is replaced or changed in place through autograd-visible ops (optimizer.step, load_state_dict), so
        such a change is what decodes; a write through `.data` or by a fused optimizer is not seen — then call
        `refresh()`. Inference tensors keep no version: a model made under inference_mode is copied every call."""
        if self.dtype == torch.float32 and self.device.type != "cpu":
            return self.model
        weights = [*self.model.parameters(), *self.model.buffers()]
        if any(w.is_inference() for w in weights):
            return decoding_copy(self.model, self.dtype)
        stamp = [(w, w.data_ptr(), w.dtype, w.device, w._version) for w in weights]  # w held: no id is reused
        if not same_weights(stamp, self._decoder_of):
            self._decoder_copy, self._decoder_of = decoding_copy(self.model, self.dtype), stamp
        return self._decoder_copy

    def refresh(self) -> None:
        """Decode with `model`'s weights as they are now (see _decoder: only needed after writes it cannot see)."""
        self._decoder_copy, self._decoder_of = None, None


def decoding_copy(model: GPT, dtype: torch.dtype) -> GPT:
    """A copy of `model` in `dtype` to decode with. In fp32 on a CPU its matrices are stored transposed: the matmuls
    of a few rows that decoding makes run 2-5x faster so (BENCHMARKS.md, serving); the head then gets such a copy of
    the tied token table of its own, which embedding lookups keep reading row by row."""
    out = copy.deepcopy(model).to(dtype)
    if dtype == torch.float32 and out.tok_emb.weight.device.type == "cpu":
        out.head.weight = torch.nn.Parameter(out.head.weight.detach().clone())
        for layer in out.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.data = layer.weight.data.t().contiguous().t()
    return out


def same_weights(a: list[tuple], b: list[tuple] | None) -> bool:
    """Whether two stamps (tensor, address, dtype, device, version) name the same tensors, unchanged between them."""
    return b is not None and len(a) == len(b) and all(x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a, b))


def load(checkpoint: str | Path = "latest", device: str = "auto", precision: str = "auto",
         log_dir: str | Path | None = None, **defaults: Unpack[Options]) -> Model:
    """A checkpoint ready to use: a .pt file, a run folder (its best, else newest checkpoint) or "latest" (the run
    under `log_dir`, default the project folder kr3.config.ROOT, whose newest checkpoint was written last).
    `device`: auto, cpu or cuda; `precision`: auto, fp32 or bf16 (the weights stay fp32; decoding and scoring run
    in it). `defaults` replace conf/config.yaml's decoding defaults, e.g. load("latest", temperature=0)."""
    path = kckpt.locate(checkpoint, ROOT if log_dir is None else log_dir)
    dev = hardware.resolve_device(device)
    dtype = hardware.resolve_precision(precision, dev)
    settings = decoding_options(defaults, decoding_defaults())
    model, tokenizer, ckpt = kckpt.load_model(path, dev)
    return Model(model, tokenizer, ckpt, path, dev, dtype, settings)
