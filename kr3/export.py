"""A kr3 checkpoint as a Hugging Face transformers folder. kr3's model.arch=gpt2 is GPT-2's architecture (learned
positions, pre-LayerNorm, tanh-GELU MLP, tied embeddings) and model.arch=llama Llama's (kr3.llama), so the export is
exact: GPT2LMHeadModel or LlamaForCausalLM computes kr3's logits, and
the tokenizer (SentencePiece converted to a `tokenizers` BPE/Unigram with byte fallback, or the pretrained
tokenizer.json copied) gives kr3's ids. transformers and safetensors are the optional extra kr3[hf]."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from kr3 import gpt2, llama
from kr3.api import Model
from kr3.atomic import replacing_folder
from kr3.config import as_list
from kr3.errors import UserError
from kr3.model import GPT, GPTConfig

if TYPE_CHECKING:
    from kr3.tokenizer import Tokenizer

KR3_HUB_ID = "leey4n/KR3"
KR3_LICENSE = "cc-by-nc-sa-4.0"  # KR3's licence, which a model trained on it carries
SPM_TYPES = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "byte": 6}  # SentencePiece's piece types


def require_hf() -> None:
    """One line naming what to install when transformers or safetensors is missing."""
    missing = [name for name in ("transformers", "safetensors") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"stage=export needs {' and '.join(missing)} — pip install 'kr3[hf]' (in a checkout: "
                        "uv sync --extra hf)")


def save(m: Model, out: Path, license: str | None = None) -> Path:
    """Write `m` to `out` as a transformers folder: config.json, model.safetensors, generation_config.json (m's
    decoding defaults), the tokenizer files and a README.md model card; into a temp folder renamed at the end, which
    replaces a previous export there. `license` (a Hub licence id) overrides the card's: KR3's when trained on it."""
    require_hf()
    config = layout(m.model.cfg).to_config(m.model.cfg, m.tokenizer.eos_id)
    check_export_dir(Path(out))
    with replacing_folder(out) as tmp:
        write_model(m.model, config, tmp)
        write_generation_config(m.defaults, m.tokenizer.eos_id, tmp)
        write_tokenizer(m.checkpoint.tokenizer.files, m.tokenizer, m.model.cfg.block_size, tmp)
        (tmp / "README.md").write_text(model_card(m, license), encoding="utf-8")
    return Path(out)


def layout(cfg: GPTConfig):
    """The module that writes model.arch's transformers layout: kr3.gpt2 or kr3.llama."""
    return llama if cfg.arch == "llama" else gpt2


def write_model(model: GPT, config: dict, out: Path) -> None:
    import transformers
    from safetensors.torch import save_file

    kind = layout(model.cfg)
    getattr(transformers, kind.CONFIG)(**config).save_pretrained(out)
    save_file(kind.to_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    shutil.copymode(out / "config.json", out / "model.safetensors")  # safetensors writes 0600; readable as the rest


def write_generation_config(decoding: Mapping, eos_id: int, out: Path) -> None:
    """kr3's decoding defaults as transformers' (top_k/top_p off are 0/1 there; seed and num_samples are per call)."""
    from transformers import GenerationConfig

    settings = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
                "max_new_tokens": decoding["max_new_tokens"], "repetition_penalty": decoding["repetition_penalty"],
                "do_sample": decoding["temperature"] > 0}
    if settings["do_sample"]:
        settings |= {"temperature": decoding["temperature"], "top_k": decoding["top_k"] or 0,
                     "top_p": decoding["top_p"] or 1.0}
    if decoding["min_new_tokens"]:
        settings["min_new_tokens"] = decoding["min_new_tokens"]
    if stops := as_list(decoding["stop"]):
        settings["stop_strings"] = stops
    GenerationConfig(**settings).save_pretrained(out)


