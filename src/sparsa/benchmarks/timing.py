"""Timing and table helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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


def ratio(value: float | None) -> str:
    """A ratio to a baseline as printed in tables ("" when there is none)."""
    return "" if value is None else f"{value:.2f}x"


def markdown(headers: list[str], right_aligned: set[str], rows: list[list[str]]) -> str:
    """A Markdown table; columns named in right_aligned are numbers."""
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---:" if h in right_aligned else "---" for h in headers) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)
