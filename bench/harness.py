"""The shared parts of kr3's benchmarks: every script in bench/ imports this module and no other benchmark.

- Where things are: `ROOT` (this checkout), `SHARED` (../shared), `NSMC` (its NSMC review parquet).
- `run_kr3(*overrides)`: one `run.py` job as a subprocess (under torchrun with `nproc`), its output in a log; returns
  a `Run` (its folder, wall time, the child's peak RSS) or exits with the log's tail when the job fails.
  `kr3_command` is the command line alone (for a server the caller keeps running).
- `metrics(run_dir)`, `train_speed(run_dir)`: the rows of a run's metrics.jsonl, and the medians of its logged train
  windows (tokens/s, MFU; the peak GPU memory and the last val loss).
- Corpora: `synthetic_corpus` (Zipf-distributed words of random Hangul syllables: no Hub, no ../shared),
  `local_data` (the overrides that prepare and train on a parquet file), `require_nsmc` and `nsmc_data_dir`
  (../shared's NSMC prepared with the default tokenizer, prepared first when it is not yet).
- `plain_loop`: the nanoGPT-style loop (eager fp32, bf16 autocast, compiled) the CPU benchmarks set kr3's trainer
  against.
- `machine_line`, `print_table`: a results table headed by the machine that made it (CPU model and its avx2 /
  avx512f / avx512_bf16 / amx flags, GPU, torch version and threads, date), so a figure copied into BENCHMARKS.md
  carries its machine and date.

Run a benchmark from the checkout as `uv run python bench/<name>.py` (or `python bench/<name>.py` on a GPU machine):
Python puts the script's folder, bench/, on sys.path, so `import harness` needs nothing more. kr3 is the installed
package (uv installs the checkout, editable); where it is not installed (a GPU machine with wheels carried, see
bench/gpu_check.py) this module puts the checkout on sys.path, once, for every script.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NSMC = SHARED / "data" / "nsmc_reviews.parquet"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides fp32/bf16 speed on a CPU
SMALL = dict(n_layers=6, n_heads=6, d_model=384, d_ffn=1536, block_size=256)  # the model=small shape, 8k vocabulary

if importlib.util.find_spec("kr3") is None:  # kr3 not installed: this checkout's
    sys.path.insert(0, str(ROOT))


# --- running kr3 -----------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """A finished `run.py` job."""

    dir: Path | None  # its run folder (hydra.run.dir), where one was given
    wall_s: float  # from start to exit, Python start-up and imports included
    peak_rss_mib: float  # the child's own peak RSS (under torchrun: the largest of its processes)
    log: Path | None  # stdout and stderr, where a log was asked for


def kr3_command(*overrides: str, nproc: int = 0) -> list[str]:
    """`python run.py OVERRIDES`, or under `torchrun --standalone --nproc_per_node=NPROC` when nproc > 0."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    return [sys.executable, *launcher, str(ROOT / "run.py"), *overrides]


def run_kr3(*overrides: str, run_dir: Path | None = None, log: Path | None = None, nproc: int = 0,
            env: dict[str, str] | None = None) -> Run:
    """Run `run.py` with `overrides` (and `hydra.run.dir=RUN_DIR`) to its end, its output into `log` (a temporary
    file, removed after a success, when none is given); `env` is added to this process's environment. A failed
    job ends the benchmark with the command and the log's last 3,000 characters."""
    cmd = kr3_command(*overrides, *([f"hydra.run.dir={run_dir}"] if run_dir else []), nproc=nproc)
    log_path = log or Path(tempfile.mkstemp(prefix="kr3-bench-", suffix=".log")[1])
    start = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env} if env else None)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource use, its peak RSS among it
    wall = time.perf_counter() - start
    if status:
        sys.exit(f"{' '.join(overrides)} failed ({os.waitstatus_to_exitcode(status)}):\n" + log_path.read_text()[-3000:])
    if log is None:
        log_path.unlink()
    return Run(dir=run_dir, wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024, log=log)


# --- reading a run ---------------------------------------------------------------------------------------------------

def metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_speed(run_dir: Path, skip: int = 1, drop_last: bool = True) -> dict:
    """Medians over the run's logged train windows, leaving out the first `skip` (warm-up, compilation) and, with
    `drop_last`, the last (a partial window); all windows where that leaves none. tokens_per_s and mfu: medians;
    mem_gib: the largest peak GPU memory; val_loss: the last val/loss logged. A field not logged (MFU without a
    known peak, GPU memory on a CPU, no evaluation) is NaN."""
    rows = metrics(run_dir)
    train = [r for r in rows if "train/tokens_per_s" in r]
    kept = train[skip : len(train) - 1 if drop_last else None] or train
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    nan = float("nan")
    return {"tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in kept),
            "mfu": statistics.median(r.get("train/mfu", nan) for r in kept),
            "mem_gib": max(r.get("train/peak_mem_gib", nan) for r in kept),
            "val_loss": val[-1] if val else nan, "windows": len(kept)}


# --- corpora ---------------------------------------------------------------------------------------------------------

def synthetic_corpus(path: Path, n_reviews: int, seed: int = 0) -> Path:
    """A parquet of `n_reviews` reviews (Rating 0–2, Review): Zipf-distributed words of random Hangul syllables, so an
    8k SentencePiece vocabulary trains and the tokens look like real text to a model. Needs no Hub and no ../shared."""
    import numpy as np
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
    return Path(path)


