"""A decoder-only transformer with an optional KV cache for generation, in one of two block styles (`arch`):
- gpt2: GPT-2's block — learned positions, pre-LayerNorm, tanh-GELU MLP, biases (stage=export writes GPT-2);
- llama: a Llama-style block — rotary positions, RMSNorm, SwiGLU MLP, no biases (stage=export writes Llama).
Both tie the output layer to the token table.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from kr3.errors import UserError

ARCHS = ("gpt2", "llama")
ROPE_THETA = 10000.0  # rotary's base (Llama's)


@dataclass
class GPTConfig:
    """The model's shape. Values come from conf/model/*.yaml (`from_cfg`) or a checkpoint; a new field
    gets a default here that means "as before", so older checkpoints still load."""

    vocab_size: int
    n_layers: int
    n_heads: int
    d_model: int
    d_ffn: int
    block_size: int
    dropout: float = 0.0
    bias: bool = True
    controls: tuple[int, ...] = ()  # rating control token ids: the latest one's embedding joins every later position
    norm_eps: float = 1e-5  # the norms' epsilon (torch's default; a pretrained model brings its own)
    arch: str = "gpt2"  # gpt2 | llama (the module docstring)

    @classmethod
    def from_cfg(cls, model_cfg, vocab_size: int, controls: tuple[int, ...] = ()) -> GPTConfig:
        """From the `model` config group; the vocabulary comes from the prepared data, and so do the rating
        control tokens when the data is rating-conditioned and `model.rating_embedding` is on. `model.bias` null is
        the arch's own: GPT-2 has biases, Llama none."""
        shape = {f.name: getattr(model_cfg, f.name) for f in fields(cls) if hasattr(model_cfg, f.name)}
        if shape.get("bias") is None:
            shape["bias"] = shape.get("arch", "gpt2") == "gpt2"
        on = getattr(model_cfg, "rating_embedding", False)
        return cls(vocab_size=vocab_size, controls=tuple(controls) if on else (), **shape)

    def __post_init__(self):
        for key in ("vocab_size", "n_layers", "n_heads", "d_model", "d_ffn", "block_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model.{key}={value} must be a positive integer")
        if self.d_model % self.n_heads:
            raise UserError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads} "
                f"— pick n_heads from {[h for h in range(1, 33) if self.d_model % h == 0]}"
            )
        self.controls = tuple(int(i) for i in self.controls)
        if self.arch not in ARCHS:
            raise UserError(f"model.arch={self.arch} is not one of {' | '.join(ARCHS)}")
        if self.arch == "llama" and (self.d_model // self.n_heads) % 2:
            raise UserError(f"model.arch=llama rotates pairs of each head's {self.d_model // self.n_heads} dimensions — "
                            "pick d_model and n_heads with an even d_model / n_heads")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of the tokens each row has seen, one (rows, H, block_size, D) pair per layer, preallocated;
    `lengths` (rows,) how many tokens each row holds, `control` (rows,) the latest control token id each row has seen
    (-1: none). A forward with B rows of input uses the first B rows, each continuing from its own length."""

    def __init__(self, cfg: GPTConfig, batch: int, device, dtype, length: int | None = None):
        self.cfg, self.rows, self.length = cfg, batch, length or cfg.block_size  # room for `length` tokens a row
        shape = (batch, cfg.n_heads, self.length, cfg.d_model // cfg.n_heads)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long)  # on the CPU: read to shape each forward
        self.control = torch.full((batch,), -1, dtype=torch.long, device=device)

    def grow(self, rows: int) -> None:
        """Room for `rows` rows, keeping those held."""
        more = rows - self.rows
        self.k = [torch.cat([k, k.new_zeros(more, *k.shape[1:])]) for k in self.k]
        self.v = [torch.cat([v, v.new_zeros(more, *v.shape[1:])]) for v in self.v]
        self.lengths = torch.cat([self.lengths, self.lengths.new_zeros(more)])
        self.control = torch.cat([self.control, self.control.new_full((more,), -1)])
        self.rows = rows

    def put(self, rows: list[int], other: KVCache, lengths: torch.Tensor) -> None:
        """Rows `rows` become other's rows, each of which holds `lengths` tokens."""
        n, index = int(lengths.max()), torch.tensor(rows, device=self.control.device)
        for mine, theirs in ((self.k, other.k), (self.v, other.v)):
            for a, b in zip(mine, theirs, strict=True):
                a[index, :, :n] = b[:, :, :n]
        self.lengths[rows] = lengths
        self.control[index] = other.control

    def move(self, src: int, dst: int) -> None:
        """Row dst becomes a copy of row src (the tokens it holds)."""
        n = int(self.lengths[src])
        for layer in (*self.k, *self.v):
            layer[dst, :, :n] = layer[src, :, :n]
        self.lengths[dst] = self.lengths[src]
        self.control[dst] = self.control[src]


class CacheStep:
    """Where one forward's T new tokens go in the first B rows of a KVCache (each row after the tokens it holds), and
    which keys each new token may see: those of its row up to itself."""

    def __init__(self, cache: KVCache, B: int, T: int, device):
        lengths = cache.lengths[:B]
        lo, hi = int(lengths.min()), int(lengths.max())
        if hi + T > cache.length:
            raise ValueError(f"sequence of {hi + T} tokens exceeds block_size={cache.length}")
        self.cache, self.B, self.T, self.end = cache, B, T, hi + T
        self.start = lo if lo == hi else None  # every row at the same length: slices, and the plain causal mask
        if self.start is not None:
            self.positions = torch.arange(lo, lo + T, device=device)
            self.mask = torch.ones(T, lo + T, dtype=torch.bool, device=device).tril(lo) if T > 1 and lo else None
        else:
            self.positions = (lengths[:, None] + torch.arange(T)).to(device)
            self.mask = torch.arange(self.end, device=device) <= self.positions[:, None, :, None]
        self.causal = self.start == 0 and T > 1

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, T, D) written to the cache; the keys and values the new tokens attend to."""
        ck, cv = self.cache.k[layer][: self.B], self.cache.v[layer][: self.B]
        if self.start is not None:
            ck[:, :, self.start : self.end], cv[:, :, self.start : self.end] = k, v
        else:
            rows = torch.arange(self.B, device=k.device)[:, None]
            ck[rows, :, self.positions], cv[rows, :, self.positions] = k.transpose(1, 2), v.transpose(1, 2)
        return ck[:, :, : self.end], cv[:, :, : self.end]


def rotary(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of rotary's angles at `positions` ((T,) or per row (B, T)), shaped to broadcast over (B, H, T, D):
    frequencies ROPE_THETA^(-2i/D), each used by dimensions i and i + D/2 (transformers' Llama layout), in fp32."""
    inv_freq = ROPE_THETA ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], -1)
    if angles.dim() == 3:  # per row: (B, 1, T, D)
        angles = angles[:, None]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) with each pair of dimensions (i, i + D/2) rotated by its angle, in x's dtype."""
    x1, x2 = x.chunk(2, -1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.dtype)


