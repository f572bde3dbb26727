"""Device, precision and peak-FLOPs facts, for choosing defaults and reporting MFU."""

from __future__ import annotations

import ctypes
import time
from contextlib import nullcontext

import torch

from kr3.errors import UserError

# dense bf16 / fp32 peaks in FLOP/s, matched by substring of the CUDA device name; fp32 is TF32 on tensor cores
# where the GPU has them (Ampere and later: `setup` allows it), else plain fp32
CUDA_PEAK = {
    "H200": (989e12, 495e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 495e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12),
    "A10": (125e12, 62.5e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 on CPUs with AVX512-BF16 or AMX; without them oneDNN emulates (much slower)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return "AMX" in cap or "AVX512_BF16" in cap or ("AVX512" in cap and "avx512_bf16" in cpu_flags())


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (/proc/cpuinfo); none where it is not there to read."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing large blocks back to the OS: by default
    every step's logits and activations are fresh mmaps, faulted in page by page (a third of a small
    model's CPU time went to the kernel here; BENCHMARKS.md). jemalloc/tcmalloc do the same. Returns
    False, changing nothing, where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


def resolve_device(name: str) -> torch.device:
    from kr3 import distributed

    if name == "auto":
        return distributed.device()
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible — use device=auto or cpu (trainer.device, "
                        "generate.device, ...)")
    if name not in ("cpu", "cuda"):
        raise UserError(f"device={name} is not known — use auto, cpu or cuda (trainer.device, generate.device, ...)")
    return distributed.device() if name == "cuda" else torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    raise UserError(f"precision={name} is not known — use auto, fp32 or bf16")


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> float:
    """Per-device peak FLOP/s: a config value, the CUDA table, or a measured CPU matmul peak."""
    if override:
        return float(override)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in CUDA_PEAK.items():
            if key in name:
                return bf16 if dtype == torch.bfloat16 else fp32
        return 0.0  # unknown GPU: MFU not reported
    return measure_matmul_flops(dtype)


def measure_matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0, trials: int = 5) -> float:
    """Best of `trials` timed windows after a warm-up: a peak, so a window slowed by a neighbour or by threads
    still waking up does not count (one 0.3 s window, and later best of three 0.2 s windows, gave MFU above
    100 % on a shared machine; BENCHMARKS.md)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / trials:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


def setup(device: str, precision: str, threads: int | None = None) -> tuple[torch.device, torch.dtype]:
    """A stage's device and precision from its config values; on a CPU, freed memory is kept for reuse, on a
    CUDA GPU fp32 matmuls may use TF32 (tensor cores, 10-bit mantissa, so about 1e-3 relative; Ampere and later, as
    nanoGPT)."""
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    if dev.type == "cpu":
        keep_freed_memory()
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    return dev, dtype
