"""Training throughput on this machine: our `stage=train` step against a plain eager fp32 PyTorch loop of
the same model (6 layers, 6 heads, d_model 384, block 256, batch 16, 8k vocab), in the same run.

    uv run python bench/train_throughput.py [--steps 12] [--variants fp32,compile,bf16]

Needs ../shared (prepares nsmc_reviews.parquet with the default tokenizer first, or reuses it).
Tokens/s are medians over logged steps after the first few (warm-up, compilation).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NSMC = ROOT.parent / "shared" / "data" / "nsmc_reviews.parquet"
MODEL = ["model=small", "model.n_layers=6", "model.n_heads=6", "model.d_model=384", "model.d_ffn=1536",
         "model.block_size=256"]
VARIANTS = {"fp32": ["trainer.precision=fp32"], "compile": ["trainer.precision=fp32", "trainer.compile=true"],
            "bf16": ["trainer.precision=bf16"],
            # DDP overhead: 2 processes x 1 thread x batch 8 against "fp32" (1 process x 2 threads x batch 16)
            "ddp2x1": ["trainer.precision=fp32", "trainer.threads=1", "trainer.batch_size=8"]}
TORCHRUN = {"ddp2x1": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]}


def run_py(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True)


def nsmc_data_dir() -> Path:
    """The prepared nsmc_reviews folder with the default tokenizer (`run.py stage=prepare data=local ...`)."""
    return next(p for p in (ROOT / "data").glob("local-spbpe8000-*") if (p / "meta.json").exists())


SHAPE = dict(n_layers=6, n_heads=6, d_model=384, d_ffn=1536, block_size=256)


def plain_loop(data_dir: Path, steps: int, shape: dict = SHAPE, batch: int = 16) -> float:
    """nanoGPT-style: random windows from the memmap, eager fp32 forward/backward, AdamW. Tokens/s, the
    median over steps after the first two."""
    from kr3.model import GPT, GPTConfig

    meta = json.loads((data_dir / "meta.json").read_text())
    data = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], **shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    T = shape["block_size"]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        ix = np.random.randint(0, len(data) - T - 1, batch)
        chunk = torch.from_numpy(np.stack([data[i : i + T + 1] for i in ix]).astype(np.int64))
        loss = model(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return batch * T / statistics.median(times[2:])


def ours(name: str, steps: int) -> dict:
    """A real `run.py stage=train`; peak RSS is the launcher's largest child (per process under torchrun)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, *TORCHRUN.get(name, []), str(ROOT / "run.py"), "stage=train", "data=local",
               f"data.path={NSMC}", *MODEL, "trainer.batch_size=16", f"trainer.max_steps={steps}", "trainer.log_interval=1",
               "trainer.eval_interval=0", "trainer.eval_tokens=4096", "trainer.final_eval_tokens=4096",
               "trainer.sample_prompts=[]", "logger=none", f"hydra.run.dir={tmp}/run", "trainer.ckpt_interval=0",
               *VARIANTS[name]]
        with open(Path(tmp, "log"), "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"} if name in TORCHRUN else None)
            _, status, usage = os.wait4(proc.pid, 0)
        if status:
            sys.exit(Path(tmp, "log").read_text()[-3000:])
        rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/tokens_per_s" in r][3:-1]  # skip warm-up/compilation and the final partial
    return {"tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in train),
            "mfu": statistics.median(r.get("train/mfu", 0) for r in train), "peak_rss_mib": usage.ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--variants", default="fp32,compile")
    args = ap.parse_args()
    prep = run_py("stage=prepare", "data=local", f"data.path={NSMC}")
    if prep.returncode:
        sys.exit(prep.stderr)
    from kr3.config import register_resolvers

    register_resolvers()
    data_dir = nsmc_data_dir()
    from kr3.hardware import measure_matmul_flops

    fp32, bf16 = measure_matmul_flops(torch.float32) / 1e9, measure_matmul_flops(torch.bfloat16) / 1e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"matmul peak fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s")
    base = plain_loop(data_dir, args.steps)
    print(f"| plain eager fp32 loop | {base:,.0f} | 1.00x | | |", flush=True)
    for name in args.variants.split(","):
        r = ours(name, args.steps)
        print(f"| kr3 stage=train, {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['mfu']:.1%} | {r['peak_rss_mib']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
