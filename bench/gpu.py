"""The CUDA path end to end, with throughput: run on a machine with an NVIDIA GPU.

    python bench/gpu.py [--steps 100] [--out DIR]

Needs no Hub and no ../shared: it writes a synthetic corpus (Zipf-distributed words of random Hangul
syllables, so that an 8k SentencePiece vocabulary trains and tokens look like real text to the model),
prepares it, then runs real `run.py` jobs: stage=train in fp32 / bf16 / bf16+compile (model=small shape,
batch 32), model=base in bf16+compile, a resume of a finished run, stage=evaluate and stage=generate
from its checkpoint, and a 1-process torchrun (DDP over NCCL). Prints a table of tokens/s, MFU (from
the CUDA peak-FLOPs table) and peak GPU memory.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def corpus(path: Path, n_reviews: int, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    syllables = np.array([chr(0xAC00 + i) for i in rng.choice(11172, 2000, replace=False)])
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(30000)]
    zipf = 1 / np.arange(1, len(words) + 1) ** 1.1
    lengths = rng.integers(3, 25, n_reviews)
    picks = rng.choice(len(words), lengths.sum(), p=zipf / zipf.sum())
    ends = np.cumsum(lengths)
    texts = [" ".join(words[i] for i in picks[e - n : e]) for e, n in zip(ends, lengths)]
    pd.DataFrame({"Rating": rng.integers(0, 3, n_reviews), "Review": texts}).to_parquet(path)


def run(args: list[str], log: Path, torchrun: bool = False) -> float:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else []
    t = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, *launcher, str(ROOT / "run.py"), *args], stdout=f,
                              stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"{' '.join(args)} failed ({code}):\n" + log.read_text()[-3000:])
    return time.perf_counter() - t


def speed(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/tokens_per_s" in r][2:-1] or [r for r in rows if "train/tokens_per_s" in r]
    val = [r for r in rows if "val/loss" in r]
    return {"tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in train),
            "mfu": statistics.median(r.get("train/mfu", 0) for r in train),
            "mem_gib": max(r.get("train/peak_mem_gib", 0) for r in train),
            "val_loss": val[-1]["val/loss"] if val else float("nan")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reviews", type=int, default=300_000)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-gpu")
    ap.add_argument("--precision", default="bf16", help="of the non-fp32 jobs (fp32 for a dry run on a CPU)")
    ap.add_argument("--small-batch", type=int, default=32)
    ap.add_argument("--base-batch", type=int, default=16)
    a = ap.parse_args()
    small, base = ["model=small", f"trainer.batch_size={a.small_batch}"], ["model=base", f"trainer.batch_size={a.base_batch}"]
    import torch

    a.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
          flush=True)
    src = a.out / "corpus.parquet"
    corpus(src, a.reviews)
    data = ["data=local", f"data.path={src}", f"paths.data_dir={a.out}/data"]
    print(f"prepare: {run(['stage=prepare', *data], a.out / 'prepare.log'):.1f} s", flush=True)

    common = [*data, "stage=train", "logger=none", f"trainer.max_steps={a.steps}", "trainer.log_interval=10",
              "trainer.eval_interval=0", "trainer.eval_tokens=65536", "trainer.final_eval_tokens=65536"]
    jobs = {"small fp32": [*small, "trainer.precision=fp32"], "small bf16": [*small, "trainer.precision=" + a.precision],
            "small bf16 compile": [*small, "trainer.precision=" + a.precision, "trainer.compile=true"],
            "base bf16 compile": [*base, "trainer.precision=" + a.precision, "trainer.compile=true"]}
    results = {}
    for name, extra in jobs.items():
        d = a.out / name.replace(" ", "-")
        shutil.rmtree(d, ignore_errors=True)  # a second run of this script trains anew (kr3 refuses a used folder)
        wall = run([*common, *extra, f"hydra.run.dir={d}"], a.out / f"{d.name}.log")
        results[name] = {**speed(d), "wall_s": wall}
        print(name, results[name], flush=True)

    # resume a finished bf16 run for more steps, then evaluate and generate from what it wrote
    d = a.out / "small-bf16"
    run([*common, *small, "trainer.precision=" + a.precision, f"trainer.max_steps={2 * a.steps}", "trainer.resume=auto",
         f"hydra.run.dir={d}"], a.out / "resume.log")
    resumed = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    print("resume: steps logged", [r["step"] for r in resumed][-6:], flush=True)
    run(["stage=evaluate", f"checkpoint={d}", "evaluate.max_tokens=65536", f"hydra.run.dir={a.out}/evaluate"],
        a.out / "evaluate.log")
    print("evaluate:", (a.out / "evaluate.log").read_text().strip().splitlines()[-1], flush=True)
    run(["stage=generate", f"checkpoint={d}", f"generate.prompt='{corpus_prompt(src)}'",
         f"hydra.run.dir={a.out}/generate"], a.out / "generate.log")
    print("generate:", (a.out / "generate.log").read_text().strip().splitlines()[-1][:200], flush=True)
    shutil.rmtree(a.out / "ddp", ignore_errors=True)
    wall = run([*common, *small, "trainer.max_steps=30", f"hydra.run.dir={a.out}/ddp"], a.out / "ddp.log", torchrun=True)
    print(f"torchrun (NCCL, 1 process): {wall:.1f} s, {speed(a.out / 'ddp')}", flush=True)

    print("\n| job | tokens/s | MFU | peak GPU memory (GiB) | final val loss |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['mem_gib']:.1f} | {r['val_loss']:.3f} |")


def corpus_prompt(src: Path) -> str:
    import pandas as pd

    return " ".join(pd.read_parquet(src)["Review"][0].split()[:2])


if __name__ == "__main__":
    main()
