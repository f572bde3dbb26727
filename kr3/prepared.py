"""The prepared-data format: data → clean → split → tokenizer → token files + meta.json, written atomically
into `<paths.data_dir>/<name>/`, where the name is derived from the data and tokenizer config. `ensure`
prepares a folder if it is missing or stale (stage=prepare and stage=train both call it); `PreparedData`
reads one. One prepare at a time per folder: a second one waits on its lock, then reuses what the first built."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from kr3 import data as kdata
from kr3 import ratings, settings
from kr3 import tokenizer as ktok
from kr3.atomic import disk_full_as_user_error, replacing_folder
from kr3.config import started_as
from kr3.console import progress, table
from kr3.errors import UserError
from kr3.tracking import pid_alive

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META = "meta.json"
TOKENIZER_DIR = "tokenizer"
ENCODE_CHUNK = 8192
ROUND_TRIP_WARN = 0.99  # below it, a normalizing tokenizer is the likely cause (kogpt2's NFKC: 80.8 %)


def dataset_name(cfg) -> str:
    """Folder name for a prepared dataset: readable prefix + hash of everything that shapes its contents."""
    d, tc = cfg.data, cfg.tokenizer
    keyed = {
        "data": settings.plain(d),
        "tokenizer": settings.plain(tc),
        "seed": cfg.seed,
        "format_version": FORMAT_VERSION,
    }
    if d.source == "local" and d.path:
        keyed["data"]["path"] = str(Path(d.path).expanduser().resolve())
    keyed["data"].pop("cache_dir", None)
    if keyed["data"].get("condition") is None:
        keyed["data"].pop("condition", None)  # folders prepared before data.condition existed keep their name
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:8]
    return f"{d.name}-{ktok.kind(tc).tag(tc)}-{digest}"


def source_stamp(dcfg) -> str:
    """Cheap identity of the source, to decide whether a prepared folder is still current."""
    local = kdata.location(dcfg)  # a Hub id may also be a local dataset folder
    if local and Path(local).expanduser().exists():
        files = kdata.source_files(Path(local).expanduser().resolve())
        return json.dumps([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    return f"{dcfg.source}:{dcfg.hub_id}@{dcfg.revision}"


def prepared_dir(cfg) -> Path:
    return Path(cfg.paths.data_dir) / dataset_name(cfg)


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META
    if not path.exists():
        raise UserError(f"no prepared data in {directory} — run `{started_as()} stage=prepare` with the same data/tokenizer")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {meta.get('format_version')}, this kr3 reads {FORMAT_VERSION} "
            "— re-run stage=prepare prepare.force=true"
        )
    return meta


class PreparedData:
    """A prepared folder: meta.json, the token files (read with np.memmap) and the tokenizer."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.meta = read_meta(self.dir)

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / self.meta["tokenizer"]["dir"]

    def split(self, name: str) -> dict:
        return self.meta["splits"][name]

    def tokens(self, name: str) -> np.memmap:
        return np.memmap(self.dir / self.split(name)["file"], dtype=np.dtype(self.meta["dtype"]), mode="r")

    @cached_property
    def tokenizer(self) -> ktok.Tokenizer:
        return ktok.load(self.tokenizer_dir)

    @property
    def condition(self) -> ratings.Condition | None:
        """The control tokens of rating-conditioned data; None for other data."""
        return ratings.Condition.of(self.meta.get("condition"))


def trained_split(ckpt_data, name: str) -> tuple[np.memmap, Path, int]:
    """(tokens, file, characters) of split `name` of the prepared folder a checkpoint was trained on (its `data`
    record); refused when it is gone or was prepared again since."""
    split = (ckpt_data.splits or {}).get(name)
    path = Path(ckpt_data.dir) / split["file"] if split else None
    if path is None or not path.exists():
        raise UserError(
            f"split {name!r} of {ckpt_data.dir} is not there — re-run stage=prepare with the training "
            "config, or evaluate a file with data=local data.path=..."
        )
    data = PreparedData(path.parent)
    if data.meta["fingerprint"] != ckpt_data.fingerprint:
        raise UserError(
            f"{path.parent} was prepared again (other data or tokenizer) since this checkpoint was trained on it "
            "— evaluate a file with data=local data.path=..., or prepare the data it was trained on again"
        )
    return data.tokens(name), path, split["chars"]


class Timings(dict):
    """Seconds per named section: `with timings("load"): ...`."""

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self[name] = time.perf_counter() - start


