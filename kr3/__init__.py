"""kr3: GPT language models on the KR3 Korean review corpus, configured with Hydra.

From Python: `from kr3 import load`, then `load("latest").complete("이 집 짜장면은")` (kr3.api). `load` and `Model` are
imported on first use, so `import kr3` stays light: stage=prepare never imports torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Model", "load", "__version__"]
_API = ("Model", "load")  # kr3.api's names, imported when first asked for

if TYPE_CHECKING:
    from kr3.api import Model, load


def __getattr__(name: str):
    if name in _API:
        from kr3 import api

        return getattr(api, name)
    raise AttributeError(f"module 'kr3' has no attribute {name!r}")