FP32_ATTENTION_UP_TO = 512  # keys: on a CPU, bf16 attention is slower than fp32 below this (BENCHMARKS.md, the CPU step)


def attention(q, k, v, **kwargs) -> torch.Tensor:
    """scaled_dot_product_attention; on a CPU under bf16, in fp32 over short contexts, where torch's bf16 kernel is
    the slower one (2.9x at 64 keys, 1.2x at 256; 0.85x at 1,024: bench/attention_kernel.py)."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or k.size(-2) > FP32_ATTENTION_UP_TO:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual = True
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, at: CacheStep | None = None, layer: int = 0, rope: tuple | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if at is None:
            y = attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            k, v = at.store(layer, k, v)
            y = attention(q, k, v, attn_mask=at.mask, is_causal=at.causal)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ffn, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ffn, cfg.d_model, bias=cfg.bias)
        self.proj.residual = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """Llama's MLP: proj(silu(gate(x)) · fc(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ffn, bias=cfg.bias)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ffn, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ffn, cfg.d_model, bias=cfg.bias)
        self.proj.residual = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.silu(self.gate(x)) * self.fc(x)))


def norm(cfg: GPTConfig) -> nn.Module:
    """GPT-2's LayerNorm or Llama's RMSNorm."""
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = norm(cfg)
        self.attn = SelfAttention(cfg)
        self.ln2 = norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.arch == "llama" else MLP(cfg)

    def forward(self, x, at: CacheStep | None = None, layer: int = 0, rope: tuple | None = None):
        x = x + self.attn(self.ln1(x), at, layer, rope)
        return x + self.mlp(self.ln2(x))


