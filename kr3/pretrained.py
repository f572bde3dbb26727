"""Starting from a pretrained GPT-2-family model (model=pretrained, e.g. KoGPT2): its config.json and weights —
model.safetensors, or pytorch_model.bin read with weights_only; either sharded with its index — as kr3's GPT, checked
against the data's tokenizer, and a record of where the weights came from (the checkpoint keeps it)."""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path

import torch
import yaml

from kr3 import gpt2, hub
from kr3.config import started_as
from kr3.errors import UserError, first_line
from kr3.model import GPT, GPTConfig

# (one file, the index of a sharded one): safetensors first, a PyTorch pickle only where a model has no safetensors
WEIGHTS = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))
TOKENIZER = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
SAFETENSORS = ["config.json", "README.md", *TOKENIZER, "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
PICKLE = ["config.json", "README.md", *TOKENIZER, "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


def named(model_cfg) -> bool:
    """Whether the `model` config is a pretrained model's (model=pretrained): its name_or_path says which."""
    return bool(getattr(model_cfg, "name_or_path", None))


def load(model_cfg, folder: Path, tokenizer, vocab_size: int, controls: tuple[int, ...]) -> tuple[GPT, dict]:
    """(kr3's GPT with the pretrained weights in `folder` (`find`), where they came from) for data whose `tokenizer`
    must be the model's; the token table grows to the data's `vocab_size` (its rating control tokens)."""
    name = str(model_cfg.name_or_path)
    config = read_config(folder)
    check_tokenizer(tokenizer, folder, name)
    cfg = gpt_config(gpt2.from_config(config, str(folder / "config.json")), model_cfg, vocab_size, controls)
    files = weight_files(folder)
    model = GPT(cfg)
    try:
        model.load_state_dict(gpt2.from_state_dict(read_tensors(files), cfg, str(folder), tuple(controls)))
    except RuntimeError as e:  # shapes that do not match config.json
        raise UserError(f"{folder}'s weights do not have the shapes its config.json gives ({first_line(e)}) — "
                        "download the model again") from None
    return model, provenance(name, folder, files)


def find(name_or_path: str, cache_dir: str | None) -> Path:
    """The model's folder: a local one, or its Hub repository's config, tokenizer and weights (safetensors when the
    repository has them, else its PyTorch pickle), downloaded into `cache_dir` once."""
    name_or_path = str(name_or_path)
    folder = hub.locate(name_or_path, SAFETENSORS, "model.name_or_path", "model", cache_dir)
    if not any((folder / f).exists() for pair in WEIGHTS[:1] for f in pair) and not Path(name_or_path).expanduser().is_dir():
        folder = hub.locate(name_or_path, PICKLE, "model.name_or_path", "model", cache_dir)
    return folder


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"model.name_or_path={folder} has no config.json — give a folder saved by transformers "
                        "(model.save_pretrained) or a Hub id such as skt/kogpt2-base-v2")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not JSON ({first_line(e)}) — download the model again") from None


def gpt_config(shape: dict, model_cfg, vocab_size: int, controls: tuple[int, ...]) -> GPTConfig:
    """kr3's GPTConfig: the checkpoint's shape, model.block_size of its positions, model.dropout (null: its own), and a
    token table for the larger of its vocabulary and the data's."""
    shape = dict(shape)
    positions = shape.pop("positions")
    if model_cfg.block_size > positions:
        raise UserError(f"model.block_size={model_cfg.block_size} is longer than the {positions} positions "
                        f"{model_cfg.name_or_path} learned — use model.block_size={positions} or less")
    own = shape.pop("dropout")
    return GPTConfig(**{**shape, "vocab_size": max(shape["vocab_size"], vocab_size)}, block_size=model_cfg.block_size,
                     dropout=own if model_cfg.dropout is None else model_cfg.dropout,
                     controls=tuple(controls) if model_cfg.rating_embedding else ())


def check_tokenizer(tokenizer, folder: Path, name: str) -> None:
    """The data's token ids must be the model's: data prepared with another tokenizer is refused in one line."""
    theirs = folder / "tokenizer.json"
    if not theirs.is_file():
        raise UserError(f"{folder} has no tokenizer.json, so kr3 cannot tell which token ids its weights were trained "
                        "on — give a folder holding the model's tokenizer too")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(theirs)).get_vocab(with_added_tokens=True)
    ours = tokenizer.tk.get_vocab(with_added_tokens=True) if tokenizer.kind == "pretrained" else {}
    if any(ours.get(piece) != i for piece, i in vocab.items()):
        raise UserError(f"the data was prepared with a {tokenizer.kind} tokenizer of {tokenizer.vocab_size:,} tokens, not "
                        f"{name}'s, so its token ids mean other pieces to this model — leave the tokenizer settings out: "
                        f"model=pretrained prepares the data with the model's own tokenizer ({started_as()} stage=train "
                        f"model=pretrained model.name_or_path={name} data=...)")


def weight_files(folder: Path) -> list[Path]:
    """The weights' files: one, or the shards its index names."""
    for single, index in WEIGHTS:
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise UserError(f"{folder / index} is no weight index ({first_line(e)}) — download the model again") from None
            return [folder / shard for shard in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise UserError(f"{folder} holds no weights ({', '.join(f for pair in WEIGHTS for f in pair)}) — give the folder "
                    "transformers saved the model into")


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in files:
        tensors |= read_file(path)
    return tensors


def read_file(path: Path) -> dict[str, torch.Tensor]:
    """One weights file: safetensors, or a PyTorch pickle that may hold tensors only (torch.load weights_only: a pickle
    that would run code is refused, and nothing of it runs)."""
    if not path.is_file():
        raise UserError(f"{path} is missing (the index names it) — download the whole model again")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        with warnings.catch_warnings():  # torch warns before refusing a pickle: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} is a pickle that holds more than tensors (code would run to load it), so kr3 does not "
                        "load it — use the model's model.safetensors, or convert a copy you trust") from None
    except Exception as e:  # truncated, not safetensors, not a pickle
        raise UserError(f"{path} cannot be read as weights ({first_line(e)}) — it is incomplete or of another format; "
                        "download it again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state_dict of tensors — give the weights transformers saved")
    return state


def provenance(name: str, folder: Path, files: list[Path]) -> dict:
    """Where the weights came from: as named, the folder they were read from, whether from the Hub (and which commit's
    snapshot), each file's sha256, and the licence its model card (README.md) declares."""
    from_hub = not Path(name).expanduser().is_dir()
    return {"name_or_path": name, "folder": str(folder), "hub": from_hub, "revision": folder.name if from_hub else None,
            "sha256": {f.name: sha256(f) for f in files}, "license": card_license(folder / "README.md")}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def card_license(readme: Path) -> str | None:
    """The `license:` of a Hub model card's YAML front matter, if it has one."""
    text = readme.read_text(errors="replace") if readme.is_file() else ""
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return None
    return str(front["license"]) if isinstance(front, dict) and front.get("license") else None


def describe(base: dict | None) -> str | None:
    """One line for the logs: `skt/kogpt2-base-v2 (model.safetensors 1a2b3c4d…, licence cc-by-nc-sa-4.0)`."""
    if not base:
        return None
    files = ", ".join(f"{name} {digest[:12]}…" for name, digest in base["sha256"].items())
    return f"{base['name_or_path']} ({files}, licence {base.get('license') or 'not stated'})"
