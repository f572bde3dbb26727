"""GPT-2's layout (transformers' GPT2LMHeadModel) and kr3's GPT, both ways: the config and the weights. kr3's GPT is
GPT-2's architecture (learned positions, pre-LayerNorm, tanh-GELU MLP, tied embeddings), so both directions are exact:
stage=export writes a kr3 model as GPT-2, model=pretrained reads a GPT-2-family checkpoint (KoGPT2) as a kr3 model."""

from __future__ import annotations

from dataclasses import fields

import torch

from kr3.errors import UserError
from kr3.model import GPT, GPTConfig

CONFIG = "GPT2Config"  # transformers' config class
# GPTConfig fields GPT-2's config expresses (bias=false as zero biases: exactly what no bias computes). A later field
# missing here refuses the export when it is off its default, naming itself.
EXPRESSED = ("vocab_size", "n_layers", "n_heads", "d_model", "d_ffn", "block_size", "dropout", "bias", "norm_eps")
SWITCHES = {"controls": ("rating_embedding", "true", "false")}  # GPTConfig fields set by a model.* switch: its name, on, off
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's activation, as kr3's MLP computes it
# a GPT-2 config's settings whose other values compute something kr3's GPT does not: (key, the value kr3 computes)
SAME_AS_KR3 = (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
               ("add_cross_attention", False))
# transformers' GPT2Config defaults, for a config.json that leaves a value out, and the other names it takes
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
                 "activation_function": "gelu_new", "resid_pdrop": 0.1, "layer_norm_epsilon": 1e-5}
ALIASES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
           "max_position_embeddings": "n_positions", "n_ctx": "n_positions"}
GPT2_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
# keys a GPT-2 file may hold that are no weights of kr3's: causal-mask buffers, and lm_head (tied to wte)
NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


def to_config(cfg: GPTConfig, eos_id: int) -> dict:
    """transformers' GPT2Config for kr3's shape; a field GPT-2 cannot express is one line naming model.<field>."""
    for f in fields(GPTConfig):
        if f.name not in EXPRESSED and getattr(cfg, f.name) != f.default:
            key, on, off = SWITCHES.get(f.name, (f.name, getattr(cfg, f.name), f.default))
            raise UserError(f"model.{key}={on} has no GPT-2 equivalent, so this checkpoint cannot be exported to "
                            f"transformers — export one trained with model.{key}={off}")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.d_ffn, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "tie_word_embeddings": True,
            "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}


def from_config(config: dict, where: str) -> dict:
    """The GPTConfig fields of a GPT-2 config.json (`where` names it in errors) — its shape, LayerNorm epsilon and
    dropout — and `positions`, how many it learned; another architecture, or GPT-2 computing something kr3 does not,
    is one line."""
    kind, archs = config.get("model_type"), config.get("architectures") or []
    old_gpt2 = kind is None and archs and set(archs) <= set(GPT2_ARCHITECTURES)  # written before configs named their type
    if kind != "gpt2" and not old_gpt2:
        what = f"a {kind} model" if kind else "a model of no model_type"
        raise UserError(f"{where} is {what} ({', '.join(archs) or 'no architectures'}) — model=pretrained reads "
                        "GPT-2-family checkpoints (model_type gpt2, GPT2LMHeadModel), such as skt/kogpt2-base-v2 or "
                        "skt/ko-gpt-trinity-1.2B-v0.5; GPT-NeoX, Llama and GPT-J are other architectures")
    config = {**GPT2_DEFAULTS, **{ALIASES.get(k, k): v for k, v in config.items() if ALIASES.get(k) not in config}}
    activation = config["activation_function"]
    if activation not in TANH_GELU:
        raise UserError(f"{where} uses activation_function={activation}; kr3's GPT computes GPT-2's tanh GELU "
                        f"({' or '.join(TANH_GELU)}) only")
    for key, ours in SAME_AS_KR3:
        if config.get(key, ours) != ours:
            raise UserError(f"{where} sets {key}={config[key]}; kr3's GPT computes GPT-2's default ({key}={ours}) only")
    d_model = config["n_embd"]
    return {"vocab_size": config["vocab_size"], "n_layers": config["n_layer"], "n_heads": config["n_head"],
            "d_model": d_model, "d_ffn": config["n_inner"] or 4 * d_model, "norm_eps": config["layer_norm_epsilon"],
            "dropout": config["resid_pdrop"], "positions": config["n_positions"]}


