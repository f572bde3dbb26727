"""Benchmark stage=prepare from nothing on ../shared/data/nsmc_reviews.parquet, for both tokenizers.

    uv run python bench/prepare.py            # prints a markdown table for BENCHMARKS.md, headed by the machine

Each run is a fresh `python run.py stage=prepare` in an empty temporary root (no datasets cache, no
prepared folder); wall time and peak RSS are measured on the child process.
"""

import json
import tempfile
from pathlib import Path

import harness

TOKENIZERS = {
    "sentencepiece (bpe, 8k)": ["tokenizer=sentencepiece"],
    "pretrained (kogpt2-v1)": ["tokenizer=pretrained",
                               f"tokenizer.name_or_path={harness.SHARED / 'tokenizers' / 'kogpt2-v1'}"],
}
COLUMNS = ["tokenizer", "wall (s)", "peak RSS (MiB)", "reviews/s", "train tokens", "val tokens", "chars/token",
           "round-trip"]


def run_one(overrides: list[str]) -> tuple[float, float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        run = harness.run_kr3("stage=prepare", f"paths.root_dir={tmp}", *harness.local_data(harness.NSMC), *overrides,
                              log=Path(tmp, "log.txt"))
        meta = json.loads(next(Path(tmp, "data").glob("local-*/meta.json")).read_text())
    return run.wall_s, run.peak_rss_mib, meta


def main():
    harness.require_nsmc()
    print("\n" + harness.machine_line())
    print(harness.table_head(COLUMNS))
    for name, overrides in TOKENIZERS.items():
        wall, peak, meta = run_one(overrides)
        s = meta["splits"]
        print(harness.table_row([name, f"{wall:.1f}", f"{peak:.0f}", f"{meta['cleaning']['loaded'] / wall:,.0f}",
                                 f"{s['train']['tokens']:,}", f"{s['val']['tokens']:,}",
                                 f"{s['val']['chars_per_token']:.2f}", f"{meta['round_trip']:.2%}"]), flush=True)


if __name__ == "__main__":
    main()
