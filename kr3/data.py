"""Loading (Hub or local files, one `datasets` path), cleaning and splitting of review corpora.

Pure data: nothing here knows about tokenizers or torch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from collections.abc import Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kr3.atomic import is_disk_full, remove_new
from kr3.errors import UserError, first_line, lookup

log = logging.getLogger(__name__)

# only an empty cell is missing: pandas would also drop reviews that read "NA", "null" or "None"
CSV_NA = {"keep_default_na": False, "na_values": [""]}
# extension -> (datasets builder, extra builder kwargs)
FORMATS = {
    ".parquet": ("parquet", {}),
    ".csv": ("csv", CSV_NA),
    ".tsv": ("csv", {"sep": "\t", **CSV_NA}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".txt": ("text", {}),
}
TEXT_FORMATS = {".csv", ".tsv", ".jsonl", ".json", ".txt"}


@dataclass
class Corpus:
    texts: list[str]
    labels: list[int] | None
    source: str  # human-readable origin
    fingerprint: str  # changes when the source's content changes
    counts: dict[str, int] = field(default_factory=dict)  # cleaning step -> reviews removed


def load(cfg) -> Corpus:
    """Load the corpus named by the `data` config: `source=hub` (a Hub id or a local dataset
    folder, through `datasets.load_dataset`) or `source=local` (a file or folder of files)."""
    return source(cfg).load(cfg, cfg.cache_dir)


def _load_hub(cfg, cache_dir):
    import datasets

    try:
        with caching(cache_dir):
            ds = datasets.load_dataset(cfg.hub_id, revision=cfg.revision, split=cfg.split, cache_dir=cache_dir)
    except (ConnectionError, OSError, ValueError) as e:  # HF raises these for offline/missing repos
        if Path(cfg.hub_id).exists():
            raise UserError(f"could not load the dataset folder {cfg.hub_id}: {first_line(e)}") from e
        raise UserError(
            f"could not download {cfg.hub_id} from the Hugging Face Hub ({first_line(e)}) — "
            "download it where the Hub is reachable and run with data=local data.path=/path/to/kr3.parquet"
        ) from e
    fp = getattr(ds, "_fingerprint", "") or ""
    return _from_dataset(ds, cfg, source=f"hub:{cfg.hub_id}", fingerprint=f"{cfg.hub_id}@{cfg.revision}:{fp}")


@contextmanager
def caching(cache_dir: str | None):
    """A full disk while `datasets` fills its cache is one line, and what it had added to the cache is removed (else
    its error blames the source file)."""
    import datasets

    cache = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser()
    existed, before = cache.exists(), set(cache.rglob("*"))
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        remove_new(cache, before)
        if not existed:
            with suppress(OSError):
                cache.rmdir()
        raise UserError(f"no space left on the device of {cache} (the datasets cache, data.cache_dir) — free space "
                        "(what this load had written there was removed) and run it again") from e


def source_files(path: Path) -> list[Path]:
    """The file, or a folder's files, leaving out hidden files and folders (.git, .ipynb_checkpoints, ...)."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))


def _local_path(cfg) -> Path:
    if not cfg.path:
        raise UserError("data=local needs a file — add data.path=/path/to/reviews.parquet (or .csv/.tsv/.jsonl/.txt)")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"data.path={path} does not exist — check the path")
    return path


def _load_local(cfg, cache_dir):
    import datasets

    path = _local_path(cfg)
    files = source_files(path)
    exts = {p.suffix.lower() for p in files}
    if not files or not exts <= FORMATS.keys():
        bad = ", ".join(sorted(e or "a file without extension" for e in exts - FORMATS.keys())) or "no files"
        raise UserError(f"data.path={path}: unsupported file type ({bad}) — use {', '.join(FORMATS)}")
    builders = {FORMATS[e][0] for e in exts}
    if len(builders) > 1 or len({e for e in exts if e in (".csv", ".tsv")}) > 1:
        raise UserError(f"data.path={path} mixes file types ({', '.join(sorted(exts))}) — point it at one kind")
    ext = sorted(exts)[0]
    builder, kwargs = FORMATS[ext]
    digest = hashlib.sha256()
    for p in files:
        if ext in TEXT_FORMATS:
            _check_utf8(p)
        _hash_file(p, digest)
    if not any(_has_rows(p) for p in files):
        raise UserError(f"data.path={path} holds no reviews (no rows below a header, or an empty file) — give a "
                        "file with reviews")
    try:
        with caching(cache_dir):
            ds = datasets.load_dataset(
                builder, data_files=[str(p) for p in files], split="train", cache_dir=cache_dir, **kwargs
            )
    except UserError:
        raise
    except Exception as e:  # parse errors from pyarrow/pandas: the file is malformed
        raise UserError(f"could not read {path} as {builder}: {first_line(e)} — check the file's format") from e
    return _from_dataset(ds, cfg, source=str(path), fingerprint=digest.hexdigest(), text_default=builder == "text")


