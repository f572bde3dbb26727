"""Write-then-rename: a reader finds the old file or folder or the whole new one, never a half-written one."""

import errno
import os
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path

from kr3.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def replacing(path: str | Path):
    """Yield a temporary path beside `path`, already made (empty): a path that cannot be written fails before any
    work. On success it replaces `path`, on failure it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    if path.is_dir():
        raise UserError(f"{path} is a folder — give the path of a file to write")
    with disk_full_as_user_error(path):
        with unwritable_as_user_error(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.touch()
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def append_whole(path: str | Path, data: bytes) -> None:
    """Append `data` to `path` whole or not at all: a write that fails part-way (a full disk) is cut back off, so a
    reader never meets a torn line."""
    with disk_full_as_user_error(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
            except OSError:
                os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)


@contextmanager
def replacing_folder(out: str | Path):
    """Yield a temporary folder beside `out` (`.<name>.tmp-<pid>`, made, empty): on success it takes the place of
    `out` (an existing one is moved aside as `.<name>.old-<pid>` and removed), on failure it is removed."""
    out = Path(out)
    tmp, old = (out.parent / f".{out.name}.{kind}-{os.getpid()}" for kind in ("tmp", "old"))
    with disk_full_as_user_error(out):
        with unwritable_as_user_error(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        try:
            yield tmp
            if out.exists():
                out.rename(old)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def unwritable_as_user_error(path: str | Path):
    """Making `path` or its folder failed (no permission, a file where a folder should be, a read-only or virtual
    file system): one line. A full disk is left to disk_full_as_user_error."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL:
            raise
        raise UserError(f"cannot write {path} ({e.strerror or type(e).__name__}) — give a path in a folder you can "
                        "write") from None


@contextmanager
def disk_full_as_user_error(path: str | Path):
    """A full disk or quota while writing `path` as one line. The writer removes what it wrote inside this block,
    before the error reaches it: that is what lets the message say nothing was left."""
    try:
        yield
    except UserError:
        raise  # already one line (a disk that filled where an inner writer writes: its own path)
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise UserError(f"no space left on the device of {Path(path).absolute()} — free space "
                        "(nothing half-written was left) and run it again") from e


def is_disk_full(e: BaseException | None) -> bool:
    """A full disk or quota: the error, or one it was raised from (datasets' DatasetGenerationError from pyarrow's), by
    errno, or by its words where a library drops the errno (safetensors' SafetensorError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
        if any(words in str(e) for words in ("No space left on device", "Disk quota exceeded", "StorageFull")):
            return True
        e = e.__cause__
    return False


def remove_new(folder: Path, before: set[Path]) -> None:
    """Remove what appeared under `folder` since `before` (its paths then): files, then the folders left empty."""
    for path in sorted(set(folder.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
        with suppress(OSError):
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
