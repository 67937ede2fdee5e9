"""The ``sparsa`` command."""

from __future__ import annotations

import argparse
import sys

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsa", description="Sparse, length-robust attention for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"sparsa {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser("bench", help="run a benchmark (prints a table, writes JSON)")
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    normalizers = benchmarks.add_parser(
        "normalizers", help="softmax, sparsemax and entmax against torch.softmax and the entmax package"
    )
    from .benchmarks import attention as attention_bench
    from .benchmarks import normalizers as normalizer_bench

    normalizer_bench.add_arguments(normalizers)
    normalizers.set_defaults(run=normalizer_bench.run_from_args)
    attention = benchmarks.add_parser(
        "attention", help="blocked 1.5-entmax attention against torch SDPA and a dense entmax pipeline"
    )
    attention_bench.add_arguments(attention)
    attention.set_defaults(run=attention_bench.run_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
