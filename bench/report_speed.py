"""How long `stage=report` takes over an 8-job sweep: a real sweep of smoke runs (4 learning rates × 2 depths,
on `harness.synthetic_corpus`'s synthetic corpus, 200 steps each, logged every step), then `run.py stage=report` timed
end to end (Python start, imports, tables, five pictures) and the report alone in this process. The machine line
(bench/harness.py) heads the times.

    uv run python bench/report_speed.py [--out /tmp/kr3-report-bench] [--repeats 3]
"""

import argparse
import statistics
import time
from pathlib import Path

import harness


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/kr3-report-bench"))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    src = harness.synthetic_corpus(a.out / "corpus.parquet", 20_000)
    harness.run_kr3("-m", "stage=train", f"paths.root_dir={a.out}", *harness.local_data(src, vocab_size=4000),
                    "experiment=smoke", "trainer.max_steps=200", "trainer.eval_interval=50",
                    "trainer.lr=1e-3,3e-3,1e-2,3e-2", "model.n_layers=1,2")
    folder = sorted((a.out / "multirun").glob("*/*"))[-1]
    walls = [harness.run_kr3("stage=report", f"report.dir={folder}").wall_s for _ in range(a.repeats)]
    from kr3 import report as kreport

    start = time.perf_counter()
    jobs = kreport.find_jobs(folder)
    df, swept = kreport.table(jobs, folder)
    kreport.write(df, swept, jobs, folder)
    alone = time.perf_counter() - start
    print(harness.machine_line())
    print(f"{len(jobs)} jobs in {folder}")
    print(f"run.py stage=report: median {statistics.median(walls):.2f} s of {', '.join(f'{w:.2f}' for w in walls)}")
    print(f"the report alone (find, table, write): {alone:.2f} s")


if __name__ == "__main__":
    main()
