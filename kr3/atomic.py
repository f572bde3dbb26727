"""Write-then-rename: a reader finds the old file or the whole new one, never a half-written one."""

import errno
import os
from contextlib import contextmanager
from pathlib import Path

from kr3.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def replacing(path: str | Path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    with disk_full_as_user_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def disk_full_as_user_error(path: str | Path):
    """A full disk or quota (ENOSPC, EDQUOT) while writing `path` as one line. The writer removes what it wrote
    inside this block, before the error reaches it: that is what lets the message say nothing was left."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise UserError(f"no space left on the device of {Path(path).absolute()} — free space "
                        "(nothing half-written was left) and run it again") from e
