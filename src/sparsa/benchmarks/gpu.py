"""GPU benchmark of the Triton backend: correctness at long lengths, then time against SDPA and adasplash.

Each configuration times torch SDPA (softmax, flash backend), the `adasplash`
package (1.5-entmax, when installed) and sparsa's Triton backend on identical
inputs, forward and forward+backward, and reports ratios to SDPA. Scores are
Gaussian (q, k ~ N(0, 1)) or "trained-like" (each query close to a few keys,
the sparse regime of trained models).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .timing import markdown, ratio


def _inputs(batch, heads, n, dim, dtype, trained_like, seed=0, device="cuda"):
    generator = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, device=device, generator=generator)
    k = torch.randn(batch, heads, n, dim, device=device, generator=generator)
    if trained_like:
        # Each query is a noisy copy of one earlier key: a few keys dominate its row.
        source = torch.randint(0, n, (n,), device=device, generator=generator)
        source = torch.minimum(source, torch.arange(n, device=device))
        q = 3.0 * k[:, :, source] + 0.5 * q
    v = torch.randn(batch, heads, n, dim, device=device, generator=generator)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def _time(fn, backward: bool) -> float:
    import triton.testing

    if not backward:
        return triton.testing.do_bench(fn, warmup=5, rep=40)

    def step():
        out = fn()
        out.backward(torch.ones_like(out))

    return triton.testing.do_bench(step, warmup=3, rep=40)


def _sparsa(q, k, v, sizes, stats=False):
    from ..attention.masks import ScoreBias
    from ..attention.triton import triton_attention

    batch, heads, n, dim = q.shape
    bias = ScoreBias(batch, heads, n, n, is_causal=True, attn_mask=None, alibi_slopes=None, device=q.device)
    out, row_stats = triton_attention(q, k, v, 1.5, bias, dim**-0.5, stats, sizes)
    return (out, row_stats) if stats else out


def check_correctness(lengths: list[int], tile_sizes: list, device: str = "cuda") -> list[dict]:
    """Triton at each tile size against the reference (up to 4096 keys) or the blocked backend
    (beyond), both in fp32, on fp32 and bf16 inputs; errors of the output and relative errors of
    the gradients."""
    import sparsa

    rows = []
    for n in lengths:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = _inputs(1, 2, n, 64, dtype, trained_like=False, seed=n, device=device)
            baseline = "reference" if n <= 4096 else "blocked"
            exact = [x.detach().float().requires_grad_() for x in (q, k, v)]
            ref = sparsa.attention(*exact, is_causal=True, backend=baseline)
            grad = torch.randn_like(ref)
            expected = torch.autograd.grad(ref, exact, grad)
            for sizes in tile_sizes:
                out = _sparsa(q, k, v, sizes)
                got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
                pairs = zip(got, expected, strict=True)
                relative = [float((a.float() - b).abs().max() / b.abs().max()) for a, b in pairs]
                rows.append({"length": n, "dtype": str(dtype), "tiles": str(sizes), "baseline": baseline,
                             "out_error": float((out.float() - ref).abs().max().detach()),
                             "grad_relative_errors": relative})  # fmt: skip
                print(rows[-1], flush=True)
    return rows


def _time_all(contenders: dict, row: dict) -> None:
    for name, fn in contenders.items():
        for backward in (False, True):
            key = f"{name}_{'fwd_bwd' if backward else 'fwd'}_ms"
            try:
                row[key] = _time(fn, backward)
            except Exception as error:  # a contender that fails a shape is reported, not fatal
                row[key] = None
                print(f"{name} failed at {row}: {type(error).__name__}: {error}", flush=True)


def run(
    lengths: list[int],
    batches: list[int],
    dims: list[int],
    heads: int,
    tile_sizes: list,
    device: str = "cuda",
) -> list[dict]:
    """One row per input and tile sizes; SDPA and adasplash are timed once per input."""
    import torch.nn.functional as F

    try:
        from adasplash import adasplash
    except ImportError:
        adasplash = None
    rows = []
    for dim in dims:
        for batch in batches:
            for n in lengths:
                for trained_like in (True, False):
                    q, k, v = _inputs(batch, heads, n, dim, torch.bfloat16, trained_like, device=device)
                    baselines = {
                        "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    }
                    if adasplash is not None:
                        baselines["adasplash"] = lambda q=q, k=k, v=v: adasplash(
                            q, k, v, alpha=1.5, is_causal=True
                        )
                    inputs = {"batch": batch, "heads": heads, "dim": dim, "length": n}
                    _time_all(baselines, inputs)
                    for sizes in tile_sizes:
                        row = {**inputs, "trained_like": trained_like, "tiles": str(sizes)}
                        _time_all({"sparsa": lambda q=q, k=k, v=v, sizes=sizes: _sparsa(q, k, v, sizes)}, row)
                        _, stats = _sparsa(q, k, v, sizes, stats=True)
                        row["mean_support"] = float(stats.support.float().mean())
                        row["skipped_fraction"] = stats.skipped_fraction
                        row["mean_threshold_passes"] = float(stats.threshold_passes.float().mean())
                        rows.append(row)
                        print(row, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    headers = ["B", "D", "N", "scores", "tiles", "fwd ms", "fwd vs SDPA", "fwd vs adasplash", "fwd+bwd ms",
               "fwd+bwd vs SDPA", "fwd+bwd vs adasplash", "support", "skipped", "Newton passes"]  # fmt: skip
    body = []
    for r in rows:

        def over(name, kind, r=r):
            mine, other = r.get(f"sparsa_{kind}_ms"), r.get(f"{name}_{kind}_ms")
            return ratio(mine / other) if mine and other else "n/a"

        scores = "trained-like" if r["trained_like"] else "gaussian"
        body.append([str(r["batch"]), str(r["dim"]), str(r["length"]), scores, r["tiles"],
                     f"{r['sparsa_fwd_ms']:.2f}", over("sdpa", "fwd"), over("adasplash", "fwd"),
                     f"{r['sparsa_fwd_bwd_ms']:.2f}", over("sdpa", "fwd_bwd"), over("adasplash", "fwd_bwd"),
                     f"{r['mean_support']:.1f}", f"{r['skipped_fraction']:.2f}",
                     f"{r['mean_threshold_passes']:.1f}"])  # fmt: skip
    return markdown(headers, set(headers[:3] + headers[5:]), body)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument(
        "--tile-sizes",
        nargs="+",
        default=["32x32x4"],
        help="Triton tile sizes to time, each BLOCK_MxBLOCK_NxWARPS (queries x keys per tile x warps)",
    )
    parser.add_argument(
        "--check-lengths",
        type=int,
        nargs="+",
        default=[1000, 4096, 32768],
        help="lengths of the correctness check (reference up to 4096, blocked beyond)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for gpu.json")


def run_from_args(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("sparsa bench gpu needs a CUDA device")
    from ..attention.triton import TileSizes

    tile_sizes = [TileSizes.parse(text) for text in args.tile_sizes]
    record = {
        "device": torch.cuda.get_device_name(),
        "correctness": check_correctness(args.check_lengths, tile_sizes),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu.json"
    path.write_text(json.dumps(record, indent=2))
    record["timing"] = run(args.lengths, args.batches, args.dims, args.heads, tile_sizes)
    path.write_text(json.dumps(record, indent=2))
    print(table(record["timing"]))
    return 0
