"""Training throughput on this machine: our `stage=train` step against a plain eager fp32 PyTorch loop of
the same model (6 layers, 6 heads, d_model 384, block 256, batch 16, 8k vocab), in the same run.

    uv run python bench/train_throughput.py [--steps 12] [--rounds 2] [--variants fp32,compile,bf16,ddp2x1,ddp2x1-compile]

Needs ../shared (prepares nsmc_reviews.parquet with the default tokenizer first, or reuses it).
Tokens/s are medians over logged steps after the first few (warm-up, compilation).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NSMC = ROOT.parent / "shared" / "data" / "nsmc_reviews.parquet"
MODEL = ["model=small", "model.n_layers=6", "model.n_heads=6", "model.d_model=384", "model.d_ffn=1536",
         "model.block_size=256"]
VARIANTS = {"fp32": ["trainer.precision=fp32"], "compile": ["trainer.precision=fp32", "trainer.compile=true"],
            "bf16": ["trainer.precision=bf16"],
            # DDP overhead: 2 processes x 1 thread x batch 8 against "fp32" (1 process x 2 threads x batch 16)
            "ddp2x1": ["trainer.precision=fp32", "trainer.threads=1", "trainer.batch_size=8"],
            "ddp2x1-compile": ["trainer.precision=fp32", "trainer.threads=1", "trainer.batch_size=8",
                               "trainer.compile=true"]}
TORCHRUN = {name: ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] for name in VARIANTS
            if name.startswith("ddp")}


def run_py(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True)


def nsmc_data_dir() -> Path:
    """The prepared nsmc_reviews folder with the default tokenizer (`run.py stage=prepare data=local ...`)."""
    return next(p for p in (ROOT / "data").glob("local-spbpe8000-*") if (p / "meta.json").exists())


SHAPE = dict(n_layers=6, n_heads=6, d_model=384, d_ffn=1536, block_size=256)


def plain_loop(steps: int, shape: dict = SHAPE, batch: int = 16) -> dict:
    """nanoGPT-style: random windows from the memmap, eager fp32 forward/backward with torch's cross-entropy
    of the logits, AdamW. Tokens/s, the median over steps after the first two. Run in a process of its own
    (`--plain`), so that its memory does not count in the kr3 runs' peak RSS."""
    import torch
    import torch.nn.functional as F

    from kr3.model import GPT, GPTConfig

    data_dir = nsmc_data_dir()
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
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), chunk[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens_per_s": batch * T / statistics.median(times[2:]), "peak_rss_mib": peak_rss}


def in_process(flag: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, flag, "--steps", str(steps)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.splitlines()[-1])


def matmul_peaks() -> dict:
    import torch

    from kr3.hardware import measure_matmul_flops

    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "fp32": measure_matmul_flops(torch.float32) / 1e9, "bf16": measure_matmul_flops(torch.bfloat16) / 1e9}


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
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat plain loop + variants, interleaved: median tokens/s and MFU, largest peak RSS")
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # internal: one plain loop, JSON out
    ap.add_argument("--peaks", action="store_true", help=argparse.SUPPRESS)  # internal: matmul peaks, JSON out
    args = ap.parse_args()
    if args.plain or args.peaks:
        print(json.dumps(plain_loop(args.steps) if args.plain else matmul_peaks()))
        return
    if unknown := set(args.variants.split(",")) - set(VARIANTS):
        sys.exit(f"unknown --variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    prep = run_py("stage=prepare", "data=local", f"data.path={NSMC}")
    if prep.returncode:
        sys.exit(prep.stderr)
    peaks = in_process("--peaks", 0)
    print(f"torch {peaks['torch']}, {peaks['threads']} threads; matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.1f} GFLOP/s", flush=True)
    names = ["plain", *args.variants.split(",")]
    runs = {name: [] for name in names}
    for i in range(args.rounds):  # this machine's speed drifts by minutes: every round measures everything
        for name in names:
            runs[name].append(in_process("--plain", args.steps) if name == "plain" else ours(name, args.steps))
            print(f"round {i + 1}, {name}: {runs[name][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    med = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    print(f"| plain eager fp32 loop | {med['plain']:,.0f} | 1.00x | | {max(r['peak_rss_mib'] for r in runs['plain']):,.0f} |")
    for name in names[1:]:
        mfu = statistics.median(r["mfu"] for r in runs[name])
        rss = max(r["peak_rss_mib"] for r in runs[name])
        print(f"| kr3 stage=train, {name} | {med[name]:,.0f} | {med[name] / med['plain']:.2f}x | {mfu:.1%} | {rss:,.0f} |")


if __name__ == "__main__":
    main()
