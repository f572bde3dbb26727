"""A pretrained tokenizer's or model's files: a local folder as it is, or a Hugging Face Hub repository's files,
downloaded once into the cache (data.cache_dir)."""

from __future__ import annotations

from pathlib import Path

from kr3.errors import UserError, first_line


def locate(name_or_path: str, patterns: list[str], setting: str, what: str, cache_dir: str | None) -> Path:
    """The folder `setting`=`name_or_path` names: a local folder, or the files of that Hub repository matching
    `patterns` (what a `what` needs). A path that is no folder, and a failed download, are one line each."""
    name_or_path = str(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"{setting}={name_or_path} is not a folder — check the path, or give a Hub id such as "
                        "skt/kogpt2-base-v2")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns, cache_dir=cache_dir))
    except Exception as e:  # offline, unknown repo, gated repo: all user-fixable
        raise UserError(f"could not download {what} {name_or_path} from the Hugging Face Hub ({first_line(e)}) — "
                        f"download it where the Hub is reachable and set {setting}=/path/to/folder") from None
