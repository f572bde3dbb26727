"""Decoding many completions at once (continuous batching): each completion's token-level state (`Sampler`) and the
batch that takes all of them one token further per step over one KV cache (`Batch`); a completion joins between
steps and leaves when it ends. One completion alone is a batch of one (`alone`), so the API, the REPL, stage=generate
and the server all decode the same way."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch

from kr3.errors import UserError
from kr3.model import GPT, KVCache


class Sampler:
    """One completion, token by token: what its rows of the cache are given — each of `heads` (equal lengths: one, or
    a rating's [EOS, control] and the other ratings' for `guidance`) before the prompt, left-truncated to leave room
    in the context — and the choice of each next token from their logits (temperature 0: greedy; `banned` ids never).
    It ends at EOS (never chosen before `min_new_tokens`) or after `max_new_tokens`; `failed` holds what went wrong
    in it."""

    def __init__(self, prompt_ids: Sequence[int], max_new_tokens: int, eos_id: int, block_size: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
                 banned: Sequence[int] = (), heads: Sequence[Sequence[int]] = ((),), guidance: float = 1.0,
                 min_new_tokens: int = 0):
        self.heads = [list(h) for h in heads]
        room = block_size - 1 - len(self.heads[0])
        self.text = list(prompt_ids)[-room:] or ([] if self.heads[0] else [eos_id])  # the context, new tokens added
        self.given = list(self.text)
        self.max_new_tokens, self.eos_id, self.block_size, self.guidance = max_new_tokens, eos_id, block_size, guidance
        self.picking = (temperature, top_k, top_p, repetition_penalty, generator)  # decoder.choose reads them
        self.banned, self.min_new_tokens = list(banned), min_new_tokens
        self.new: list[int] = []
        self.rows: list[int] = []  # its rows in the batch's cache, heads[i]'s at rows[i]
        self.done, self.failed = False, None

    def never(self) -> list[int]:
        """The ids it may not take next: its banned ones, and EOS before `min_new_tokens`."""
        return self.banned if len(self.new) >= self.min_new_tokens else [*self.banned, self.eos_id]

    def context(self, refill: bool) -> list[list[int]]:
        """Its rows' tokens to prefill: the heads and the context, or once the context is full, the heads and its most
        recent half."""
        text = self.text[-(self.block_size // 2) :] if refill else self.text
        return [[*h, *text] for h in self.heads]

    def take(self, token: int) -> None:
        """The chosen next token: added, or the completion ends."""
        if token == self.eos_id:
            return self.end()
        self.new.append(token)
        self.text.append(token)
        self.took(token)
        if len(self.new) >= self.max_new_tokens:
            self.end()

    def took(self, token: int) -> None:
        """A new token was added (a subclass makes text of it)."""

    def end(self) -> None:
        self.done = True


def guided(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """The next token's logits of the first row; with more rows (the other ratings' contexts), its log-probabilities
    moved away from the mean of theirs by `guidance`: log p + (guidance − 1)(log p − mean log q), classifier-free
    guidance with the other ratings as the negative prompt."""
    if len(logits) == 1:
        return logits[0]
    logp = logits.log_softmax(-1)
    return logp[0] + (guidance - 1) * (logp[0] - logp[1:].mean(0))


def choose(samplers: list[Sampler], logits: torch.Tensor, rows: list[list[int]]) -> list[int | Exception]:
    """Each sampler's next token from its `rows` of `logits` (fp32), in one pass over all of them: guided, its banned
    ids (`never`) not, the repetition penalty on the tokens of its context, then greedy (temperature ≤ 0) or drawn from its
    own generator among its top_k / top_p tokens at its temperature. NaN scores are an error of that sampler (they
    come from NaN weights, so they show at the first token)."""
    if all(len(r) == 1 for r in rows):
        x = logits[[r[0] for r in rows]]
    else:
        x = torch.stack([guided(logits[r], s.guidance) for s, r in zip(samplers, rows, strict=True)])
    nan = torch.isnan(x).any(-1).tolist()
    every = lambda values: torch.tensor(values, dtype=x.dtype, device=x.device)  # noqa: E731 — a value per sampler
    banned = [(i, b) for i, s in enumerate(samplers) for b in s.never()]
    if banned:
        x[tuple(torch.tensor(banned, device=x.device).t())] = -float("inf")
    seen = [(i, t) for i, s in enumerate(samplers) if s.picking[3] != 1.0 for t in set(s.text)]
    if seen:
        at = tuple(torch.tensor(seen, device=x.device).t())
        vals, penalty = x[at], every([s.picking[3] for s in samplers])[at[0]]
        x[at] = torch.where(vals > 0, vals / penalty, vals * penalty)
    tokens = x.argmax(-1)
    drawn = [i for i, s in enumerate(samplers) if s.picking[0] > 0]
    if drawn:
        tokens[drawn] = draw([samplers[i] for i in drawn], x[drawn])
    error = UserError("the model's next-token scores are NaN: its weights are — use a checkpoint from before the run "
                      "diverged")
    return [error if bad and not s.new else t for s, bad, t in zip(samplers, nan, tokens.tolist(), strict=True)]


def draw(samplers: list[Sampler], x: torch.Tensor) -> torch.Tensor:
    """A token of each row of x (fp32 scores), drawn at each sampler's temperature among its top_k / top_p tokens."""
    temperature, top_k, top_p = (torch.tensor([s.picking[j] or 0 for s in samplers], dtype=kind, device=x.device)
                                 for j, kind in enumerate((torch.float64, torch.long, torch.float64)))
    # the candidates, most likely first: the top_k of each row (all tokens when a row has no top_k)
    k = top_k.clamp(max=x.size(-1))
    values, ids = x.topk(int(k.max()) if k.all() else x.size(-1), -1)
    # ≤ 0 and in fp64: a tiny temperature gives −inf or a finite number, never 0/0 or inf − inf
    values = (values.double() - values[:, :1]) / temperature[:, None]
    values[torch.arange(values.size(-1), device=x.device) >= torch.where(k > 0, k, x.size(-1))[:, None]] = -float("inf")
    probs = values.softmax(-1)
    p = torch.where((top_p > 0) & (top_p < 1), top_p, float("inf"))
    probs[probs.cumsum(-1) - probs > p[:, None]] = 0  # keep the smallest prefix reaching top_p
    # a uniform draw from each sampler's own generator, through its cumulative distribution: a seed gives the same
    # tokens whatever else is decoded beside it
    u = torch.cat([torch.rand(1, generator=s.picking[4], dtype=torch.float64) for s in samplers]).to(x.device)
    cdf = probs.cumsum(-1)
    at = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=values.size(-1) - 1)
    return ids.gather(1, at)[:, 0]


