"""Attention benchmark: sparsa's blocked 1.5-entmax attention against torch SDPA and a dense entmax pipeline.

B=1, H=8, D=64, causal, fp32 on CPU. For each length and score distribution
it measures forward and forward+backward time and the peak memory above the
inputs, each in a fresh process (so peaks do not mix), and reports them as
ratios to ``torch.nn.functional.scaled_dot_product_attention`` (softmax) and
to the dense pipeline (scores, ``entmax.entmax15``, weights @ V) measured in
the same run, with the share of score entries sparsa never computed.

Two score distributions: "trained" (each query aims at a few earlier keys,
as trained attention heads do) and "gaussian" (q, k ~ N(0, 1)).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import torch

import sparsa

from .timing import machine, markdown, ratio

FULL_LENGTHS = (1024, 4096, 16384, 65536)
QUICK_LENGTHS = (256,)
HEADS, HEAD_DIM = 8, 64
DENSE_MAX_LENGTH = 4096  # the dense pipeline holds (H, N, N) scores several times over
METHODS = ("sdpa", "sparsa", "dense-entmax")
TARGETED_KEYS = 3
WARM_UP_LENGTH = 256


def make_inputs(length: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    k = torch.randn(1, HEADS, length, HEAD_DIM, generator=generator)
    v = torch.randn(1, HEADS, length, HEAD_DIM, generator=generator)
    if kind == "gaussian":
        return torch.randn(1, HEADS, length, HEAD_DIM, generator=generator), k, v
    # Each query points at a few keys at or before its position: scores of about +6 for those, N(0, 1) else.
    positions = torch.arange(length).view(1, 1, length, 1) + 1
    targets = (torch.rand(1, HEADS, length, TARGETED_KEYS, generator=generator) * positions).long()
    aimed = k.gather(2, targets.view(1, HEADS, -1, 1).expand(-1, -1, -1, HEAD_DIM))
    aimed = aimed.view(1, HEADS, length, TARGETED_KEYS, HEAD_DIM).mean(3)
    q = 2.5 * aimed + 0.5 * torch.randn(1, HEADS, length, HEAD_DIM, generator=generator)
    return q, k, v


def _dense_entmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import entmax

    n = q.shape[2]
    scores = q @ k.transpose(-1, -2) / HEAD_DIM**0.5
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    return entmax.entmax15(scores.masked_fill(causal, float("-inf")), -1) @ v


def _run(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if method == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if method == "sparsa":
        return sparsa.attention(q, k, v, alpha=1.5, is_causal=True)
    return _dense_entmax(q, k, v)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Start a new resident-memory high-water mark (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _measure(method: str, length: int, kind: str, backward: bool, repeats: int, seed: int, queue) -> None:
    """In a fresh process: median seconds and peak MiB above the inputs of one configuration."""
    torch.manual_seed(seed)
    q, k, v = make_inputs(length, kind, seed)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    upstream = torch.randn(1, HEADS, length, HEAD_DIM)

    def call(q, k, v, upstream) -> float:
        start = time.perf_counter()
        out = _run(method, q, k, v)
        if backward:
            out.backward(upstream)
            q.grad = k.grad = v.grad = None
        return time.perf_counter() - start

    # Load libraries and compile kernels on a small problem first, so that neither counts.
    small = [t.detach()[:, :, :WARM_UP_LENGTH].clone().requires_grad_(backward) for t in (q, k, v)]
    call(*small, upstream[:, :, :WARM_UP_LENGTH])
    # The first full-size call measures the peak: later calls reuse memory the allocator kept.
    _reset_peak()
    baseline = _status_kib("VmRSS")
    times = [call(q, k, v, upstream)]
    peak = _status_kib("VmHWM") - baseline
    # Beyond 16k one call takes minutes: the first is timed; below, the repeats after it are.
    if length <= 16384:
        times = [call(q, k, v, upstream) for _ in range(repeats)]
    times.sort()
    queue.put((times[len(times) // 2], max(0, peak) / 1024))


def _in_fresh_process(*args) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def _sparsity(length: int, kind: str, seed: int) -> tuple[float, float]:
    q, k, v = make_inputs(length, kind, seed)
    _, stats = sparsa.attention(q, k, v, alpha=1.5, is_causal=True, return_stats=True)
    return stats.skipped_fraction, stats.support.float().mean().item()


def run(
    quick: bool = False,
    repeats: int = 2,
    seed: int = 0,
    lengths: tuple[int, ...] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Measure every length; ``progress`` receives the result so far after each length."""
    lengths = lengths or (QUICK_LENGTHS if quick else FULL_LENGTHS)
    rows = []
    result = {
        "benchmark": "attention",
        **machine(),
        "batch": 1,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "alpha": 1.5,
        "causal": True,
        "rows": rows,
    }
    for length in lengths:
        for kind in ("trained", "gaussian"):
            skipped, support = _sparsity(length, kind, seed)
            measured = {}
            for method in METHODS:
                if method == "dense-entmax" and length > DENSE_MAX_LENGTH:
                    continue
                reps = repeats if length <= 16384 else 1
                measured[method] = {
                    "forward": _in_fresh_process(method, length, kind, False, reps, seed),
                    "forward_backward": _in_fresh_process(method, length, kind, True, reps, seed),
                }
            for method, passes in measured.items():
                row = {"length": length, "scores": kind, "method": method}
                for name, (seconds, peak) in passes.items():
                    row[f"{name}_s"] = seconds
                    row[f"{name}_peak_mib"] = peak
                    for baseline in ("sdpa", "dense-entmax"):
                        if baseline in measured:
                            row[f"{name}_vs_{baseline}"] = seconds / measured[baseline][name][0]
                if method == "sparsa":
                    row["skipped_fraction"] = skipped
                    row["mean_support"] = support
                rows.append(row)
        if progress is not None:
            progress(result)
    return result


def markdown_table(result: dict) -> str:
    headers = [
        "N",
        "scores",
        "method",
        "fwd s",
        "fwd / SDPA",
        "fwd / dense",
        "fwd+bwd s",
        "fwd+bwd / SDPA",
        "fwd+bwd / dense",
        "fwd+bwd peak MiB",
        "skipped",
        "mean support",
    ]
    rows = [
        [
            str(row["length"]),
            row["scores"],
            row["method"],
            f"{row['forward_s']:.3f}",
            ratio(row.get("forward_vs_sdpa")),
            ratio(row.get("forward_vs_dense-entmax")),
            f"{row['forward_backward_s']:.3f}",
            ratio(row.get("forward_backward_vs_sdpa")),
            ratio(row.get("forward_backward_vs_dense-entmax")),
            f"{row['forward_backward_peak_mib']:.0f}",
            f"{row['skipped_fraction']:.2f}" if "skipped_fraction" in row else "",
            f"{row['mean_support']:.1f}" if "mean_support" in row else "",
        ]
        for row in result["rows"]
    ]
    return markdown(headers, {"N", *headers[3:]}, rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one short length (a smoke run)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed calls after a warm-up call (1 beyond 16k)"
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help=f"sequence lengths (default {list(FULL_LENGTHS)})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for attention.json")


def run_from_args(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "attention.json"

    def save(partial: dict) -> None:
        # Long lengths take many minutes each: keep what is measured if a run is stopped.
        path.write_text(json.dumps(partial, indent=2))
        print(f"measured up to N={partial['rows'][-1]['length']}; wrote {path}", flush=True)

    lengths = tuple(args.lengths) if args.lengths else None
    result = run(quick=args.quick, repeats=args.repeats, seed=args.seed, lengths=lengths, progress=save)
    print(markdown_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsa bench attention", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