@dataclass(frozen=True)
class Source:
    load: object  # (data cfg, cache_dir) -> Corpus
    location_key: str  # the data.* key naming what it reads
    check: object = None  # (data cfg) -> None: the one-line error for a source that cannot be there, before any work


# data.source -> how to load it; a new source is a loader added here
SOURCES = {"hub": Source(_load_hub, "hub_id"), "local": Source(_load_local, "path", _local_path)}


def source(cfg) -> Source:
    return lookup(SOURCES, cfg.source, "data.source")


def check(cfg) -> None:
    """Fail now, before anything is written, when the source cannot be there (a missing file)."""
    if source(cfg).check:
        source(cfg).check(cfg)


def location(cfg) -> str | None:
    """What the data config reads: a Hub id (or a local dataset folder), or a file or folder."""
    return getattr(cfg, source(cfg).location_key)


MISSING_RATING = {"", "na", "n/a", "nan", "null", "none"}  # how files spell an empty rating


def _ratings(values: list, column: str, source: str) -> list[int] | None:
    """Integer ratings (-1: missing; 2.0 is 2), or None when the column holds something else (1.5, "pos")."""
    out = []
    for x in values:
        if x is None or (isinstance(x, float) and math.isnan(x)) or (isinstance(x, str) and x.strip().lower() in MISSING_RATING):
            out.append(-1)
            continue
        try:
            r = float(x)
        except (TypeError, ValueError):
            r = math.nan
        if not r.is_integer():
            log.info(f"{source}: column {column!r} is not integer ratings (e.g. {x!r}): no ratings")
            return None
        out.append(int(r))
    return out


def _from_dataset(ds, cfg, source, fingerprint, text_default=False) -> Corpus:
    ds = ds.remove_columns([c for c in cfg.drop_columns if c in ds.column_names])
    cols = ds.column_names
    text_col = "text" if text_default else cfg.text_column
    if text_col not in cols:
        raise UserError(
            f"{source} has no column {text_col!r} (columns: {', '.join(cols)}) — set data.text_column=<one of them>"
        )
    table = ds.with_format("arrow")  # column access through arrow: row-by-row python access is 10x slower
    labels = None
    if cfg.label_column and cfg.label_column in cols:
        labels = _ratings(table[cfg.label_column].to_pylist(), cfg.label_column, source)
        if labels is None and cfg.ratings is not None:
            raise UserError(f"data.ratings filters on {cfg.label_column!r}, which in {source} is not integer ratings "
                            "— set data.label_column=<the rating column> or data.ratings=null")
    elif cfg.ratings is not None:
        raise UserError(
            f"data.ratings filters on {cfg.label_column!r}, which {source} does not have "
            f"(columns: {', '.join(cols)}) — set data.label_column or data.ratings=null"
        )
    texts = ["" if t is None else str(t) for t in table[text_col].to_pylist()]
    return Corpus(texts, labels, source, fingerprint)


