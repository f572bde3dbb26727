"""stage=prepare: the corpus and a tokenizer into `<paths.data_dir>/<name>/` (kr3.prepared)."""

from pathlib import Path

from kr3 import prepared, settings


def run(cfg) -> Path:
    return prepared.ensure(settings.typed(cfg))
