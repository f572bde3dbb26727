"""Benchmark stage=prepare from nothing on ../shared/data/nsmc_reviews.parquet, for both tokenizers.

    uv run python bench/prepare.py            # prints a markdown table for BENCHMARKS.md

Each run is a fresh `python run.py stage=prepare` in an empty temporary root (no datasets cache, no
prepared folder); wall time and peak RSS are measured on the child process.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NSMC = SHARED / "data" / "nsmc_reviews.parquet"
TOKENIZERS = {
    "sentencepiece (bpe, 8k)": ["tokenizer=sentencepiece"],
    "pretrained (kogpt2-v1)": ["tokenizer=pretrained", f"tokenizer.name_or_path={SHARED / 'tokenizers' / 'kogpt2-v1'}"],
}


def run_one(overrides):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "run.py"), "stage=prepare", f"paths.root_dir={tmp}", "data=local",
               f"data.path={NSMC}", *overrides]
        log = Path(tmp, "log.txt")
        t = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        wall = time.perf_counter() - t
        if status:
            sys.exit(log.read_text())
        peak_mib = usage.ru_maxrss / 1024
        meta = json.loads(next(Path(tmp, "data").glob("local-*/meta.json")).read_text())
    return wall, peak_mib, meta


def main():
    if not NSMC.exists():
        sys.exit(f"{NSMC} is absent: this benchmark needs ../shared")
    print("| tokenizer | wall (s) | peak RSS (MiB) | reviews/s | train tokens | val tokens | chars/token | round-trip |")
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides in TOKENIZERS.items():
        wall, peak, meta = run_one(overrides)
        s = meta["splits"]
        print(f"| {name} | {wall:.1f} | {peak:.0f} | {meta['cleaning']['loaded'] / wall:,.0f} | "
              f"{s['train']['tokens']:,} | {s['val']['tokens']:,} | {s['val']['chars_per_token']:.2f} | "
              f"{meta['round_trip']:.2%} |", flush=True)


if __name__ == "__main__":
    main()
