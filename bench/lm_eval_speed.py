"""lm-eval on kr3, both ways, over the KR3 cloze task (`--items` of them, 4 choices each: 4x as many log-likelihood
requests): in this process through kr3.harness.HarnessModel, and through stage=serve's app (uvicorn on 127.0.0.1, a
free port, in a thread of this process) with lm-eval's local-completions model, `--batch` prompts per request. Both
give the same accuracy; the table says how long each took.

    uv run python bench/lm_eval_speed.py [--checkpoint PATH] [--items 1000] [--batch 16]

Without --checkpoint it trains model=small for `--steps` steps on harness.synthetic_corpus's synthetic Korean corpus
in `--out` (the shape of the serving benchmarks).
"""

import argparse
import os
import threading
import time
from pathlib import Path

import harness


def served(m) -> str:
    """stage=serve's app on 127.0.0.1 in a thread (it stops with this process): its base URL."""
    import uvicorn

    from kr3 import serve

    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(serve.app(m), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return serve.url(sock).rstrip("/")


def timed(**kwargs) -> tuple[float, float, int]:
    """(seconds, accuracy, items) of lm-eval's simple_evaluate on kr3_cloze."""
    import lm_eval

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(tasks=["kr3_cloze"], log_samples=False, **kwargs)
    done = results["results"]["kr3_cloze"]
    return time.perf_counter() - start, done["acc,none"], results["n-samples"]["kr3_cloze"]["effective"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)  # serve.max_prompts's default
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("/tmp/kr3-bench-lm-eval"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_DATASETS_OFFLINE"] = "1"

    from lm_eval.tasks import TaskManager

    import kr3
    from kr3.harness import HarnessModel, write_kr3_tasks

    m = kr3.load(args.checkpoint or harness.trained_checkpoint(args.out, "small", args.steps), device="cpu", precision="fp32")
    tasks = TaskManager(include_path=str(write_kr3_tasks(m, args.out / "tasks")))
    rows = []
    seconds, acc, items = timed(model=HarnessModel(m, batch_size=args.batch), task_manager=tasks, limit=args.items)
    rows.append(["in process (kr3.harness)", f"{seconds:.1f}", f"{4 * items / seconds:.0f}", f"{acc:.4f}"])
    model_args = f"base_url={served(m)}/v1/completions,model=kr3,max_length={m.model.cfg.block_size},batch_size={args.batch}"
    seconds, acc, items = timed(model="local-completions", model_args=model_args, task_manager=tasks, limit=args.items)
    rows.append(["server (local-completions)", f"{seconds:.1f}", f"{4 * items / seconds:.0f}", f"{acc:.4f}"])
    harness.print_table(["path", "seconds", "requests/s", "kr3_cloze acc"], rows,
                        note=f"{items} kr3_cloze items ({4 * items} log-likelihood requests: the val reviews of 4+ words "
                             f"among the first {args.items}), {m.describe()}, batches of {args.batch}")


if __name__ == "__main__":
    main()
