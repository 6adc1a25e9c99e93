"""Shared measuring tools for the benchmarks: timing, peak memory, result files."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xclr_plugin.atomic import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"

#: The losses compared as the batch grows (bench_loss_scaling on CPU, cuda_check on GPU).
LOSS_METHODS = (
    "xclr-dense",
    "xclr-chunked",
    "ntxent",
    "clip",
    "xclr-clip-dense",
    "xclr-clip-chunked",
)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_delta_mib(
    script: str, case: list[str], timeout: float = 900.0
) -> float | None:
    """Runs ``script --memory-case CASE...`` in a fresh process and returns what it prints.

    Memory is measured in a separate process per case because CPU torch has no peak
    allocation counter and freed memory may stay mapped: the child sets up its inputs,
    runs one warm-up step, then prints :func:`measure_peak_mib` of one more step. Returns None
    if the case ran out of memory or time.
    """
    cmd = [sys.executable, script, "--memory-case", *case]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    return float(out.stdout.strip().splitlines()[-1])


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak_rss() -> float:
    """Resets the kernel's peak-RSS mark to the current RSS and returns that RSS in MiB.

    Linux only (``/proc/self/clear_refs``): exact peak tracking without sampling, so a
    loss step's peak is measured even when importing torch peaked higher.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss`, in MiB."""
    return _status_mib("VmHWM")


def measure_peak_mib(step: Callable[[], object]) -> float:
    """Growth of the resident set at its peak while ``step()`` runs, in MiB."""
    base = reset_peak_rss()
    step()
    return peak_rss_mib() - base


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


def command_line() -> str:
    return "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]]
    )


def write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(path, payload)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