def _has_rows(path: Path) -> bool:
    """Whether a file holds a row of data (readers fail on none with messages that do not say so)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows > 0
        except Exception:  # not parquet at all: the reader's error says what it is
            return True
    with open(path, "rb") as f:
        lines = [line for line in f.read(1 << 20).splitlines() if line.strip()][:2]
    return len(lines) > (1 if path.suffix.lower() in (".csv", ".tsv") else 0)


def _check_utf8(path: Path):
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path} is not valid UTF-8 (line {line}, byte {e.start}) — re-save the file as UTF-8"
        ) from None


def _hash_file(path: Path, digest):
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)


# ---------------------------------------------------------------- cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACE = re.compile(r"\s+")


def clean_text(text: str, nfc=True, strip_control=True, collapse_whitespace=True) -> str:
    if nfc:
        text = unicodedata.normalize("NFC", text)
    if strip_control:
        text = _CONTROL.sub("", text)
    if collapse_whitespace:
        text = _SPACE.sub(" ", text).strip()
    return text


def clean_options(c) -> tuple[bool, bool, bool]:
    """clean_text's switches (nfc, strip_control, collapse_whitespace) from `data.clean` settings or a checkpoint's
    saved copy of them (a dict); on where one is missing (a saved copy may predate it)."""
    get = c.get if isinstance(c, Mapping) else lambda key, default: getattr(c, key, default)
    return tuple(bool(get(k, True)) for k in ("nfc", "strip_control", "collapse_whitespace"))


def repeats(texts: list[str], keep: np.ndarray) -> np.ndarray:
    """Which of the kept texts repeat an earlier kept one."""
    seen, dup = set(), np.zeros(len(texts), dtype=bool)
    for i in np.flatnonzero(keep):
        if texts[i] in seen:
            dup[i] = True
        else:
            seen.add(texts[i])
    return dup


def clean(corpus: Corpus, cfg, progress=None) -> Corpus:
    """Normalize every review and drop the ones the config rejects; `counts` says how many each step removed."""
    c = cfg.clean
    texts, labels = corpus.texts, corpus.labels
    counts = {"loaded": len(texts)}
    it = progress(texts) if progress else texts
    opts = clean_options(c)  # once: DictConfig lookups are slow
    texts = [clean_text(t, *opts) for t in it]
    keep = np.ones(len(texts), dtype=bool)

    def drop(name, mask):
        new = keep & ~mask
        counts[name] = int(keep.sum() - new.sum())
        keep[:] = new

    if cfg.ratings is not None:
        allowed = set(int(r) for r in cfg.ratings)
        drop("rating_filtered", np.array([lab not in allowed for lab in labels], dtype=bool))
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    drop("empty", lengths == 0)
    drop("too_short", lengths < c.min_chars)
    if c.max_chars:
        drop("too_long", lengths > c.max_chars)
    if c.dedupe:
        drop("duplicates", repeats(texts, keep))
    idx = np.flatnonzero(keep)
    counts["kept"] = len(idx)
    if not len(idx):
        raise UserError(
            f"no reviews left after cleaning {corpus.source} ({_describe(counts)}) — "
            "relax data.clean.min_chars / data.ratings or check data.text_column"
        )
    out_labels = [labels[i] for i in idx] if labels is not None else None
    return Corpus([texts[i] for i in idx], out_labels, corpus.source, corpus.fingerprint, counts)


def _describe(counts):
    return ", ".join(f"{k} {v}" for k, v in counts.items())


# ---------------------------------------------------------------- splitting


def split(corpus: Corpus, val_ratio: float, test_ratio: float, seed: int) -> dict[str, Corpus]:
    """Shuffle deterministically under `seed` and cut into train/val(/test). The corpus must already be
    de-duplicated, so no review lands in two splits."""
    if not 0 < val_ratio < 1:
        raise UserError(f"data.val_ratio={val_ratio} must be between 0 and 1 (exclusive) — e.g. data.val_ratio=0.05")
    if not 0 <= test_ratio < 1 or val_ratio + test_ratio >= 1:
        raise UserError(
            f"data.test_ratio={test_ratio} must be in [0, 1) with val_ratio + test_ratio < 1 — e.g. data.test_ratio=0"
        )
    n = len(corpus.texts)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_ratio))
    n_test = max(1, round(n * test_ratio)) if test_ratio else 0
    if n - n_val - n_test < 1:
        raise UserError(f"only {n} reviews after cleaning: too few to split — use a larger corpus")
    parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    out = {}
    for name, idx in parts.items():
        if name == "test" and not n_test:
            continue
        idx = np.sort(idx)  # keep source order inside a split: stable across numpy versions' shuffles
        labels = [corpus.labels[i] for i in idx] if corpus.labels is not None else None
        out[name] = Corpus([corpus.texts[i] for i in idx], labels, corpus.source, corpus.fingerprint)
    return out