class Batch:
    """Completions decoded together over one KV cache, at most `max_rows` rows of it (a completion takes one per
    head). Each `step` either prefills — the prompts of the completions that joined since, right-padded into one
    forward, and the contexts of those whose context is full — or decodes: one token of every completion in one
    forward, each row at its own position. The two alternate while both have work, so joining never stalls the
    others for more than one step. A completion leaves when it ends; the cache's last rows move into its place, so
    the rows in use are always the first."""

    def __init__(self, model: GPT, max_rows: int):
        self.model, self.max_rows = model, max_rows
        weight = model.tok_emb.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.pad = next(i for i in range(model.cfg.vocab_size) if i not in model.cfg.controls)
        self.cache = KVCache(model.cfg, 0, self.device, self.dtype)
        self.owners: list[Sampler] = []  # the completion of each row in use
        self.active: list[Sampler] = []
        self.joining: deque[Sampler] = deque()
        self.prefilled = False

    @property
    def busy(self) -> bool:
        return bool(self.active or self.joining)

    def join(self, s: Sampler) -> None:
        """s is decoded from the next step on (once there is room for its rows)."""
        self.joining.append(s)

    def leave(self, s: Sampler) -> None:
        """s is decoded no more (its client left): its rows are freed."""
        if s in self.joining:
            self.joining.remove(s)
        elif s in self.active:
            self.free(s)
        s.end()

    @torch.no_grad()
    def step(self) -> list[Sampler]:
        """One step (see the class); the completions it moved on, those that ended already out of the batch."""
        fill = []
        if not (self.prefilled and self.active):
            fill = [s for s in self.active if int(self.cache.lengths[s.rows[0]]) >= self.model.cfg.block_size]
            fill += self.admit()
        self.prefilled = bool(fill)
        stepped = self.prefill(fill) if fill else self.decode() if self.active else []
        for s in stepped:
            if s.done and s in self.active:
                self.free(s)
        return stepped

    def admit(self) -> list[Sampler]:
        """Those joining that fit, in the order they came, each given its rows."""
        admitted = []
        while self.joining and (not self.owners or len(self.owners) + len(self.joining[0].heads) <= self.max_rows):
            s = self.joining.popleft()
            s.rows = list(range(len(self.owners), len(self.owners) + len(s.heads)))
            self.owners += [s] * len(s.heads)
            self.active.append(s)
            admitted.append(s)
        if len(self.owners) > self.cache.rows:
            self.cache.grow(min(max(len(self.owners), 2 * self.cache.rows), max(self.max_rows, len(self.owners))))
        return admitted

    def prefill(self, fill: list[Sampler]) -> list[Sampler]:
        seqs = [seq for s in fill for seq in s.context(refill=bool(s.new))]
        lengths = torch.tensor(list(map(len, seqs)))
        x = torch.full((len(seqs), int(lengths.max())), self.pad, dtype=torch.long)
        for i, seq in enumerate(seqs):
            x[i, : len(seq)] = torch.tensor(seq)
        fresh = KVCache(self.model.cfg, len(seqs), self.device, self.dtype, length=x.size(1))
        hidden = self.model(x.to(self.device), cache=fresh, hidden=True)
        logits = self.model.head(hidden[torch.arange(len(seqs)), lengths.to(self.device) - 1]).float()
        self.cache.put([r for s in fill for r in s.rows], fresh, lengths)
        starts = [0, *torch.tensor([len(s.heads) for s in fill]).cumsum(0).tolist()]
        return self.choose(fill, logits, [list(range(a, b)) for a, b in zip(starts, starts[1:])])

    def decode(self) -> list[Sampler]:
        tokens = torch.tensor([[s.text[-1]] for s in self.owners], device=self.device)
        logits = self.model(tokens, cache=self.cache)[:, -1].float()
        return self.choose(self.active, logits, [s.rows for s in self.active])

    def choose(self, group: list[Sampler], logits: torch.Tensor, rows: list[list[int]]) -> list[Sampler]:
        """Each of `group` takes its next token, chosen from its `rows` of `logits`; one that fails fails alone."""
        for s, token in zip(group, choose(group, logits, rows), strict=True):
            try:
                if isinstance(token, Exception):
                    raise token
                s.take(token)
            except Exception as e:  # noqa: BLE001 — given to its consumer, which raises it
                s.failed = e
                s.end()
        return list(group)

    def free(self, s: Sampler) -> None:
        for r in sorted(s.rows, reverse=True):
            last = len(self.owners) - 1
            if r != last:
                self.cache.move(last, r)
                moved = self.owners[r] = self.owners[last]
                moved.rows[moved.rows.index(last)] = r
            self.owners.pop()
        self.active.remove(s)
        s.rows = []


def alone(model: GPT, s: Sampler) -> Iterator[None]:
    """Decode s by itself, yielding after each step (a generator: nothing runs before its first item is asked for)."""
    batch = Batch(model, len(s.heads))
    batch.join(s)
    while not s.done:
        batch.step()
        if s.failed:
            raise s.failed
        yield
