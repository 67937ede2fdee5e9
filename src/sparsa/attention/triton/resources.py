"""The kernels compiled for a GPU architecture on any machine, and what they allocate there.

Triton's compiler and ptxas need no GPU. Registers per thread and bytes spilled to local memory
show which tile sizes are worth timing on a GPU, and compiling at all catches what Triton's
interpreter accepts but its compiler rejects. Call this in a process without TRITON_INTERPRET,
which turns the kernels into interpreter functions.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..masks import KeyPadding, ScoreBias
from . import kernels
from .function import TileSizes, _Launch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Pointers that hold the inputs' dtype; the others hold what the launcher allocates.
INPUT_POINTERS = {"Q", "K", "V", "Out", "U", "DO", "DQ", "DK", "DV"}
OTHER_POINTERS = {"Lengths": "*i32", "Passes": "*i32", "Live": "*i8"}
FLOAT_SCALARS = {"scale", "tolerance"}
KERNELS = ("_forward_kernel", "_delta_kernel", "_backward_query_kernel", "_backward_key_kernel")


def _constants(dtype: str, head_dim: int, sizes: TileSizes, is_causal: bool, padding: str | None) -> dict:
    """The constexpr arguments the launcher would pass for such inputs (ALiBi on)."""
    n = 2 * max(sizes.block_m, sizes.block_n)
    q = torch.empty(1, 2, n, head_dim, dtype=DTYPES[dtype])
    mask = None if padding is None else KeyPadding(torch.tensor([n]), side=padding)
    bias = ScoreBias(
        1, 2, n, n, is_causal=is_causal, attn_mask=mask, alibi_slopes=torch.ones(2), device="cpu"
    )
    return _Launch(q, q, q, torch.full((2,), 1.5), bias, head_dim**-0.5, sizes).constants


def _signature(kernel, constants: dict, dtype: str) -> dict:
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in INPUT_POINTERS:
            signature[name] = "*" + dtype
        elif name[0].isupper():
            signature[name] = OTHER_POINTERS.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return signature


def _allocation(cubin: bytes) -> dict:
    """Registers per thread and spilled bytes, read by the cuobjdump that Triton ships (None without it)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {"registers": None, "spilled_bytes": None}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run(
            [str(tool), "--dump-resource-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    registers, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return {
        "registers": int(registers[1]) if registers else None,
        "spilled_bytes": int(stack[1]) if stack else None,
    }


def kernel_resources(
    arch: int,
    dtype: str,
    head_dim: int,
    sizes: TileSizes,
    is_causal: bool = True,
    padding: str | None = "left",
) -> list[dict]:
    """Compile the forward and backward kernels for CUDA compute capability arch (90: Hopper) with a
    learnt alpha, ALiBi and the given masking; one row per kernel."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    launch_constants = _constants(dtype, head_dim, sizes, is_causal, padding)
    num_warps = launch_constants.pop("num_warps")
    extra = {"ALPHA_GRAD": True, "LEVELS": kernels.LEVELS, "BOUND_ITERATIONS": kernels.BOUND_ITERATIONS}
    rows = []
    for name in KERNELS:
        kernel = getattr(kernels, name)
        constants = {
            key: value for key, value in {**launch_constants, **extra}.items() if key in kernel.arg_names
        }
        source = ASTSource(fn=kernel, signature=_signature(kernel, constants, dtype), constexprs=constants)
        compiled = triton.compile(
            source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
        )
        rows.append({"kernel": name.strip("_"), "head_dim": head_dim, "tiles": str(sizes),
                     **_allocation(compiled.asm["cubin"])})  # fmt: skip
    return rows
