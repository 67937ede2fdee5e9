"""Exact int8 products for the decoder's key sketch, the implementation picked by measurement.

The sketch bound (``paged._Rows._sketch_bounds``) multiplies int8 key codes
(N, D) by int8 query codes (R, D), both in [-127, 127], and trusts every
integer: a product that rounds or saturates would certify a key zero that is
not. Several exact implementations exist and their speed differs by 4x or
more between CPUs (``torch._int_mm`` is fast with AVX-512 VNNI and slow where
oneDNN emulates it on AVX2; an fp32 product of the codes, exact since every
partial sum is an integer below 2^24, runs at the float units' speed).

On first use per (device type, D) one calibration, a few milliseconds,
checks each kernel against an int64 product at the int8 extremes (all-127
rows, sign patterns that cancel, random codes), drops any that errs, and
times the rest on a sketch-sized problem; the fastest is used from then on.
``SPARSA_SKETCH_KERNEL=<name>`` forces one (it must still pass the check).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

CODE_LIMIT = 127
"""Codes lie in [-CODE_LIMIT, CODE_LIMIT]."""

FLOAT_CHUNK = 8192
"""Rows of codes converted to fp32 at a time: the copy stays in cache and its memory bounded."""

CALIBRATION_KEYS = 32768
CALIBRATION_QUERIES = 8
"""The calibration problem: one KV head's sketch of 32k keys against the 8 query codes of a group."""

CALIBRATION_REPEATS = 3

ENVIRONMENT_VARIABLE = "SPARSA_SKETCH_KERNEL"


def _int_mm(codes: Tensor, query_codes: Tensor) -> Tensor:
    return torch._int_mm(codes, query_codes.T.contiguous()).T


def _int_mm_query_major(codes: Tensor, query_codes: Tensor) -> Tensor:
    # The same product with the operands swapped: oneDNN picks another kernel (3x faster on AVX2 here).
    return torch._int_mm(query_codes, codes.T)


def _float_mm(codes: Tensor, query_codes: Tensor) -> Tensor:
    queries = query_codes.float().T
    out = torch.empty(codes.shape[0], query_codes.shape[0], device=codes.device)
    for start in range(0, codes.shape[0], FLOAT_CHUNK):
        torch.mm(codes[start : start + FLOAT_CHUNK].float(), queries, out=out[start : start + FLOAT_CHUNK])
    return out.T


@dataclass(frozen=True)
class Kernel:
    name: str
    product: Callable[[Tensor, Tensor], Tensor]
    available: Callable[[torch.device, int], bool]


KERNELS = {
    kernel.name: kernel
    for kernel in (
        Kernel("int_mm", _int_mm, lambda device, dim: hasattr(torch, "_int_mm")),
        Kernel("int_mm_query_major", _int_mm_query_major, lambda device, dim: hasattr(torch, "_int_mm")),
        Kernel("float_mm", _float_mm, lambda device, dim: True),
    )
}
"""Every exact implementation of query codes (R, D) x codes (N, D)^T -> (R, N) integers (int32 or fp32).
A kernel that raises on a shape (``torch._int_mm`` on CUDA below 17 query rows) is rejected."""


@dataclass(frozen=True)
class Calibration:
    """What the calibration found for one (device type, D): the kernel used and each kernel's time."""

    kernel: str
    milliseconds: dict[str, float]
    """Each exact kernel's time on the calibration problem (inexact or unavailable ones are absent)."""
    rejected: tuple[str, ...]
    """Kernels that returned a wrong integer at the int8 extremes."""


_calibrations: dict[tuple[str, int, str | None], Calibration] = {}


def integer_dots(codes: Tensor, query_codes: Tensor) -> Tensor:
    """query_codes (R, D) int8 times codes (N, D) int8, transposed -> (R, N), every entry the exact
    integer (int32 or fp32, by kernel)."""
    dim = codes.shape[1]
    if dim * CODE_LIMIT * CODE_LIMIT >= 2**24:
        raise ValueError(f"the sketch's int8 products are exact only for head_dim <= 1040, got {dim}")
    return KERNELS[calibration(codes.device, dim).kernel].product(codes, query_codes)


def calibration(device: torch.device | str, dim: int) -> Calibration:
    """The calibration for ``device``'s type and head dimension ``dim``, run on first use."""
    device = torch.device(device)
    forced = _forced_kernel()
    key = (device.type, dim, forced)
    if key not in _calibrations:
        _calibrations[key] = _calibrate(device, dim, forced)
    return _calibrations[key]


def _forced_kernel() -> str | None:
    name = os.environ.get(ENVIRONMENT_VARIABLE) or None
    if name is not None and name not in KERNELS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE} must be one of {sorted(KERNELS)}, got {name!r}")
    return name


def _calibrate(device: torch.device, dim: int, forced: str | None) -> Calibration:
    codes, query_codes = _extreme_codes(device, dim)
    expected = query_codes.long() @ codes.long().T
    candidates = [forced] if forced else list(KERNELS)
    exact, rejected = [], []
    for name in candidates:
        kernel = KERNELS[name]
        if not kernel.available(device, dim):
            if forced:
                raise ValueError(
                    f"{ENVIRONMENT_VARIABLE}={name} is not available on {device.type} for D={dim}"
                )
            continue
        try:
            got = kernel.product(codes, query_codes)
        except RuntimeError:
            got = None
        if got is not None and torch.equal(got.long(), expected):
            exact.append(name)
        else:
            rejected.append(name)
    if not exact:
        raise RuntimeError(f"no exact int8 product on {device.type} for D={dim}: {', '.join(rejected)} erred")
    milliseconds = {name: _time(KERNELS[name].product, device, dim) for name in exact}
    return Calibration(min(milliseconds, key=milliseconds.get), milliseconds, tuple(rejected))


def _extreme_codes(device: torch.device, dim: int) -> tuple[Tensor, Tensor]:
    """Codes and query codes whose products reach +-127^2 D and cancel exactly, beside random ones."""
    generator = torch.Generator().manual_seed(0)
    alternating = CODE_LIMIT * (1 - 2 * (torch.arange(dim) % 2))
    patterns = torch.stack(
        [
            torch.full((dim,), CODE_LIMIT),
            torch.full((dim,), -CODE_LIMIT),
            alternating,
            -alternating,
            torch.where(torch.arange(dim) < dim // 2, CODE_LIMIT, -CODE_LIMIT),
        ]
    )
    random_codes = torch.randint(-CODE_LIMIT, CODE_LIMIT + 1, (64, dim), generator=generator)
    codes = torch.cat([patterns, random_codes, patterns]).to(torch.int8)
    query_codes = torch.cat([patterns, random_codes[:3]]).to(torch.int8)
    return codes.to(device), query_codes.to(device)


def _time(product: Callable[[Tensor, Tensor], Tensor], device: torch.device, dim: int) -> float:
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(-CODE_LIMIT, CODE_LIMIT + 1, (CALIBRATION_KEYS, dim), generator=generator)
    query_codes = torch.randint(-CODE_LIMIT, CODE_LIMIT + 1, (CALIBRATION_QUERIES, dim), generator=generator)
    codes, query_codes = codes.to(torch.int8).to(device), query_codes.to(torch.int8).to(device)
    best = float("inf")
    for _ in range(CALIBRATION_REPEATS + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        product(codes, query_codes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 1000 * best
