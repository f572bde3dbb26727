"""How long `stage=report` takes over an 8-job sweep: a real sweep of smoke runs (4 learning rates × 2 depths,
on bench/gpu.py's synthetic corpus, 200 steps each, logged every step), then `run.py stage=report` timed
end to end (Python start, imports, tables, five pictures) and the report alone in this process.

    uv run python bench/report_speed.py [--out /tmp/kr3-report-bench] [--repeats 3]
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/kr3-report-bench"))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from gpu import corpus

    a.out.mkdir(parents=True, exist_ok=True)
    src = a.out / "corpus.parquet"
    corpus(src, 20_000)
    sweep = [sys.executable, str(ROOT / "run.py"), "-m", "stage=train", f"paths.root_dir={a.out}", "data=local",
             f"data.path={src}", "tokenizer.vocab_size=4000", "experiment=smoke", "trainer.max_steps=200",
             "trainer.eval_interval=50", "trainer.lr=1e-3,3e-3,1e-2,3e-2", "model.n_layers=1,2"]
    subprocess.run(sweep, check=True, capture_output=True)
    folder = sorted((a.out / "multirun").glob("*/*"))[-1]
    report = [sys.executable, str(ROOT / "run.py"), "stage=report", f"report.dir={folder}"]
    walls = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        subprocess.run(report, check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
    from kr3 import report as kreport

    start = time.perf_counter()
    jobs = kreport.find_jobs(folder)
    df, swept = kreport.table(jobs, folder)
    kreport.write(df, swept, jobs, folder)
    alone = time.perf_counter() - start
    print(f"{len(jobs)} jobs in {folder}")
    print(f"run.py stage=report: median {statistics.median(walls):.2f} s of {', '.join(f'{w:.2f}' for w in walls)}")
    print(f"the report alone (find, table, write): {alone:.2f} s")


if __name__ == "__main__":
    main()