def write_tokenizer(files: Mapping[str, bytes], tok: Tokenizer, max_length: int, out: Path) -> None:
    """tokenizer.json (a pretrained tokenizer's own, copied; a SentencePiece model converted), tokenizer_config.json
    and special_tokens_map.json, so AutoTokenizer gives kr3's ids and decodes them to kr3's text."""
    if "tokenizer.json" in files:
        (out / "tokenizer.json").write_bytes(files["tokenizer.json"])
        config = json.loads(files.get("tokenizer_config.json", b"{}"))
    else:
        sentencepiece_to_tokenizers(files["spiece.model"]).save(str(out / "tokenizer.json"))
        # kr3 reads "</s>" in a review as text, as SentencePiece does, never as the end-of-review token
        config = {"unk_token": tok.id_to_piece(tok.sp.unk_id()), "split_special_tokens": True}
    eos = tok.id_to_piece(tok.eos_id)
    special = {"bos_token": eos, "pad_token": eos, **_special_tokens(config), "eos_token": eos}
    config |= {**special, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
               "clean_up_tokenization_spaces": False}  # its clean-up would change kr3's text (" ." → ".")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))


def _special_tokens(config: Mapping) -> dict:
    return {k: v for k, v in config.items() if k in ("bos_token", "pad_token", "unk_token") and v}


def sentencepiece_to_tokenizers(model_proto: bytes):
    """A kr3-trained SentencePiece model (BPE or unigram, identity normalization, byte fallback) as a `tokenizers`
    Tokenizer giving the same ids: BPE's merges are its pieces' splits ranked by the merged piece's score (how
    SentencePiece picks the pair to merge), unigram keeps the scores; spaces become ▁ with one in front. User-defined
    symbols (rating controls) keep their ids, which is how kr3 feeds them; written out in a text, SentencePiece
    matches them whole and this tokenizer does not."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    _check_convertible(proto)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk = next(p for p, _, kind in pieces if kind == SPM_TYPES["unknown"])
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == proto.trainer_spec.BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        model = models.BPE(vocab, _bpe_merges(pieces), unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback)
    else:
        model = models.Unigram(_unigram_vocab(pieces), proto.trainer_spec.unk_id, byte_fallback)
    tk = Tokenizer(model)
    prefix = proto.normalizer_spec.add_dummy_prefix
    # SentencePiece puts ▁ in front also of a text that starts with a space; Metaspace's own prefix would not
    tk.normalizer = normalizers.Sequence([*([normalizers.Prepend("▁")] if prefix else []), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1 if prefix else 0, 0)])
    tk.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, kind in pieces
                           if kind in (SPM_TYPES["unknown"], SPM_TYPES["control"])])
    return tk


def _check_convertible(proto) -> None:
    """SentencePiece settings the conversion does not reproduce (kr3 trains with none of them): one line each."""
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unsupported = {"a model_type other than bpe or unigram": spec.model_type not in (spec.BPE, spec.UNIGRAM),
                   f"normalization {norm.name}": bool(norm.precompiled_charsmap),
                   "remove_extra_whitespaces": norm.remove_extra_whitespaces,
                   "treat_whitespace_as_suffix": spec.treat_whitespace_as_suffix,
                   "split_by_whitespace=false": not spec.split_by_whitespace}
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise UserError(f"the checkpoint's SentencePiece tokenizer uses {', '.join(found)}, which the export does not "
                        "convert — export a model whose tokenizer stage=prepare trained (tokenizer=sentencepiece)")


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, ranked by the merged piece's score, highest first: SentencePiece's BPE
    merges the adjacent pair whose union is the best-scoring piece, leftmost first, as `tokenizers` does by rank."""
    scores = {p: score for p, score, kind in pieces if kind == SPM_TYPES["normal"]}
    ranked = sorted((p for p in scores if len(p) > 1), key=lambda p: -scores[p])  # stable: ties keep id order
    return [(p[:k], p[k:]) for p in ranked for k in range(1, len(p)) if p[:k] in scores and p[k:] in scores]