def ensure(cfg) -> Path:
    """The prepared folder for this data and tokenizer config: reused when up to date, else built. Checked
    under the folder's lock, so a prepare that waited for another one reuses what that one built."""
    cfg = settings.typed(cfg)
    kdata.check(cfg.data)
    out = prepared_dir(cfg)
    stamp = source_stamp(cfg.data)
    with _locked(out):
        _remove_stale(out)
        if cfg.prepare.force or not _up_to_date(out, stamp):
            build(cfg, out, stamp)
    return out


def _up_to_date(out: Path, stamp: str) -> bool:
    if not (out / META).exists():
        return False
    if read_meta(out)["source"]["stamp"] == stamp:
        log.info(f"prepared data is up to date in {out} (prepare.force=true redoes it)")
        return True
    log.info("the source changed since the last prepare: preparing again")
    return False


@contextmanager
def _locked(out: Path):
    """Hold `.<name>.lock` beside the folder: two prepares swapping one folder at once would fail."""
    lock = FileLock(out.parent / f".{out.name}.lock")
    with disk_full_as_user_error(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info(f"another process is preparing {out} (lock {lock.lock_file}): waiting for it to finish")
            lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _remove_stale(out: Path):
    """Remove the temp and old folders of this name whose prepare is gone: a SIGKILL runs no cleanup."""
    left = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)")
    for path in out.parent.iterdir():
        match = left.fullmatch(path.name)
        if match and not pid_alive(int(match[1])):
            log.info(f"removing {path}, left by a prepare that was killed")
            shutil.rmtree(path, ignore_errors=True)


def build(cfg, out: Path, stamp: str) -> dict:
    """load → clean → split → tokenizer → token files + meta.json, into a temp folder renamed to `out`."""
    timings = Timings()
    with timings("total"):
        log.info(f"loading {kdata.location(cfg.data)}")
        with timings("load"):
            corpus = kdata.load(cfg.data)
        with timings("clean"):
            corpus = kdata.clean(corpus, cfg.data,
                                 progress=lambda it: progress(it, desc="clean", total=len(it), unit="review"))
        log.info("cleaning: " + ", ".join(f"{k} {v:,}" for k, v in corpus.counts.items()))
        with timings("split"):
            splits = kdata.split(corpus, cfg.data.val_ratio, cfg.data.test_ratio, cfg.seed)
        log.info(f"tokenizer: {cfg.tokenizer.kind}" + (" (training)" if cfg.tokenizer.kind == "sentencepiece" else ""))
        rated = conditioned(cfg.data, corpus)
        with timings("tokenizer"):
            tok = ktok.build(cfg.tokenizer, splits["train"].texts, cfg.seed, cache_dir=cfg.data.cache_dir,
                             controls=tuple(ratings.PIECES.values()) if rated else ())
        with replacing_folder(out) as tmp:
            meta = _write(cfg, tok, corpus, splits, (out.name, stamp), tmp, timings,
                          condition_of(tok) if rated else None)
    log.info("\n" + summary(meta, out, timings))
    return meta


