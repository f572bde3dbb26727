import math
import numbers


class UserError(Exception):
    """A mistake the user can fix: shown as one line ("what is wrong — what to do"), no traceback."""


class Diverged(UserError):
    """Training's loss or weights became NaN or infinite: in a sweep, one failed trial, not the end of the sweep."""


def first_line(e: BaseException) -> str:
    """A library's exception as one line of a UserError."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def check_values(section: str, values, rules: dict) -> None:
    """One-line errors for config values that would otherwise fail deep inside a stage. `rules` maps a key to
    (kind, low, high, null_ok): kind "int" or "number"; low inclusive, or exclusive as ("above", x); high
    inclusive or None; null_ok whether null is accepted. Infinity and NaN are no number here. `section` "" names
    top-level keys."""
    for key, (kind, low, high, null_ok) in rules.items():
        value = values[key]
        if value is None and null_ok:
            continue
        above = isinstance(low, tuple)
        low = low[1] if above else low
        ok = (isinstance(value, numbers.Integral if kind == "int" else numbers.Real) and not isinstance(value, bool)
              and (isinstance(value, numbers.Integral) or math.isfinite(value))  # an int of any size is finite
              and (value > low if above else value >= low) and (high is None or value <= high))
        if not ok:
            bound = f"{'>' if above else '≥'} {low}" + (f" and ≤ {high}" if high is not None else "")
            shown = "null" if value is None else value
            name = f"{section}.{key}" if section else key
            raise UserError(f"{name}={shown} must be {'an integer' if kind == 'int' else 'a number'} {bound}"
                            + (", or null" if null_ok else ""))


def lookup(table: dict, kind, key: str):
    """`table[kind]` for a config value naming a kind (a tokenizer, a data source, a logger), or a one-line
    error listing the known kinds."""
    if kind not in table:
        raise UserError(f"{key}={kind!r} is not known — use one of: {', '.join(table)}")
    return table[kind]
