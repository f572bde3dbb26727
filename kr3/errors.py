

class UserError(Exception):
    """A mistake the user can fix: shown as one line ("what is wrong — what to do"), no traceback."""


class Diverged(UserError):
    """Training's loss or weights became NaN or infinite: in a sweep, one failed trial, not the end of the sweep."""


def first_line(e: BaseException) -> str:
    """A library's exception as one line of a UserError."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def lookup(table: dict, kind, key: str):
    """`table[kind]` for a config value naming a kind (a tokenizer, a data source, a logger), or a one-line
    error listing the known kinds."""
    if kind not in table:
        raise UserError(f"{key}={kind!r} is not known — use one of: {', '.join(table)}")
    return table[kind]