def local_data(src: Path, data_dir: Path | None = None, vocab_size: int | None = None) -> list[str]:
    """The overrides that prepare (and train on) the parquet file `src`, into `data_dir` when given."""
    return ["data=local", f"data.path={src}", *([f"paths.data_dir={data_dir}"] if data_dir else []),
            *([f"tokenizer.vocab_size={vocab_size}"] if vocab_size else [])]


def trained_checkpoint(out: Path, model: str, steps: int) -> Path:
    """A checkpoint of `model` trained for `steps` steps on a synthetic corpus (reused when already there)."""
    run_dir = out / f"run-{model}-{steps}"
    if not (run_dir / "checkpoints").is_dir():
        src = synthetic_corpus(out / "corpus.parquet", 20_000)
        run_kr3(f"paths.root_dir={out}", "stage=train", *local_data(src, vocab_size=4000), "experiment=smoke",
                f"model={model}", f"trainer.max_steps={steps}", "trainer.eval_interval=0", "trainer.final_eval_tokens=4096",
                run_dir=run_dir, log=out / "train.log")
    return run_dir


def require_nsmc() -> Path:
    """../shared's NSMC parquet, or the end of the benchmark saying it is absent."""
    if not NSMC.exists():
        sys.exit(f"{NSMC} is absent: this benchmark needs ../shared")
    return NSMC


def nsmc_data_dir(refresh: bool = False) -> Path:
    """The prepared NSMC folder with the default tokenizer, data/local-spbpe8000-*: `run.py stage=prepare data=local
    data.path=../shared/data/nsmc_reviews.parquet` is run first when there is none yet, or with `refresh` (kr3 then
    reuses an up-to-date folder)."""
    def found() -> Path | None:
        return next((p for p in (ROOT / "data").glob("local-spbpe8000-*") if (p / "meta.json").exists()), None)

    if refresh or found() is None:
        run_kr3("stage=prepare", *local_data(require_nsmc()))
    return found()


# --- the plain loop --------------------------------------------------------------------------------------------------

PLAIN_MODES = ("fp32", "bf16", "compile", "bf16-compile")  # nanoGPT's: bf16 autocast and torch.compile, alone or together


def plain_loop(steps: int, shape: dict = SMALL, batch: int = 16, mode: str = "fp32") -> dict:
    """nanoGPT-style, on the prepared NSMC data: random windows from the memmap, forward/backward of kr3's GPT with
    torch's cross-entropy of the logits, AdamW; `mode` as nanoGPT's train.py offers (PLAIN_MODES). Tokens/s: the
    median over steps after the first two (compilation); the peak RSS of this process. Run it in a process of its own:
    the number is then the loop's, and its swap of kr3's attention for torch's kernel stays there."""
    import contextlib
    import resource

    import numpy as np
    import torch
    import torch.nn.functional as F

    from kr3 import model as kr3_model
    from kr3.model import GPT, GPTConfig

    kr3_model.attention = F.scaled_dot_product_attention  # nanoGPT's attention: torch's kernel in the loop's dtype
    data_dir = nsmc_data_dir()
    meta = json.loads((data_dir / "meta.json").read_text())
    data = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], **shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if "compile" in mode else model
    autocast = torch.autocast("cpu", torch.bfloat16) if "bf16" in mode else contextlib.nullcontext()
    T = shape["block_size"]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        ix = np.random.randint(0, len(data) - T - 1, batch)
        chunk = torch.from_numpy(np.stack([data[i : i + T + 1] for i in ix]).astype(np.int64))
        with autocast:
            logits = forward(chunk[:, :-1])
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), chunk[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens_per_s": batch * T / statistics.median(times[2:] or times), "peak_rss_mib": peak_rss}


# --- the machine and the results table -------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.partition(":")[2].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def machine() -> dict:
    """What a figure depends on: CPU model, its relevant flags, cores, GPU, torch version and threads, the date."""
    import torch

    from kr3.hardware import cpu_flags

    model, flags = cpu_model(), cpu_flags()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": model, "cpus": os.cpu_count(), "flags": [f for f in CPU_FLAGS if f in flags],
            "no_flags": [f for f in CPU_FLAGS if f not in flags], "gpu": gpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def machine_line() -> str:
    """One line naming the machine, e.g. `machine: Intel(R) Xeon(R) Processor @ 2.80GHz, 2 CPUs, avx2 avx512f
    (no avx512_bf16 amx_bf16 amx_tile), no GPU; torch 2.15.0, 2 threads; 2026-05-01 11:00`."""
    m = machine()
    flags = " ".join(m["flags"]) or "none of " + " ".join(CPU_FLAGS)
    absent = f" (no {' '.join(m['no_flags'])})" if m["flags"] and m["no_flags"] else ""
    return (f"machine: {m['cpu']}, {m['cpus']} CPUs, {flags}{absent}, {m['gpu'] or 'no GPU'}; torch {m['torch']}, "
            f"{m['threads']} thread{'' if m['threads'] == 1 else 's'}; {m['date']}")


def table_head(columns: list[str]) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def table_row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def print_table(columns: list[str], rows: list[list], note: str | None = None) -> None:
    """A markdown results table, headed by the machine line (and `note`: the command's settings)."""
    print("\n" + machine_line())
    if note:
        print(note)
    print(table_head(columns))
    for row in rows:
        print(table_row(row))
    sys.stdout.flush()
