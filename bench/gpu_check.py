"""One command for a fresh GPU machine: the bare model step against `run.py stage=train`, with a profile, then the
other stages on what it trained.

    python bench/gpu_check.py                    # on the GPU machine, within ~9 minutes
    python bench/gpu_check.py --shapes small --stages none   # after a fix: model=small alone (its data already prepared)
    uv run python bench/gpu_check.py --device cpu   # a dry run of the whole script here first (tiny shapes)

It needs no Hub and no ../shared: a synthetic corpus (`harness.synthetic_corpus`: Zipf words of Hangul syllables) is
written, prepared with the default SentencePiece tokenizer, and trained on. What it runs, bf16:
  - the bare step (forward, backward, clipping, fused AdamW on random tokens; no trainer), with kr3's
    chunked loss and with torch's cross-entropy on the full logits, eager and compiled;
  - `run.py stage=train` for model=small (batch 256 × 256), model=base (batch 64 × 512, dropout 0) and the Llama-style
    block at model=small's size, eager and compiled; small eager again under `trainer.profile` and under
    `torchrun --nproc_per_node=1`;
then prints one table (tokens/s, trainer/bare ratio, MFU, peak memory), headed by the machine (bench/harness.py), and
the trainer's top CUDA and CPU ops. Then `--stages` (each a line of results, or the line of its failure): `resume`
(the small eager run, trained on), `evaluate` and `generate` on its checkpoint, `latency` (bench/generate_latency.py:
ms per token and time to first token, batch 1, KV cache) and `serve` (bench/serve_load.py: 32 streaming clients on
its checkpoint, loopback only).

A GPU machine with torch but without kr3's other dependencies (the lent H200: Python 3.12, no package index):
carry them as wheels in the checkout's .whl/ (the versions uv.lock pins; all pure Python):
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
        hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    python3 -m pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl   # a source archive only: build it here
there, before this script:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""

import argparse
import importlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import harness  # puts this checkout on sys.path where kr3 is not installed (the wheels above carry no kr3)

NEEDED = ["hydra", "omegaconf", "datasets", "sentencepiece", "tokenizers", "pandas", "pyarrow", "tqdm", "matplotlib",
          "filelock"]  # what prepare and train import
SHAPES = {  # name: (model overrides, batch, block)
    "small": (["model=small"], 256, 256),
    "base": (["model=base", "model.dropout=0.0"], 64, 512),
    "llama": (["model=small", "model.arch=llama", "model.d_ffn=1024"], 256, 256),  # model=small's parameters
}
DRY = {"small": (["model=tiny"], 8, 64), "base": (["model=tiny", "model.n_layers=3"], 4, 64),
       "llama": (["model=tiny", "model.arch=llama", "model.d_ffn=160"], 8, 64)}
STAGES = ("resume", "evaluate", "generate", "latency", "serve")
VOCAB = {"cuda": 8000, "cpu": 4000}  # the prepared vocabulary; the bare step uses the same


def check_imports() -> None:
    missing = []
    for mod in NEEDED:
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        sys.exit(f"cannot import {', '.join(missing)} — carry wheels as this file's docstring says")


def bare_step(model_args: list[str], batch: int, block: int, device: str, compiled: bool, torch_loss: bool,
              steps: int) -> dict:
    """tokens/s of the model alone: what the trainer should approach."""
    import torch
    import torch.nn.functional as F

    from kr3 import hardware
    from kr3.config import compose
    from kr3.model import GPT, GPTConfig

    cfg = compose([*model_args, f"model.block_size={block}"])
    torch._dynamo.reset()  # each shape compiled afresh: a second shape would otherwise be compiled dynamic
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_cfg(cfg.model, vocab_size=VOCAB[device])).to(device)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, fused=device == "cuda")
    dev, dtype = torch.device(device), hardware.resolve_precision("bf16", torch.device(device))
    forward = torch.compile(model) if compiled else model
    x = torch.randint(0, VOCAB[device], (batch, block + 1), device=device)

    def loss_of(inp, tgt):
        if torch_loss:
            return F.cross_entropy(forward(inp).flatten(0, 1).float(), tgt.flatten())
        return forward(inp, tgt)

    def step():
        with hardware.autocast(dev, dtype):
            loss = loss_of(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, batch * block, device, model.flops_per_token())


def timed(step, steps: int, tokens_per_step: int, device: str, flops_per_token: float) -> dict:
    import torch

    from kr3 import hardware

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    tps = tokens_per_step * steps / (time.perf_counter() - start)
    peak = hardware.peak_flops(torch.device(device), torch.bfloat16)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"tokens_per_s": tps, "mfu": flops_per_token * tps / peak if peak else float("nan"), "mem_gib": mem}


def trainer(name: str, out: Path, data: list[str], extra: list[str], steps: int, device: str,
            torchrun: bool = False) -> dict:
    """A real `run.py stage=train` job; its speed from metrics.jsonl (median after the first logged window)."""
    run_dir = out / name.replace(" ", "-")
    shutil.rmtree(run_dir, ignore_errors=True)  # a second run of this script trains anew (kr3 refuses a used folder)
    harness.run_kr3(*data, "stage=train", "logger=none", "trainer.precision=bf16", f"trainer.device={device}",
                    f"trainer.max_steps={steps}", "trainer.log_interval=5", "trainer.eval_interval=0",
                    "trainer.final_eval_tokens=16384", "trainer.sample_prompts=null", "trainer.ckpt_interval=0", *extra,
                    run_dir=run_dir, log=out / f"{run_dir.name}.log", nproc=1 if torchrun else 0)
    return {**harness.train_speed(run_dir, skip=1), "dir": run_dir}


def prepare(out: Path, device: str) -> list[str]:
    src = harness.synthetic_corpus(out / "corpus.parquet", 300_000 if device == "cuda" else 20_000)
    data = harness.local_data(src, out / "data", VOCAB[device])
    harness.run_kr3("stage=prepare", *data, run_dir=out / "prepare", log=out / "prepare.log")
    return data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per job (default 40 on cuda, 4 on cpu)")
    ap.add_argument("--out", type=Path, default=harness.ROOT / "outputs" / "gpu-check")
    ap.add_argument("--shapes", default="small,base,llama", help="of small,base,llama; torchrun, the profile and the "
                    "stages run with small")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"of {','.join(STAGES)}, or none")
    a = ap.parse_args()
    check_imports()
    steps = a.steps or (40 if a.device == "cuda" else 4)
    wanted = a.shapes.split(",")
    if not set(wanted) <= set(SHAPES):
        sys.exit(f"--shapes {a.shapes}: choose from {','.join(SHAPES)}")
    shapes = {k: v for k, v in (SHAPES if a.device == "cuda" else DRY).items() if k in wanted}
    a.out.mkdir(parents=True, exist_ok=True)
    print(harness.machine_line() + ("" if a.device == "cuda" else " (a CPU dry run)"), flush=True)
    data = prepare(a.out, a.device)
    # the trainer jobs first, while this process has run no torch op (no thread pool of its own competing)
    jobs = {}
    for shape, (model_args, batch, block) in shapes.items():
        for compiled in (False, True):
            extra = [*model_args, f"trainer.batch_size={batch}", f"model.block_size={block}",
                     *(["trainer.compile=true"] if compiled else [])]
            jobs[shape, compiled] = trainer(f"{shape} {'compiled' if compiled else 'eager'}", a.out, data, extra,
                                            steps + 10, a.device)
            print(f"{shape} compiled={compiled}: {jobs[shape, compiled]['tokens_per_s']:,.0f} tokens/s", flush=True)
    if "small" in shapes:
        small = [*shapes["small"][0], f"trainer.batch_size={shapes['small'][1]}", f"model.block_size={shapes['small'][2]}"]
        ddp = trainer("small eager torchrun", a.out, data, small, steps + 10, a.device, torchrun=True)
        profiled = trainer("small eager profiled", a.out, data,
                           [*small, "trainer.profile.start=5", "trainer.profile.steps=3"], 10, a.device)
    rows = []
    for (shape, compiled), run in jobs.items():
        model_args, batch, block = shapes[shape]
        mode = "compiled" if compiled else "eager"
        bare = bare_step(model_args, batch, block, a.device, compiled, False, steps)
        bare_torch = bare_step(model_args, batch, block, a.device, compiled, True, steps)
        rows += [(f"{shape} {mode}: bare, kr3 loss", bare, bare), (f"{shape} {mode}: bare, torch loss", bare_torch, bare),
                 (f"{shape} {mode}: run.py stage=train", run, bare)]
        if (shape, compiled) == ("small", False):
            rows.append(("small eager: torchrun, 1 process", ddp, bare))
    report(rows, profiled["dir"] / "profile" / "top_ops.txt" if "small" in shapes else None)
    if "small" in shapes:
        other_stages([s for s in a.stages.split(",") if s in STAGES], jobs["small", False], data, a.out, steps, a.device)


def report(rows, top_ops: Path | None) -> None:
    harness.print_table(["job", "tokens/s", "vs bare (kr3 loss)", "MFU", "peak GPU memory (GiB)"],
                        [[name, f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / bare['tokens_per_s']:.2f}",
                          f"{r['mfu']:.1%}", f"{r['mem_gib']:.1f}"] for name, r, bare in rows])
    if top_ops:
        print(f"\nthe trainer's top ops ({top_ops}):\n{top_ops.read_text()}")


def other_stages(stages: list[str], small: dict, data: list[str], out: Path, steps: int, device: str) -> None:
    """The stages after training, on the small eager run: each prints its result or the line of its failure, and the
    next one runs either way."""
    run_dir, bench = small["dir"], Path(__file__).resolve().parent
    cpu = device == "cpu"

    def stage(name: str, work) -> None:
        if name not in stages:
            return
        start = time.perf_counter()
        try:
            result = work()
        except (Exception, SystemExit) as e:  # harness.run_kr3 exits: a line of the report, not the script's end
            result = f"failed: {type(e).__name__}: {str(e).strip()[-1500:]}"
        print(f"\n{name} ({time.perf_counter() - start:.0f} s): {result}", flush=True)

    def resume():
        harness.run_kr3(*data, "stage=train", "logger=none", "trainer.precision=bf16", f"trainer.device={device}",
                        f"trainer.max_steps={2 * (steps + 10)}", "trainer.resume=auto", "trainer.log_interval=5",
                        "trainer.eval_interval=0", "trainer.final_eval_tokens=16384", run_dir=run_dir, log=out / "resume.log")
        logged = [r["step"] for r in harness.metrics(run_dir) if "train/loss" in r]
        return f"steps logged {logged[-4:]}, {harness.train_speed(run_dir, skip=1)['tokens_per_s']:,.0f} tokens/s"

    def evaluate():
        harness.run_kr3("stage=evaluate", f"checkpoint={run_dir}", "evaluate.max_tokens=262144", run_dir=out / "evaluate",
                        log=out / "evaluate.log")
        return (out / "evaluate.log").read_text().strip().splitlines()[-1][:200]

    def generate():
        harness.run_kr3("stage=generate", f"checkpoint={run_dir}", "generate.prompt='맛있는'", run_dir=out / "generate",
                        log=out / "generate.log")
        return (out / "generate.log").read_text().strip().splitlines()[-1][:200]

    def script(*args: str) -> str:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(proc.stderr.strip() or f"exit status {proc.returncode}")
        return "\n" + proc.stdout.strip()

    stage("resume", resume)
    stage("evaluate", evaluate)
    stage("generate", generate)
    stage("latency", lambda: script(str(bench / "generate_latency.py"), f"--device={device}",
                                    *(["--new=32", "--repeats=1"] if cpu else [])))
    stage("serve", lambda: script(str(bench / "serve_load.py"), f"--checkpoint={run_dir}", f"--out={out / 'serve'}",
                                  "--max-tokens=64", "--min-tokens=64",
                                  *(["--clients=4", "--seconds=5", "--single-seconds=3"] if cpu else
                                    ["--clients=32", "--seconds=20", "--single-seconds=8"])))


if __name__ == "__main__":
    main()