CE_CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MiB in fp32


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against `targets`, a chunk of rows at a time, so that the
    (tokens, vocab) logits, their log-softmax and its gradient never exist whole: on a CPU, a step as fast
    as with torch's cross-entropy in a third less memory (BENCHMARKS.md). The gradients need the same
    softmax, so forward computes them and backward only scales them."""

    @staticmethod
    def forward(ctx, h, weight, targets, need_grad: bool):
        n = len(h)
        chunk = max(1, CE_CHUNK_ELEMENTS // weight.size(0))
        dtype = torch.promote_types(h.dtype, torch.float32)  # the softmax's: fp32 at least, also under autocast
        total = torch.zeros((), dtype=dtype, device=h.device)
        gh = torch.empty_like(h) if need_grad else None
        gw = torch.zeros_like(weight) if need_grad else None
        # the products in autocast's dtype, as autocast would run them, with each operand cast once, not per product
        kind = h.device.type
        autocasting = kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind)  # meta, for one, has no autocast
        mm = torch.get_autocast_dtype(kind) if autocasting else h.dtype
        hm, wm = h.to(mm), weight.to(mm)
        with torch.autocast(kind, enabled=False) if autocasting else nullcontext():
            for s in range(0, n, chunk):
                hc, tc = hm[s : s + chunk], targets[s : s + chunk]
                logp = torch.log_softmax(hc @ wm.t(), 1, dtype=dtype)
                rows = torch.arange(len(hc), device=h.device)
                total -= logp[rows, tc].sum()
                if need_grad:  # d loss_sum / d logits = softmax − one-hot
                    p = logp.exp_()
                    p[rows, tc] -= 1
                    p = p.to(mm)
                    gh[s : s + chunk] = p @ wm
                    gw += p.t() @ hc
        ctx.n = n
        if need_grad:
            ctx.save_for_backward(gh, gw)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        gh, gw = ctx.saved_tensors
        scale = grad / ctx.n
        return gh * scale, gw * scale, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(h @ weight.T, targets)` (mean over rows) without materializing the logits. Every
    target is a class in [0, vocab): no ignore_index, no label smoothing."""
    if targets.shape != h.shape[:1]:
        raise ValueError(f"{len(h)} rows of hidden states but targets of shape {tuple(targets.shape)}")
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, need_grad)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.arch == "gpt2" else None  # llama: rotary
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied
        # a buffer, so it moves with the model: no host-to-device copy in the training step
        self.register_buffer("control_ids", torch.tensor(cfg.controls, dtype=torch.long), persistent=False)
        self.apply(self._init)

    def _init(self, m):
        if isinstance(m, nn.Linear):
            # GPT-2: residual projections scaled down by depth so the residual stream starts small
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if getattr(m, "residual", False) else 0.02
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, targets=None, cache: KVCache | None = None, hidden: bool = False):
        """Logits (B, T, V), or the mean cross-entropy when `targets` is given (then the logits are never whole),
        or with `hidden` the final hidden states (B, T, C) that the head turns into logits. With a cache, `idx`
        holds only the new tokens of the cache's first B rows, each continuing from its row's length."""
        B, T = idx.shape
        at = CacheStep(cache, B, T, idx.device) if cache is not None else None
        if at is None and T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.cfg.block_size}")
        positions = at.positions if at else torch.arange(T, device=idx.device)
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = rotary(positions, self.cfg.d_model // self.cfg.n_heads)
        if self.cfg.controls:
            x = x + self.rating_embedding(idx, cache)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, at, i, rope)
        if cache is not None:
            cache.lengths[:B] += T
        x = self.ln_f(x)
        if hidden:
            return x
        if targets is None:
            return self.head(x)
        return linear_cross_entropy(x.view(B * T, -1), self.head.weight, targets.reshape(-1))

    def rating_embedding(self, idx, cache: KVCache | None):
        """At each position, the embedding of the latest control token at or before it (zero before any): every
        token of a rated review is given its rating directly, not only through attention — the model learns
        P(review | rating) much more sharply (BENCHMARKS.md, ratings as control). The cache keeps each row's."""
        T = idx.shape[1]
        at = torch.where(torch.isin(idx, self.control_ids), torch.arange(T, device=idx.device), -1).cummax(1).values
        latest = torch.where(at >= 0, idx.gather(1, at.clamp(min=0)), -1)
        if cache is not None:
            B = len(idx)
            latest = torch.where(latest >= 0, latest, cache.control[:B, None])
            cache.control[:B] = latest[:, -1]
        return torch.where((latest >= 0)[..., None], self.tok_emb(latest.clamp(min=0)), 0.0)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings or self.pos_emb is None else n - self.pos_emb.weight.numel()

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight plus attention's score/value matmuls."""
        c = self.cfg
        return 6 * self.num_params(embeddings=False) + 12 * c.n_layers * c.d_model * c.block_size

    def param_groups(self, weight_decay: float, embedding_lr_scale: float = 1.0,
                     muon_lr_scale: float | None = None) -> list[dict]:
        """Matrices decay; biases and LayerNorm gains do not. The token table (also the output layer) is a
        group of its own, without decay and with `lr_scale` × the learning rate (the trainer applies it):
        a row moves only when its token is seen, and small models learn far faster with a larger step
        there (BENCHMARKS.md, quality). With `muon_lr_scale`, the blocks' matrices form a last group marked
        `muon` (no decay, as measured) for kr3.optim.MuonAdamW; the position table stays with AdamW."""
        emb = self.tok_emb.weight
        mats = [p for p in self.blocks.parameters() if p.dim() == 2] if muon_lr_scale is not None else []
        taken = {id(emb)} | {id(p) for p in mats}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
                  {"params": [emb], "weight_decay": 0.0, "lr_scale": embedding_lr_scale}]
        if mats:
            groups.append({"params": mats, "weight_decay": 0.0, "lr_scale": muon_lr_scale, "muon": True})
        return groups