def _write(cfg, tok: ktok.Tokenizer, corpus, splits: dict, name_stamp: tuple[str, str], tmp: Path,
           timings: Timings, condition: ratings.Condition | None) -> dict:
    """`condition`: the control tokens, with data.condition=rating (a control token before each rated review;
    reviews without a rating get none, so the model also learns unconditioned reviews)."""
    if tok.vocab_size > np.iinfo(np.uint32).max:
        raise UserError(f"vocabulary of {tok.vocab_size} tokens does not fit uint32 token files")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    with timings("encode"):
        stats = {name: _encode_split(tok, c, tmp / f"{name}.bin", dtype, condition) for name, c in splits.items()}
    with timings("round_trip"):
        fidelity = _round_trip(tok, splits["val"].texts)
    _warn_if_lossy(fidelity)
    tok.save(tmp / TOKENIZER_DIR)
    name, stamp = name_stamp
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": np.dtype(dtype).name,
        "splits": stats,
        "tokenizer": {**tok.spec(), "dir": TOKENIZER_DIR, "config": settings.plain(cfg.tokenizer)},
        "round_trip": fidelity,
        "condition": condition.record() if condition else None,
        "cleaning": corpus.counts,
        "source": {"name": corpus.source, "stamp": stamp, "fingerprint": corpus.fingerprint},
        "config": {"data": settings.plain(cfg.data), "seed": cfg.seed},
        "fingerprint": hashlib.sha256(json.dumps([corpus.fingerprint, name], sort_keys=True).encode()).hexdigest(),
    }
    (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return meta


def conditioned(dcfg, corpus) -> bool:
    """data.condition=rating, checked against the corpus: it needs a rating column."""
    if dcfg.condition is None:
        return False
    if dcfg.condition != "rating":
        raise UserError(f"data.condition={dcfg.condition} is not known — use data.condition=rating or null")
    if corpus.labels is None:
        raise UserError(f"data.condition=rating needs ratings, and {corpus.source} has no integer rating column "
                        f"{dcfg.label_column!r} — set data.label_column or data.condition=null")
    if not set(corpus.labels) & ratings.NAMES.keys():
        held = sorted({label for label in corpus.labels if label is not None})[:5]
        raise UserError(f"data.condition=rating: no review of {corpus.source} has a KR3 rating (0 negative, 1 "
                        f"positive, 2 ambiguous); column {dcfg.label_column!r} holds {held or 'none'} — map its "
                        "values to those, or set data.condition=null")
    return True




def condition_of(tok: ktok.Tokenizer) -> ratings.Condition:
    """The control tokens' ids in `tok`, which holds them (kr3.ratings.PIECES)."""
    return ratings.Condition({r: tok.piece_to_id(piece) for r, piece in ratings.PIECES.items()})


def _encode_split(tok: ktok.Tokenizer, corpus, path: Path, dtype, condition: ratings.Condition | None) -> dict:
    """Encode reviews in chunks (the tokenizer parallelizes each chunk natively), each followed by EOS and,
    when conditioned, preceded by its rating's control token."""
    texts, labels = corpus.texts, corpus.labels
    controls = condition.controls if condition else {}
    n_tokens = 0
    with open(path, "wb") as f:
        bar = progress(desc=f"encode {path.stem}", total=len(texts), unit="review")
        for start in range(0, len(texts), ENCODE_CHUNK):
            ids = tok.encode_batch(texts[start : start + ENCODE_CHUNK])
            heads = [[controls[r]] if r in controls else [] for r in labels[start : start + len(ids)]] \
                if controls else [[]] * len(ids)
            flat = np.fromiter((t for h, doc in zip(heads, ids) for t in (*h, *doc, tok.eos_id)), dtype=dtype)
            f.write(flat.tobytes())  # not tofile: on a full disk its OSError has no errno
            n_tokens += len(flat)
            bar.update(len(ids))
        bar.close()
    chars = sum(map(len, texts))
    stats = {"file": path.name, "reviews": len(texts), "tokens": n_tokens, "chars": chars,
             "chars_per_token": round(chars / max(1, n_tokens - len(texts)), 4)}
    if controls:
        stats["ratings"] = {str(r): sum(lab == r for lab in labels) for r in ratings.NAMES}
    return stats


def _round_trip(tok: ktok.Tokenizer, texts: list[str]) -> float:
    """Share of reviews that decode(encode(x)) gives back exactly."""
    ok = 0
    for start in range(0, len(texts), ENCODE_CHUNK):
        chunk = texts[start : start + ENCODE_CHUNK]
        ok += sum(tok.decode(ids) == t for ids, t in zip(tok.encode_batch(chunk), chunk))
    return round(ok / len(texts), 6)


def _warn_if_lossy(fidelity: float):
    if fidelity < ROUND_TRIP_WARN:
        log.warning(f"only {fidelity:.1%} of val reviews come back exactly from decode(encode(review)): the tokenizer "
                    "most likely normalizes text (e.g. NFKC turns ㅋ into ᄏ), so decoding does not give the review "
                    "back — tokenizer=sentencepiece trains one on this corpus with identity normalization")


def summary(meta: dict, out: Path, timings: dict) -> str:
    rows = [("source", meta["source"]["name"])]
    rows += [(f"  {k}", f"{v:,}") for k, v in meta["cleaning"].items()]
    rows.append(("tokenizer", f"{meta['tokenizer']['kind']}, vocab {meta['vocab_size']:,}, {meta['dtype']}"))
    rows.append(("round-trip fidelity (val)", f"{meta['round_trip']:.2%}"))
    for name, s in meta["splits"].items():
        rows.append((name, f"{s['reviews']:,} reviews, {s['tokens']:,} tokens, {s['chars']:,} chars, "
                           f"{s['chars_per_token']:.2f} chars/token"))
    rows.append(("time", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())))
    rows.append(("output", str(out)))
    return table(rows, "prepare summary")
