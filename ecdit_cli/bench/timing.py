"""Measuring tools shared by the benchmarks: interleaved timing, peak memory, the machine.

Timings on a small shared machine are noisy: every benchmark runs its candidates interleaved
(round i runs them in an order rotated by i: ABC, BCA, CAB, ...), so a burst of load from another
process hits all of them alike, and reports medians and ratios taken within one run.

Peak memory is what a call allocates on top of what already exists: on CUDA from the caching
allocator's statistics, on the CPU from torch.profiler's allocation events (each tensor
allocation and free, in order; the peak of their running sum).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ecdit_cli import deepspeed_compat
from ecdit_cli.devices import resolve_device
from ecdit_cli.errors import EcditError


def bench_device(device: str) -> torch.device:
    """'cpu' or 'cuda' -> a torch.device (benchmarks name their device; no 'auto')."""
    return torch.device(resolve_device(device, "--device", allowed=("cpu", "cuda")))


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU, bf16 on a GPU (the precision each is trained in)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1,
                device: torch.device | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, `reps` times, interleaved.

    Each function first runs `warmup` times (allocator, thread pools, lazy inits), then round i
    runs all of them in the order rotated by i. On CUDA each call is bracketed by synchronize.
    """
    device = device or torch.device("cpu")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def summary(seconds: list[float]) -> dict[str, float]:
    """Median and interquartile range (both seconds) of repeated timings."""
    if not seconds:
        return {"median": float("nan"), "iqr": float("nan"), "n": 0}
    if len(seconds) < 4:
        iqr = max(seconds) - min(seconds)
    else:
        q = statistics.quantiles(seconds, n=4)
        iqr = q[2] - q[0]
    return {"median": statistics.median(seconds), "iqr": iqr, "n": len(seconds)}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C++ writes to fd 2 (kineto prints 'profiler_start/stop' lines on every profile)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def paired_ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over rounds of time[name] / time[ref] within the same round.

    The two ran back to back in every round, so a slow spell of the machine (other tenants,
    frequency) scales both; the median of these paired ratios is steadier than a ratio of
    medians taken over a drifting machine.
    """
    return statistics.median(a / b for a, b in zip(times[name], times[ref], strict=True))


def peak_memory(fn: Callable[[], Any], device: torch.device, before: Callable[[], Any] | None = None) -> int:
    """Bytes allocated at the peak of one call of `fn`, above what was allocated before it.

    `before` runs first, outside the measurement (e.g. freeing the previous call's gradients,
    whose release would otherwise count against this call's peak).
    """
    if before is not None:
        before()
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation and free is one '[memory]' event with a signed byte count.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What the numbers were measured on (goes into every report)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "load_avg_1m": load_average(),
    }
    info["deepspeed"] = deepspeed_compat.version()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> float | None:
    """1-minute load average (None where the OS has none): > the cores means contended timings."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def set_threads(threads: int) -> None:
    """Intra-op threads for the CPU benchmarks (0 keeps torch's default)."""
    if threads < 0:
        raise EcditError(f"threads={threads} is invalid: must be >= 0 (0 = torch's default)")
    if threads:
        torch.set_num_threads(threads)