def _unigram_vocab(pieces: list[tuple[str, float, int]]) -> list[tuple[str, float]]:
    """(piece, score). SentencePiece never matches a control, unknown or byte piece ("</s>", "<0xEC>") in text;
    `tokenizers` does, so they score far below every other piece here. (The unknown-character penalty moves with them,
    which changes nothing: an unknown character is in no piece, so every segmentation pays it. Only such a string
    written out of characters the vocabulary lacks still becomes its piece.)"""
    floor = min(score for _, score, kind in pieces if kind == SPM_TYPES["normal"]) - 1000
    hidden = (SPM_TYPES["control"], SPM_TYPES["unknown"], SPM_TYPES["byte"])
    return [(p, floor if kind in hidden else score) for p, score, kind in pieces]


def check_export_dir(out: Path) -> None:
    """An existing export.dir is replaced only when it is empty or an earlier export."""
    if out.is_file():
        raise UserError(f"export.dir={out} is a file — give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "model.safetensors").is_file():
        raise UserError(f"export.dir={out} holds other files — give a new or empty folder (an earlier export there "
                        "is replaced)")


def trained_on_kr3(data_cfg: Mapping) -> bool:
    """Whether the run's `data` config is KR3 from the Hub (data=kr3): then the model carries KR3's licence."""
    return data_cfg.get("name") == "kr3" or (data_cfg.get("source") == "hub" and data_cfg.get("hub_id") == KR3_HUB_ID)


def model_card(m: Model, license: str | None = None) -> str:
    """README.md: what the model was trained on, its size, its val bits per character, how it was trained, how to
    use it, and its licence (KR3's, CC BY-NC-SA 4.0, when trained on KR3)."""
    c, cfg = m.checkpoint, m.model.cfg
    data = c.config["data"]
    kr3 = trained_on_kr3(data)
    license = license or card_license(kr3, c.base)
    hub_base = [f"base_model: {c.base['name_or_path']}"] if c.base and c.base.get("hub") else []
    front = ["---", "language: ko", f"license: {license}", "library_name: transformers", "pipeline_tag: text-generation",
             f"tags: [kr3, {cfg.arch}, korean, reviews]", *([f"datasets: [{KR3_HUB_ID}]"] if kr3 else []), *hub_base, "---", ""]
    how = f"fine-tuned from {c.base['name_or_path']}" if c.base else "trained"
    return "\n".join([*front, f"# kr3 GPT: Korean restaurant reviews ({m.model.num_params() / 1e6:.1f}M parameters)", "",
                      f"A {ARCH_NAMES[cfg.arch]} architecture language model {how} with kr3 to complete Korean "
                      "restaurant reviews, exported from its checkpoint with `kr3 stage=export`: transformers computes "
                      "the logits kr3 does and the tokenizer gives kr3's token ids.", "",
                      *_card_data(c, data, m.tokenizer), *_card_model(cfg, m.tokenizer), *_card_base(c.base),
                      *_card_eval(c), *_card_training(c, cfg), *_card_usage(), *_card_license(license, kr3, c.base)])


def card_license(kr3: bool, base: dict | None) -> str:
    """The card's licence id: KR3's for a model trained on it, the base model's for one fine-tuned from it; one id
    when they agree, else `other` (the Licence section names each)."""
    ids = {KR3_LICENSE} if kr3 else set()
    if base and base.get("license"):
        ids.add(base["license"])
    return ids.pop() if len(ids) == 1 else "other"




def _card_data(c, data: Mapping, tok: Tokenizer) -> list[str]:
    source = f"[{data['hub_id']}](https://huggingface.co/datasets/{data['hub_id']})" if data.get("source") == "hub" \
        else f"a local file, `{Path(str(data.get('path'))).name}`"
    splits = [f"- {name}: {s['reviews']:,} reviews, {s['tokens']:,} tokens, {s['chars']:,} characters"
              for name, s in c.data.splits.items()]
    clean = ", ".join(f"{k}={v}" for k, v in data.get("clean", {}).items())
    return ["## Data", "", f"Reviews from {source}, cleaned ({clean}), each followed by the end-of-review token "
            f"`{tok.id_to_piece(tok.eos_id)}`:", "", *splits, ""]


def _card_model(cfg: GPTConfig, tok: Tokenizer) -> list[str]:
    block = ("Rotary positions, pre-RMSNorm, SwiGLU MLP, " + ("biases, " if cfg.bias else "no biases, ")
             if cfg.arch == "llama" else "Learned positions, pre-LayerNorm, tanh-GELU MLP, ")
    zero = "" if cfg.bias or cfg.arch == "llama" else "; kr3's model.bias=false is exported as zero biases, which " \
        "compute exactly what no bias does"
    return ["## Model", "", f"{cfg.n_layers} layers, {cfg.n_heads} heads, d_model {cfg.d_model}, d_ffn {cfg.d_ffn}, "
            f"context {cfg.block_size} tokens; a {tok.kind} tokenizer of {tok.vocab_size:,} tokens. {block}tied "
            f"embeddings{zero}.", ""]


ARCH_NAMES = {"gpt2": "GPT-2 (GPT2LMHeadModel)", "llama": "Llama (LlamaForCausalLM)"}


def _card_base(base: dict | None) -> list[str]:
    if not base:
        return []
    name = base["name_or_path"]
    shown = f"[{name}](https://huggingface.co/{name})" if base.get("hub") else f"`{name}`"
    digests = ", ".join(f"`{file}` sha256 `{digest}`" for file, digest in base["sha256"].items())
    return ["## Base model", "", f"Fine-tuned from {shown}: its weights ({digests}) were the starting point, and its "
            "tokenizer is this model's.", ""]


def _card_eval(c) -> list[str]:
    if not c.val:
        return ["## Evaluation", "", f"Not evaluated at step {c.step}: `kr3 stage=evaluate checkpoint=...` scores it.", ""]
    return ["## Evaluation", "", f"On the held-out val split at step {c.step}: loss {c.val['loss']:.4f} nats/token, "
            f"perplexity {c.val['ppl']:.2f}, **{c.val['bpc']:.4f} bits per character** (loss × tokens / characters / "
            "ln 2: comparable across tokenizers).", ""]


def _card_training(c, cfg: GPTConfig) -> list[str]:
    t = c.config.get("trainer", {})
    windows = (c.data.position or {}).get("windows_per_step")
    seen = f", about {c.step * windows * cfg.block_size:,} tokens" if windows else ""
    return ["## Training", "", f"{c.step:,} steps{seen}: {t.get('optimizer', 'adamw')}, peak learning rate "
            f"{t.get('lr')}, {t.get('warmup_steps')} warmup steps then cosine, batch {t.get('batch_size')} × "
            f"{t.get('grad_accum')} accumulation per process, precision {t.get('precision')}, seed {c.config.get('seed')}; "
            f"torch {c.torch_version or 'unknown'}.", ""]


def _card_usage() -> list[str]:
    return ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'tok = AutoTokenizer.from_pretrained("PATH_OR_HUB_ID")',
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_HUB_ID")',
            'ids = tok("이 집 짜장면은", return_tensors="pt").input_ids',
            "print(tok.decode(model.generate(ids, max_new_tokens=40)[0], skip_special_tokens=True))", "```", "",
            "A review ends at the end-of-review token (generation_config.json's eos_token_id); the decoding defaults "
            "are kr3's. `pipeline(\"text-generation\")` works too, but decodes the new tokens alone: the space joining "
            "them to the prompt is dropped. kr3 goes on past the context by restarting on its last half; transformers "
            "stops there.", ""]


def _card_license(license: str, kr3: bool, base: dict | None) -> list[str]:
    if kr3:
        text = ("Trained on KR3, which is licensed CC BY-NC-SA 4.0 (https://creativecommons.org/licenses/by-nc-sa/4.0/): "
                "so is this model — attribution, non-commercial use only, share-alike.")
    else:
        text = "The licence of the training data applies." if license == "other" else f"Licensed `{license}`."
    if base:
        terms = f"`{base['license']}`" if base.get("license") else "under the terms of its own model card (it states none here)"
        text += (f" Fine-tuned from {base['name_or_path']}, licensed {terms}: its licence applies to this model as well "
                 "as the data's.")
    return ["## Licence", "", text, ""]
