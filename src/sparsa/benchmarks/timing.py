"""Timing and table helpers shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

import sparsa


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call seconds, median seconds of ``repeats`` further calls).

    The first call carries one-off costs (compilation, caches) and is reported apart.
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def measure_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each of ``fns`` over ``repeats`` rounds that call every one in turn, after one
    warm-up call each: a machine whose speed drifts slows all of them alike, so their ratios hold."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def ratio(value: float | None) -> str:
    """A ratio to a baseline as printed in tables ("" when there is none)."""
    return "" if value is None else f"{value:.2f}x"


def markdown(headers: list[str], right_aligned: set[str], rows: list[list[str]]) -> str:
    """A Markdown table; columns named in right_aligned are numbers."""
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---:" if h in right_aligned else "---" for h in headers) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def machine() -> dict:
    """What a benchmark record says about the machine it ran on (every speed figure names it)."""
    return {
        "sparsa_version": sparsa.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def machine_line(record: dict) -> str:
    """One line naming a record's machine, for under its tables."""
    return (
        f"{record.get('cpu') or record.get('machine')}, {record.get('cpu_capability', 'unknown ISA')}, "
        f"{record['threads']} threads, torch {record['torch_version']}, sparsa {record['sparsa_version']}"
    )


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
