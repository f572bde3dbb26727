"""What glibc's handling of freed memory costs a CPU training step: the plain eager fp32 loop
(`harness.plain_loop`, the one bench/train_throughput.py compares with) with glibc's defaults, or after
`kr3.hardware.keep_freed_memory()`. Prints tokens/s (median step), minor page faults and user/system CPU
seconds. One process per mode (the setting is process-wide). Needs ../shared: the prepared nsmc data is made
first when there is none.

    uv run python bench/cpu_allocator.py plain 60 tiny     # 2 layers, d_model 128, block 64, batch 64
    uv run python bench/cpu_allocator.py mallopt 60 tiny
    uv run python bench/cpu_allocator.py plain 10          # 6 layers, d_model 384, block 256, batch 16
"""

import resource
import sys

import harness

from kr3.hardware import keep_freed_memory

TINY = dict(n_layers=2, n_heads=2, d_model=128, d_ffn=512, block_size=64)

mode, steps, tiny = sys.argv[1], int(sys.argv[2]), len(sys.argv) > 3
harness.nsmc_data_dir()  # prepared before the measurement, not inside it
print(harness.machine_line())
if mode == "mallopt":
    print("keep_freed_memory:", keep_freed_memory())
r0 = resource.getrusage(resource.RUSAGE_SELF)
tps = harness.plain_loop(steps, TINY, 64)["tokens_per_s"] if tiny else harness.plain_loop(steps)["tokens_per_s"]
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(f"{mode}: {tps:,.0f} tok/s, minor faults {r1.ru_minflt - r0.ru_minflt:,}, "
      f"sys {r1.ru_stime - r0.ru_stime:.1f} s, user {r1.ru_utime - r0.ru_utime:.1f} s")
