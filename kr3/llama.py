"""transformers' Llama layout (LlamaForCausalLM) for kr3's model.arch=llama, config and weights: the same block —
rotary positions over the two halves of each head (transformers' rotate_half), RMSNorm, SwiGLU, tied embeddings — so
stage=export writes a model whose logits are kr3's."""

from __future__ import annotations

from dataclasses import fields

import torch

from kr3.errors import UserError
from kr3.model import GPT, ROPE_THETA, GPTConfig

CONFIG = "LlamaConfig"  # transformers' config class
# GPTConfig fields Llama's config expresses; another one off its default refuses the export, naming itself
EXPRESSED = ("vocab_size", "n_layers", "n_heads", "d_model", "d_ffn", "block_size", "dropout", "bias", "norm_eps", "arch")


def to_config(cfg: GPTConfig, eos_id: int) -> dict:
    """transformers' LlamaConfig for kr3's shape."""
    for f in fields(GPTConfig):
        if f.name not in EXPRESSED and getattr(cfg, f.name) != f.default:
            key = "rating_embedding" if f.name == "controls" else f.name
            raise UserError(f"model.{key} has no Llama equivalent, so this checkpoint cannot be exported to "
                            f"transformers — export one trained without it")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ffn, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
            "head_dim": cfg.d_model // cfg.n_heads, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": ROPE_THETA, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
            "attention_dropout": cfg.dropout, "tie_word_embeddings": True,
            "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}


def to_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """kr3's weights under Llama's names, fp32: the fused qkv matrix split into q, k and v. lm_head is left out:
    transformers ties it to embed_tokens."""
    ours, C = model.state_dict(), model.cfg.d_model
    state = {"model.embed_tokens.weight": ours["tok_emb.weight"], "model.norm.weight": ours["ln_f.weight"]}
    for i in range(model.cfg.n_layers):
        mine, theirs = f"blocks.{i}.", f"model.layers.{i}."
        state[theirs + "input_layernorm.weight"] = ours[mine + "ln1.weight"]
        state[theirs + "post_attention_layernorm.weight"] = ours[mine + "ln2.weight"]
        for kind in ("weight", "bias") if model.cfg.bias else ("weight",):
            q, k, v = ours[f"{mine}attn.qkv.{kind}"].split(C)
            pairs = {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v,
                     "self_attn.o_proj": ours[f"{mine}attn.proj.{kind}"], "mlp.gate_proj": ours[f"{mine}mlp.gate.{kind}"],
                     "mlp.up_proj": ours[f"{mine}mlp.fc.{kind}"], "mlp.down_proj": ours[f"{mine}mlp.proj.{kind}"]}
            state |= {f"{theirs}{name}.{kind}": tensor for name, tensor in pairs.items()}
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