def layout(n_layers: int) -> list[tuple[str, str, bool]]:
    """(GPT-2's name, kr3's name, whether GPT-2 keeps it transposed — Conv1D's (in, out)) for every weight."""
    pairs = [("wte.weight", "tok_emb.weight", False), ("wpe.weight", "pos_emb.weight", False),
             ("ln_f.weight", "ln_f.weight", False), ("ln_f.bias", "ln_f.bias", False)]
    for i in range(n_layers):
        for theirs, ours, conv in (("ln_1", "ln1", False), ("attn.c_attn", "attn.qkv", True), ("attn.c_proj", "attn.proj", True),
                                   ("ln_2", "ln2", False), ("mlp.c_fc", "mlp.fc", True), ("mlp.c_proj", "mlp.proj", True)):
            pairs += [(f"h.{i}.{theirs}.weight", f"blocks.{i}.{ours}.weight", conv),
                      (f"h.{i}.{theirs}.bias", f"blocks.{i}.{ours}.bias", False)]
    return [(f"transformer.{theirs}", ours, conv) for theirs, ours, conv in pairs]


def to_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """kr3's weights under GPT-2's names, fp32: Linear weights transposed into Conv1D's layout, and zero biases where
    kr3 has none (model.bias=false). lm_head is left out: transformers ties it to wte."""
    ours = model.state_dict()
    state = {}
    for theirs, name, conv in layout(model.cfg.n_layers):
        if name in ours:
            state[theirs] = ours[name].t() if conv else ours[name]
        else:  # a bias kr3 does not have: as long as its weight's output
            state[theirs] = torch.zeros(ours[name.removesuffix("bias") + "weight"].shape[0])
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def from_state_dict(tensors: dict[str, torch.Tensor], cfg: GPTConfig, where: str,
                    fresh: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """A GPT-2 checkpoint's weights as kr3's state_dict for `cfg`: Conv1D weights transposed back, the first
    `block_size` positions, and the token table grown to `cfg.vocab_size`, its new rows and those of the `fresh` ids
    (rating control tokens) starting as the mean embedding. GPT2Model's files (no `transformer.` prefix) read too; a
    weight kr3 has no place for, or a missing one, is one line."""
    tensors = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in tensors.items()}
    names = layout(cfg.n_layers)
    missing = [theirs for theirs, _, _ in names if theirs not in tensors]
    unknown = sorted(set(tensors) - {theirs for theirs, _, _ in names} - {k for k in tensors if k.endswith(NOT_WEIGHTS)})
    if missing or unknown:
        raise UserError(f"{where} is not GPT-2's layout ({'no ' + ', '.join(missing[:3]) if missing else ''}"
                        f"{'; ' if missing and unknown else ''}{'also ' + ', '.join(unknown[:3]) if unknown else ''}) — "
                        "give a GPT2LMHeadModel checkpoint")
    check_tied(tensors, where)
    state = {ours: (tensors[theirs].t() if conv else tensors[theirs]).float() for theirs, ours, conv in names}
    if len(state["pos_emb.weight"]) < cfg.block_size:
        raise UserError(f"model.block_size={cfg.block_size} is longer than the {len(state['pos_emb.weight'])} positions "
                        f"{where} holds — use model.block_size={len(state['pos_emb.weight'])} or less")
    state["pos_emb.weight"] = state["pos_emb.weight"][: cfg.block_size]
    state["tok_emb.weight"] = with_rows(state["tok_emb.weight"], cfg.vocab_size, fresh)
    state["head.weight"] = state["tok_emb.weight"]  # tied, as GPT-2's lm_head is to wte
    return {k: v.contiguous() for k, v in state.items()}


def check_tied(tensors: dict[str, torch.Tensor], where: str) -> None:
    head = tensors.get("lm_head.weight")
    if head is not None and not torch.equal(head, tensors["transformer.wte.weight"]):
        raise UserError(f"{where} has an output layer (lm_head) of its own, not tied to its token table — kr3's GPT "
                        "ties them, as GPT-2 does")


def with_rows(table: torch.Tensor, rows: int, fresh: tuple[int, ...]) -> torch.Tensor:
    """`table` grown to `rows`, the new rows and those of the `fresh` ids (tokens the model never saw: rating controls,
    which may take a model's spare rows) each the mean of the rows below them — a token read as an average one."""
    first = min([*fresh, len(table)])
    grown = torch.cat([table, table.new_empty(max(0, rows - len(table)), table.shape[1])])
    grown[[*fresh, *range(len(table), rows)]] = table[:first].mean(0)
    return grown
