"""Registers and spilled bytes of the Triton kernels per head dim and tile sizes, without a GPU.

`sparsa bench kernels` compiles the kernels for a CUDA architecture (Hopper by default) on this
machine, through Triton's compiler and ptxas, and prints what they allocate: tile sizes whose
kernels spill registers to local memory need not be timed on a GPU. No timing is involved.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .timing import markdown


def run(arch: int, dtype: str, dims: list[int], tile_sizes: list[str], is_causal: bool, padding: str | None):
    from ..attention.triton import TileSizes
    from ..attention.triton.resources import kernel_resources

    sizes = [TileSizes.parse(text) for text in tile_sizes]
    rows = []
    for dim in dims:
        for size in sizes:
            found = kernel_resources(arch, dtype, dim, size, is_causal=is_causal, padding=padding)
            print(found, flush=True)
            rows += found
    return rows


def table(rows: list[dict]) -> str:
    headers = ["D", "tiles", "kernel", "registers", "spilled bytes"]
    body = [
        [str(r["head_dim"]), r["tiles"], r["kernel"], str(r["registers"]), str(r["spilled_bytes"])]
        for r in rows
    ]
    return markdown(headers, {"D", "registers", "spilled bytes"}, body)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch", type=int, default=90, help="CUDA compute capability as a number (90: H100, H200)"
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims")
    parser.add_argument(
        "--tile-sizes",
        nargs="+",
        default=["32x32x4", "32x32x8", "64x64x4", "64x64x8"],
        help="each BLOCK_MxBLOCK_NxWARPS (queries x keys per tile x warps)",
    )
    parser.add_argument("--full", action="store_true", help="bidirectional instead of causal")
    parser.add_argument("--padding", choices=["left", "right", "none"], default="left", help="key padding")
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for kernels.json")


def run_from_args(args: argparse.Namespace) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("sparsa bench kernels compiles the kernels: unset TRITON_INTERPRET")
    padding = None if args.padding == "none" else args.padding
    rows = run(args.arch, args.dtype, args.dims, args.tile_sizes, not args.full, padding)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(
        json.dumps({"arch": args.arch, "dtype": args.dtype, "rows": rows}, indent=2)
    )
    print(table(rows))
    return 0
