"""Normalizer benchmark: sparsa's maps against torch.softmax and the entmax package.

For each case (rows x length, scores ~ N(0, std^2), fp32 on CPU) and each
method it measures the forward and the forward+backward time and the maximum
absolute error against an fp64 reference, and reports the times as ratios to
``torch.softmax`` and to the entmax package's counterpart measured in the same
run. Prints a table and writes ``normalizers.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import sparsa

from .timing import machine, markdown, measure, ratio

FULL_CASES = ((8192, 1024), (64, 65536))
QUICK_CASES = ((256, 256), (4, 4096))
SCORE_STD = 2.0


@dataclass
class Method:
    name: str
    alpha: float
    fn: Callable[[torch.Tensor], torch.Tensor]
    counterpart: str | None = None
    eager: bool = False  # run without compiled kernels, as where no compiler works


@dataclass
class Row:
    case: str
    method: str
    forward_ms: float
    forward_backward_ms: float
    first_call_s: float
    max_abs_error: float
    forward_vs_softmax: float
    forward_backward_vs_softmax: float
    forward_vs_counterpart: float | None
    forward_backward_vs_counterpart: float | None


def _methods() -> list[Method]:
    methods = [
        Method("torch.softmax", 1.0, lambda x: torch.softmax(x, -1)),
        Method("sparsa.softmax", 1.0, sparsa.softmax),
        Method("sparsa.entmax(alpha=1.5)", 1.5, lambda x: sparsa.entmax(x, 1.5), "entmax.entmax_bisect(1.5)"),
        Method("sparsa.entmax15", 1.5, sparsa.entmax15, "entmax.entmax15"),
        Method("sparsa.entmax15(k=64)", 1.5, lambda x: sparsa.entmax15(x, k=64), "entmax.entmax15"),
        Method("sparsa.sparsemax", 2.0, sparsa.sparsemax, "entmax.sparsemax"),
        Method(
            "sparsa.entmax(alpha=1.25)", 1.25, lambda x: sparsa.entmax(x, 1.25), "entmax.entmax_bisect(1.25)"
        ),
        Method(
            "sparsa.entmax(alpha=1.75)", 1.75, lambda x: sparsa.entmax(x, 1.75), "entmax.entmax_bisect(1.75)"
        ),
        Method("sparsa.entmax(alpha=1.5) eager", 1.5, lambda x: sparsa.entmax(x, 1.5), eager=True),
        Method("sparsa.sparsemax eager", 2.0, sparsa.sparsemax, eager=True),
    ]
    try:
        import entmax
    except ImportError:
        return methods
    methods += [
        Method("entmax.entmax15", 1.5, lambda x: entmax.entmax15(x, -1)),
        Method("entmax.sparsemax", 2.0, lambda x: entmax.sparsemax(x, -1)),
    ]
    for alpha in (1.25, 1.5, 1.75):
        methods.append(
            Method(f"entmax.entmax_bisect({alpha})", alpha, lambda x, a=alpha: entmax.entmax_bisect(x, a, -1))
        )
    return methods


def _reference(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return sparsa.entmax(x.double(), alpha) if alpha != 1.0 else torch.softmax(x.double(), -1)


def _time(
    method: Method, x: torch.Tensor, upstream: torch.Tensor, reference: torch.Tensor, repeats: int
) -> tuple[float, float, float, float]:
    """(forward s, forward+backward s, slowest first call s, max abs error) of one method."""
    mode = "never" if method.eager else sparsa.normalize.get_compile_mode()
    with sparsa.normalize.compile_mode(mode):
        first, forward = measure(lambda: method.fn(x), repeats)
        x_grad = x.clone().requires_grad_()
        first_backward, both = measure(lambda: method.fn(x_grad).backward(upstream), repeats)
        error = (method.fn(x).double() - reference).abs().max().item()
    return forward, both, max(first, first_backward), error


def run(quick: bool = False, repeats: int = 5, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    methods = _methods()
    rows: list[Row] = []
    for n_rows, length in QUICK_CASES if quick else FULL_CASES:
        case = f"{n_rows}x{length}"
        x = torch.randn(n_rows, length) * SCORE_STD
        upstream = torch.randn(n_rows, length)
        references = {alpha: _reference(x, alpha) for alpha in {m.alpha for m in methods}}
        timed = {
            method.name: _time(method, x, upstream, references[method.alpha], repeats) for method in methods
        }
        soft_forward, soft_both = timed["torch.softmax"][:2]
        for method in methods:
            forward, both, first, error = timed[method.name]
            counterpart = timed.get(method.counterpart) if method.counterpart else None
            rows.append(
                Row(
                    case=case,
                    method=method.name,
                    forward_ms=forward * 1e3,
                    forward_backward_ms=both * 1e3,
                    first_call_s=first,
                    max_abs_error=error,
                    forward_vs_softmax=forward / soft_forward,
                    forward_backward_vs_softmax=both / soft_both,
                    forward_vs_counterpart=forward / counterpart[0] if counterpart else None,
                    forward_backward_vs_counterpart=both / counterpart[1] if counterpart else None,
                )
            )
    return {
        "benchmark": "normalizers",
        **machine(),
        "compile_mode": sparsa.normalize.get_compile_mode(),
        "score_std": SCORE_STD,
        "repeats": repeats,
        "rows": [asdict(row) for row in rows],
    }


def markdown_table(result: dict) -> str:
    headers = [
        "case",
        "method",
        "fwd ms",
        "fwd / softmax",
        "fwd / entmax pkg",
        "fwd+bwd ms",
        "fwd+bwd / softmax",
        "fwd+bwd / entmax pkg",
        "max abs err",
    ]
    rows = [
        [
            row["case"],
            row["method"],
            f"{row['forward_ms']:.2f}",
            ratio(row["forward_vs_softmax"]),
            ratio(row["forward_vs_counterpart"]),
            f"{row['forward_backward_ms']:.2f}",
            ratio(row["forward_backward_vs_softmax"]),
            ratio(row["forward_backward_vs_counterpart"]),
            f"{row['max_abs_error']:.1e}",
        ]
        for row in result["rows"]
    ]
    return markdown(headers, set(headers[2:]), rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsa bench normalizers", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method after the first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random scores")
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for normalizers.json")


def run_from_args(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    result = run(quick=args.quick, repeats=args.repeats, seed=args.seed)
    print(markdown_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "normalizers.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return 0
