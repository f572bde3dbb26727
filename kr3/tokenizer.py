"""One small tokenizer interface over SentencePiece (trained on the corpus) and pretrained Hugging Face
`tokenizers` (a Hub id or a folder with tokenizer.json). A tokenizer saved with `save` is loaded back
with `load(dir)` alone."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np

from kr3 import hub
from kr3.errors import UserError, first_line, lookup

log = logging.getLogger(__name__)

SPEC_FILE = "kr3_tokenizer.json"
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")
_ENCODE_THREADS = max(1, os.cpu_count() or 1)


class Tokenizer:
    kind: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    def spec(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()

    def encode_batch(self, texts):
        return self.sp.encode(texts, num_threads=_ENCODE_THREADS)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i):
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece):
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def save(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        Path(directory, "spiece.model").write_bytes(self.proto)
        Path(directory, SPEC_FILE).write_text(json.dumps(self.spec(), indent=2))

    @staticmethod
    def tag(cfg) -> str:
        return f"sp{cfg.model_type}{cfg.vocab_size}"

    @classmethod
    def load(cls, directory: Path) -> SentencePieceTokenizer:
        return cls((directory / "spiece.model").read_bytes())

    @classmethod
    def build(cls, cfg, texts: list[str], seed: int, cache_dir: str | None = None,
              controls: tuple[str, ...] = ()) -> SentencePieceTokenizer:
        """Train on `texts` (the train split). `cfg` is the `tokenizer` config group; `controls` are pieces
        reserved whole (user-defined symbols), such as the rating control tokens."""
        import sentencepiece as spm

        _check_vocab_size(cfg)
        if len(texts) > cfg.input_sentence_size:
            # sample here: SentencePiece's own sampling differs from process to process whatever its seed
            pick = np.random.default_rng(seed).choice(len(texts), cfg.input_sentence_size, replace=False)
            texts = [texts[i] for i in np.sort(pick)]
        model = io.BytesIO()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_writer=model,
                model_type=cfg.model_type,
                vocab_size=cfg.vocab_size,
                character_coverage=cfg.character_coverage,
                byte_fallback=cfg.byte_fallback,
                normalization_rule_name="identity",  # NFKC would turn ㅋ into ᄏ; data.py already applied NFC
                remove_extra_whitespaces=False,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                max_sentence_length=cfg.max_sentence_length,
                split_digits=True,
                num_threads=cfg.train_threads,  # part of the result: another count can merge ties differently
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                user_defined_symbols=list(controls),
                minloglevel=2,
            )
        except (RuntimeError, ValueError) as e:  # how sentencepiece reports bad settings
            raise _spm_user_error(e, cfg.vocab_size) from None
        return cls(model.getvalue())


def _check_vocab_size(cfg) -> None:
    min_vocab = 256 + 3 + 1  # byte pieces + unk/bos/eos + at least one merge
    if cfg.byte_fallback and cfg.vocab_size < min_vocab:
        raise UserError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small for byte fallback (needs at least {min_vocab}) "
            "— raise it, e.g. tokenizer.vocab_size=8000"
        )
    if cfg.vocab_size > 65535 * 4:
        raise UserError(f"tokenizer.vocab_size={cfg.vocab_size} is unreasonably large — use at most 262140")


def _spm_user_error(e: Exception, vocab_size: int) -> UserError:
    msg = str(e)
    if m := re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", msg):
        return UserError(
            f"tokenizer.vocab_size={vocab_size} is larger than this corpus supports (at most {m.group(2)}) "
            f"— use tokenizer.vocab_size={m.group(2)} or less, or a larger corpus"
        )
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg):
        return UserError(
            f"tokenizer.vocab_size={vocab_size} is smaller than the {m.group(2)} pieces this corpus needs "
            "(its characters, bytes and specials) "
            f"— raise tokenizer.vocab_size above {m.group(2)} or lower tokenizer.character_coverage"
        )
    return UserError(f"sentencepiece refused these settings ({first_line(e)}) — check the tokenizer.* overrides")


class PretrainedTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json), e.g. skt/kogpt2-base-v2."""

    kind = "pretrained"
    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.directory = Path(directory)
        self.tk = HFTokenizer.from_file(str(self.directory / "tokenizer.json"))
        self.added = False  # control tokens added: tokenizer.json is written anew by save
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos()

    def _find_eos(self) -> int:
        names = []
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):
            p = self.directory / fname
            if p.exists():
                tok = json.loads(p.read_text()).get("eos_token")
                tok = tok.get("content") if isinstance(tok, dict) else tok
                if tok:
                    names.append(tok)
        for name in [*names, *EOS_CANDIDATES]:
            if (i := self.tk.token_to_id(name)) is not None:
                return i
        raise UserError(
            f"the tokenizer in {self.directory} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)}) "
            "— add eos_token to its special_tokens_map.json"
        )

    def encode_batch(self, texts):
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i):
        return self.tk.id_to_token(int(i)) or ""

    def piece_to_id(self, piece):
        return self.tk.token_to_id(piece)

    def add_controls(self, controls: tuple[str, ...]) -> None:
        """Special tokens appended to the vocabulary (the rating control tokens); saved with it."""
        from tokenizers import AddedToken

        self.tk.add_special_tokens([AddedToken(c, special=True) for c in controls])
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.added = True

    def save(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        for fname in self.FILES:
            if (self.directory / fname).exists():
                shutil.copyfile(self.directory / fname, Path(directory, fname))
        if self.added:
            self.tk.save(str(Path(directory, "tokenizer.json")))
        Path(directory, SPEC_FILE).write_text(json.dumps(self.spec(), indent=2))

    @staticmethod
    def tag(cfg) -> str:
        return Path(str(cfg.name_or_path).rstrip("/")).name

    @classmethod
    def load(cls, directory: Path) -> PretrainedTokenizer:
        return cls(directory)

    @classmethod
    def build(cls, cfg, texts: list[str], seed: int, cache_dir: str | None = None,
              controls: tuple[str, ...] = ()) -> PretrainedTokenizer:
        """The tokenizer `cfg.name_or_path` names (a folder or a Hub id), with `controls` added as special
        tokens; `texts` and `seed` are not used."""
        tok = cls._named(cfg, cache_dir)
        if controls:
            tok.add_controls(controls)
        return tok

    @classmethod
    def _named(cls, cfg, cache_dir: str | None) -> PretrainedTokenizer:
        folder = hub.locate(cfg.name_or_path, list(cls.FILES), "tokenizer.name_or_path", "tokenizer", cache_dir)
        if not (folder / "tokenizer.json").exists():
            raise UserError(
                f"tokenizer.name_or_path={folder} has no tokenizer.json — point it at a folder saved by "
                "Hugging Face (tokenizer.save_pretrained) or at a Hub id such as skt/kogpt2-base-v2"
            )
        return cls(folder)


# tokenizer.kind -> class; a new kind is a Tokenizer subclass with tag/build/load, added here
KINDS = {"sentencepiece": SentencePieceTokenizer, "pretrained": PretrainedTokenizer}


def kind(cfg) -> type[Tokenizer]:
    return lookup(KINDS, cfg.kind, "tokenizer.kind")


def build(cfg, train_texts: list[str], seed: int, cache_dir: str | None = None, controls: tuple[str, ...] = ()) -> Tokenizer:
    return kind(cfg).build(cfg, train_texts, seed, cache_dir, controls)


def load(directory: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save` (as prepare does next to the token files)."""
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.exists():
        raise UserError(f"no tokenizer saved in {directory} — run stage=prepare first")
    spec = json.loads(spec_path.read_text())
    tok = lookup(KINDS, spec["kind"], f"the kind in {spec_path}").load(directory)
    if tok.eos_id != spec["eos_id"] or tok.vocab_size != spec["vocab_size"]:
        raise UserError(f"the tokenizer in {directory} does not match its {SPEC_FILE} — re-run stage=prepare prepare.force=true")
    return tok


def to_files(directory: str | Path) -> dict[str, bytes]:
    """A saved tokenizer as {file name: bytes}, to embed in a checkpoint."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def from_files(files: dict[str, bytes]) -> Tokenizer:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        return load(tmp)
