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


def _inputs(batch, heads, n, dim, dtype, trained_like, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, device="cuda", generator=generator)
    k = torch.randn(batch, heads, n, dim, device="cuda", generator=generator)
    if trained_like:
        # Each query is a noisy copy of one earlier key: a few keys dominate its row.
        source = torch.randint(0, n, (n,), device="cuda", generator=generator)
        source = torch.minimum(source, torch.arange(n, device="cuda"))
        q = 3.0 * k[:, :, source] + 0.5 * q
    v = torch.randn(batch, heads, n, dim, device="cuda", generator=generator)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def _time(fn, backward: bool) -> float:
    import triton.testing

    if not backward:
        return triton.testing.do_bench(fn, warmup=5, rep=40)

    def step():
        out = fn()
        out.backward(torch.ones_like(out))

    return triton.testing.do_bench(step, warmup=3, rep=40)


def check_correctness(lengths: list[int]) -> list[dict]:
    """Triton against the blocked backend (fp32) and the reference (bf16, short) at each length."""
    import sparsa

    rows = []
    for n in lengths:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = _inputs(1, 2, n, 64, dtype, trained_like=False, seed=n)
            out = sparsa.attention(q, k, v, is_causal=True, backend="triton")
            baseline = "reference" if n <= 4096 else "blocked"
            ref = sparsa.attention(q.float(), k.float(), v.float(), is_causal=True, backend=baseline)
            grad = torch.randn_like(ref)
            got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
            expected = torch.autograd.grad(ref, (q, k, v), grad)
            errors = [float((out.float() - ref).abs().max().detach())]
            errors += [
                float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip(got, expected, strict=True)
            ]
            rows.append({"length": n, "dtype": str(dtype), "baseline": baseline, "out_error": errors[0],
                         "grad_relative_errors": errors[1:]})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def run(lengths: list[int], batches: list[int], dims: list[int], heads: int) -> list[dict]:
    import torch.nn.functional as F

    import sparsa

    try:
        from adasplash import adasplash
    except ImportError:
        adasplash = None
    rows = []
    for dim in dims:
        for batch in batches:
            for n in lengths:
                for trained_like in (True, False):
                    q, k, v = _inputs(batch, heads, n, dim, torch.bfloat16, trained_like)
                    contenders = {
                        "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                        "sparsa": lambda q=q, k=k, v=v: sparsa.attention(
                            q, k, v, is_causal=True, backend="triton"
                        ),
                    }
                    if adasplash is not None:
                        contenders["adasplash"] = lambda q=q, k=k, v=v: adasplash(
                            q, k, v, alpha=1.5, is_causal=True
                        )
                    row = {
                        "batch": batch,
                        "heads": heads,
                        "dim": dim,
                        "length": n,
                        "trained_like": trained_like,
                    }
                    for name, fn in contenders.items():
                        for backward in (False, True):
                            key = f"{name}_{'fwd_bwd' if backward else 'fwd'}_ms"
                            try:
                                row[key] = _time(fn, backward)
                            except (
                                Exception
                            ) as error:  # a contender that fails a shape is reported, not fatal
                                row[key] = None
                                print(f"{name} failed at {row}: {type(error).__name__}: {error}", flush=True)
                    _, stats = sparsa.attention(q, k, v, is_causal=True, backend="triton", return_stats=True)
                    row["mean_support"] = float(stats.support.float().mean())
                    row["skipped_fraction"] = stats.skipped_fraction
                    row["mean_threshold_passes"] = float(stats.threshold_passes.float().mean())
                    rows.append(row)
                    print(row, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    headers = ["B", "D", "N", "scores", "fwd ms", "fwd vs SDPA", "fwd vs adasplash", "fwd+bwd ms",
               "fwd+bwd vs SDPA", "fwd+bwd vs adasplash", "support", "skipped", "Newton passes"]  # fmt: skip
    body = []
    for r in rows:

        def over(name, kind, r=r):
            mine, other = r.get(f"sparsa_{kind}_ms"), r.get(f"{name}_{kind}_ms")
            return ratio(mine / other) if mine and other else "n/a"

        scores = "trained-like" if r["trained_like"] else "gaussian"
        body.append([str(r["batch"]), str(r["dim"]), str(r["length"]), scores,
                     f"{r['sparsa_fwd_ms']:.2f}", over("sdpa", "fwd"), over("adasplash", "fwd"),
                     f"{r['sparsa_fwd_bwd_ms']:.2f}", over("sdpa", "fwd_bwd"), over("adasplash", "fwd_bwd"),
                     f"{r['mean_support']:.1f}", f"{r['skipped_fraction']:.2f}",
                     f"{r['mean_threshold_passes']:.1f}"])  # fmt: skip
    return markdown(headers, set(headers[:3] + headers[4:]), body)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--heads", type=int, default=16)
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
    record = {"device": torch.cuda.get_device_name(), "correctness": check_correctness(args.check_lengths)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu.json"
    path.write_text(json.dumps(record, indent=2))
    record["timing"] = run(args.lengths, args.batches, args.dims, args.heads)
    path.write_text(json.dumps(record, indent=2))
    print(table(record["timing"]))
    return 0
