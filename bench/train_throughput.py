"""Training throughput on this machine: our `stage=train` step against a plain nanoGPT-style PyTorch loop of the
same model (6 layers, 6 heads, d_model 384, block 256, batch 16, 8k vocab) in nanoGPT's modes, in the same run.

    uv run python bench/train_throughput.py [--steps 12] [--rounds 2] [--plain fp32,bf16-compile]
        [--variants fp32,compile,bf16,bf16-compile,ddp2x1,ddp2x1-compile]

Needs ../shared (prepares nsmc_reviews.parquet with the default tokenizer first, or reuses it).
Tokens/s are medians over logged steps after the first few (warm-up, compilation); the table is headed by the
machine (bench/harness.py).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

MODEL = ["model=small", "model.n_layers=6", "model.n_heads=6", "model.d_model=384", "model.d_ffn=1536",
         "model.block_size=256"]
VARIANTS = {"fp32": ["trainer.precision=fp32"], "compile": ["trainer.precision=fp32", "trainer.compile=true"],
            "bf16": ["trainer.precision=bf16"], "bf16-compile": ["trainer.precision=bf16", "trainer.compile=true"],
            # DDP overhead: 2 processes x 1 thread x batch 8 against "fp32" (1 process x 2 threads x batch 16)
            "ddp2x1": ["trainer.precision=fp32", "trainer.threads=1", "trainer.batch_size=8"],
            "ddp2x1-compile": ["trainer.precision=fp32", "trainer.threads=1", "trainer.batch_size=8",
                               "trainer.compile=true"]}
NPROC = {name: 2 for name in VARIANTS if name.startswith("ddp")}  # run under torchrun, 1 thread each


def in_process(steps: int, *flags: str) -> dict:
    """This script again with internal flags (a plain loop, the matmul peaks), so that its memory and threads are
    its own; the JSON it prints."""
    out = subprocess.run([sys.executable, __file__, *flags, "--steps", str(steps)], capture_output=True, text=True)
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
        run = harness.run_kr3(
            "stage=train", *harness.local_data(harness.NSMC), *MODEL, "trainer.batch_size=16",
            f"trainer.max_steps={steps}", "trainer.log_interval=1", "trainer.eval_interval=0", "trainer.eval_tokens=4096",
            "trainer.final_eval_tokens=4096", "trainer.sample_prompts=[]", "logger=none", "trainer.ckpt_interval=0",
            *VARIANTS[name], run_dir=Path(tmp, "run"), log=Path(tmp, "log"), nproc=NPROC.get(name, 0),
            env={"OMP_NUM_THREADS": "1"} if name in NPROC else None)
        speed = harness.train_speed(run.dir, skip=3)  # skip warm-up/compilation and the final partial window
    return {"tokens_per_s": speed["tokens_per_s"], "mfu": speed["mfu"], "peak_rss_mib": run.peak_rss_mib}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--variants", default="fp32,compile")
    ap.add_argument("--plain", default="fp32", help=f"the plain loop's modes, of {', '.join(harness.PLAIN_MODES)}")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat plain loop + variants, interleaved: median tokens/s and MFU, largest peak RSS")
    ap.add_argument("--plain-mode", help=argparse.SUPPRESS)  # internal: one plain loop, JSON out
    ap.add_argument("--peaks", action="store_true", help=argparse.SUPPRESS)  # internal: matmul peaks, JSON out
    args = ap.parse_args()
    if args.plain_mode or args.peaks:
        print(json.dumps(harness.plain_loop(args.steps, mode=args.plain_mode) if args.plain_mode else matmul_peaks()))
        return
    if unknown := set(args.variants.split(",")) - set(VARIANTS):
        sys.exit(f"unknown --variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    if unknown := set(args.plain.split(",")) - set(harness.PLAIN_MODES):
        sys.exit(f"unknown --plain {sorted(unknown)}: choose from {', '.join(harness.PLAIN_MODES)}")
    harness.nsmc_data_dir(refresh=True)
    peaks = in_process(0, "--peaks")
    print(f"torch {peaks['torch']}, {peaks['threads']} threads; matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.1f} GFLOP/s", flush=True)
    plain = [f"plain {mode}" for mode in args.plain.split(",")]
    names = [*plain, *args.variants.split(",")]
    runs = {name: [] for name in names}
    for i in range(args.rounds):  # this machine's speed drifts by minutes: every round measures everything
        for name in names:
            runs[name].append(in_process(args.steps, "--plain-mode", name[6:]) if name in plain else ours(name, args.steps))
            print(f"round {i + 1}, {name}: {runs[name][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    med = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    best = max(plain, key=med.get)  # kr3 against the plain loop's best mode
    rows = []
    for name in names:
        mfu = "" if name in plain else f"{statistics.median(r['mfu'] for r in runs[name]):.1%}"
        rss = max(r["peak_rss_mib"] for r in runs[name])
        label = f"{name} loop" if name in plain else f"kr3 stage=train, {name}"
        rows.append([label, f"{med[name]:,.0f}", f"{med[name] / med[best]:.2f}x", mfu, f"{rss:,.0f}"])
    harness.print_table(["loop", "tokens/s", f"vs {best}", "MFU", "peak RSS (MiB)"], rows,
                        f"--steps {args.steps} --rounds {args.rounds} --plain {args.plain} --variants {args.variants}")


if __name__ == "__main__":
    main()
