"""The CUDA path end to end, with throughput: run on a machine with an NVIDIA GPU.

    python bench/gpu.py [--steps 100] [--out DIR] [--small-batch 32] [--base-batch 16]

Needs no Hub and no ../shared: it writes a synthetic corpus (`harness.synthetic_corpus`: Zipf-distributed words of
random Hangul syllables, so that an 8k SentencePiece vocabulary trains and tokens look like real text to the model),
prepares it, then runs real `run.py` jobs: stage=train in fp32 / bf16 / bf16+compile (model=small shape,
batch 32), model=base in bf16+compile, a resume of a finished run, stage=evaluate and stage=generate
from its checkpoint, and a 1-process torchrun (DDP over NCCL). Prints a table of tokens/s, MFU (from
the CUDA peak-FLOPs table) and peak GPU memory, headed by the machine (bench/harness.py).
"""

import argparse
import shutil
from pathlib import Path

import harness


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reviews", type=int, default=300_000)
    ap.add_argument("--out", type=Path, default=harness.ROOT / "outputs" / "bench-gpu")
    ap.add_argument("--precision", default="bf16", help="of the non-fp32 jobs (fp32 for a dry run on a CPU)")
    ap.add_argument("--small-batch", type=int, default=32)
    ap.add_argument("--base-batch", type=int, default=16)
    a = ap.parse_args()
    small, base = ["model=small", f"trainer.batch_size={a.small_batch}"], ["model=base", f"trainer.batch_size={a.base_batch}"]
    a.out.mkdir(parents=True, exist_ok=True)
    print(harness.machine_line(), flush=True)
    src = harness.synthetic_corpus(a.out / "corpus.parquet", a.reviews)
    data = harness.local_data(src, a.out / "data")
    print(f"prepare: {harness.run_kr3('stage=prepare', *data, log=a.out / 'prepare.log').wall_s:.1f} s", flush=True)

    common = [*data, "stage=train", "logger=none", f"trainer.max_steps={a.steps}", "trainer.log_interval=10",
              "trainer.eval_interval=0", "trainer.eval_tokens=65536", "trainer.final_eval_tokens=65536"]
    jobs = {"small fp32": [*small, "trainer.precision=fp32"], "small bf16": [*small, "trainer.precision=" + a.precision],
            "small bf16 compile": [*small, "trainer.precision=" + a.precision, "trainer.compile=true"],
            "base bf16 compile": [*base, "trainer.precision=" + a.precision, "trainer.compile=true"]}
    results = {}
    for name, extra in jobs.items():
        d = a.out / name.replace(" ", "-")
        shutil.rmtree(d, ignore_errors=True)  # a second run of this script trains anew (kr3 refuses a used folder)
        run = harness.run_kr3(*common, *extra, run_dir=d, log=a.out / f"{d.name}.log")
        results[name] = {**harness.train_speed(d, skip=2), "wall_s": run.wall_s}
        print(name, results[name], flush=True)

    # resume a finished bf16 run for more steps, then evaluate and generate from what it wrote
    d = a.out / "small-bf16"
    harness.run_kr3(*common, *small, "trainer.precision=" + a.precision, f"trainer.max_steps={2 * a.steps}",
                    "trainer.resume=auto", run_dir=d, log=a.out / "resume.log")
    resumed = [r for r in harness.metrics(d) if "train/loss" in r]
    print("resume: steps logged", [r["step"] for r in resumed][-6:], flush=True)
    harness.run_kr3("stage=evaluate", f"checkpoint={d}", "evaluate.max_tokens=65536", run_dir=a.out / "evaluate",
                    log=a.out / "evaluate.log")
    print("evaluate:", (a.out / "evaluate.log").read_text().strip().splitlines()[-1], flush=True)
    harness.run_kr3("stage=generate", f"checkpoint={d}", f"generate.prompt='{corpus_prompt(src)}'",
                    run_dir=a.out / "generate", log=a.out / "generate.log")
    print("generate:", (a.out / "generate.log").read_text().strip().splitlines()[-1][:200], flush=True)
    shutil.rmtree(a.out / "ddp", ignore_errors=True)
    ddp = harness.run_kr3(*common, *small, "trainer.max_steps=30", run_dir=a.out / "ddp", log=a.out / "ddp.log", nproc=1)
    print(f"torchrun (NCCL, 1 process): {ddp.wall_s:.1f} s, {harness.train_speed(ddp.dir, skip=2)}", flush=True)

    harness.print_table(["job", "tokens/s", "MFU", "peak GPU memory (GiB)", "final val loss"],
                        [[name, f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.1%}", f"{r['mem_gib']:.1f}", f"{r['val_loss']:.3f}"]
                         for name, r in results.items()],
                        f"python bench/gpu.py --steps {a.steps} --small-batch {a.small_batch} --base-batch {a.base_batch}")


def corpus_prompt(src: Path) -> str:
    import pandas as pd

    return " ".join(pd.read_parquet(src)["Review"][0].split()[:2])


if __name__ == "__main__":
    main()
