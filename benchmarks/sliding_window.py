"""Sliding windows against full causal attention, timed in one process.

    python benchmarks/sliding_window.py [--repeats 3]

- prefill: causal 1.5-entmax in the blocked backend, B=1, H=8 query heads over
  2 KV heads, N=16,384, D=64, q, k ~ N(0, 1), with and without ``window=W``;
- decode: one query token per head (H=32 over 8 KV heads, D=128) after a
  cache of 262,144 Gaussian tokens in pages of 16, with and without a window
  of 4,096, and the bytes of keys and values each read.
"""

from __future__ import annotations

import argparse

import torch

import sparsa
from sparsa.attention import PagedKVCache, decode
from sparsa.benchmarks.timing import machine, machine_line, markdown, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    n = 16384
    q, k, v = torch.randn(1, 8, n, 64), torch.randn(1, 2, n, 64), torch.randn(1, 2, n, 64)
    _, causal = measure(lambda: sparsa.attention(q, k, v, is_causal=True, backend="blocked"), args.repeats)
    rows.append(["prefill, 16,384 tokens", "none", f"{causal:.3f}", "1.00x", ""])
    for window in (512, 4096):
        _, seconds = measure(
            lambda w=window: sparsa.attention(q, k, v, is_causal=True, window=w, backend="blocked"),
            args.repeats,
        )
        rows.append(
            ["prefill, 16,384 tokens", f"{window:,}", f"{seconds:.3f}", f"{seconds / causal:.2f}x", ""]
        )
    n = 262144
    cache = PagedKVCache(1, 8, 128, page_size=16)
    cache.append(torch.randn(1, 8, n, 128), torch.randn(1, 8, n, 128))
    q = torch.randn(1, 32, 1, 128)
    full = None
    for window in (None, 4096):
        _, seconds = measure(lambda w=window: decode(q, cache, window=w), args.repeats)
        full = full or seconds
        _, stats = decode(q, cache, window=window, return_stats=True)
        shown = "none" if window is None else f"{window:,}"
        read = f"{stats.bytes_read / 2**20:.1f}"
        rows.append(["decode, 262,144 cached", shown, f"{seconds:.4f}", f"{seconds / full:.2f}x", read])
    headers = ["case", "window", "seconds", "against no window", "MiB read"]
    print(markdown(headers, {"seconds", "against no window", "MiB read"}, rows))
    print(f"\n{args.repeats} repeats (median); {machine_line(machine())}")


if __name__ == "__main__":
    main()
