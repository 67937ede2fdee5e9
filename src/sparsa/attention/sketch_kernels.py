"""Exact page maxima of the decoder's sketch products, the implementation picked by measurement.

The sketch bound (``paged._Rows._sketch_bounds``) needs, for every page of
int8 key codes c (in [-127, 127]) and every query code row u (int16, in
[-QUERY_LEVELS, QUERY_LEVELS]), the largest u . c over the page's keys, and
trusts every integer: a product that rounds or saturates would certify a key
zero that is not. Several exact implementations exist and their speed differs
by 10x or more between CPUs:

- ``compiled``: a C++ AVX2 kernel (``csrc/page_max_dots.cpp``, built on first
  use by ``torch.utils.cpp_extension`` and cached per machine) that widens the
  codes to int16, multiplies with ``vpmaddwd`` and keeps the page maxima in
  registers, so the (queries x keys) products never reach memory;
- ``int_mm`` and ``int_mm_query_major``: ``torch._int_mm`` in either operand
  order (fast with AVX-512 VNNI, slow where oneDNN emulates it on AVX2), on
  the query split into two int8 parts, u = 255 hi + lo;
- ``float_mm``: fp32 products of the codes with the same two parts (exact:
  every partial sum is an integer below 2^24), a chunk of keys at a time.

On first use per (device type, D, page size) one calibration, a few
milliseconds, checks each kernel against an int64 product at the extremes
(all-127 keys, sign patterns that cancel, the largest query codes, random
codes, each key alone in a page so that no error hides behind a larger key),
drops any that errs, and times the rest on a sketch-sized problem; the fastest
is used from then on. ``SPARSA_SKETCH_KERNEL=<name>`` forces one (it must still
pass the check). ``make setup`` builds the compiled kernels ahead of time.

The coarse sketch (``page_max_nibble_dots``) is the same operation on 4-bit key
codes in [-7, 7], packed two to a byte, against int8 query codes. It reads half
the bytes, and its compiled kernel multiplies 32 code pairs per instruction
with ``vpmaddubsw`` (2.8x faster than the int8 kernel for 4 queries on an
AVX2 EPYC). Its kernels, calibrated and forced the same way
(``SPARSA_NIBBLE_KERNEL``), are ``compiled`` and ``unpacked`` (the codes unpacked
to int8 a chunk at a time, then the int8 sketch's chosen kernel).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..normalize._native import NativeLibrary

CODE_LIMIT = 127
"""Key codes lie in [-CODE_LIMIT, CODE_LIMIT]."""

NIBBLE_LIMIT = 7
NIBBLE_OFFSET = 8
"""Coarse key codes lie in [-NIBBLE_LIMIT, NIBBLE_LIMIT] and are stored as c + NIBBLE_OFFSET in 4 bits."""

NIBBLE_BLOCK = 64
"""Packed keys are padded to a multiple of this many dimensions: byte b of each 32-byte block j holds
dims 64j + b (low nibble) and 64j + 32 + b (high nibble), the order the compiled kernel unpacks."""

NIBBLE_QUERY_LEVELS = 127
"""Coarse query codes are int8 in [-127, 127]."""

PART_BASE = 255
QUERY_LEVELS = CODE_LIMIT * PART_BASE
"""Query codes lie in [-QUERY_LEVELS, QUERY_LEVELS], so that u = 255 hi + lo with hi and lo int8 codes."""

MAX_HEAD_DIM = 512
"""|u . c| <= 127 * 32385 * D stays below 2^31 (the int32 results) for D <= 512."""

FLOAT_KEYS = 8192
"""Keys converted to fp32 at a time by ``float_mm``: the copy stays in cache and its memory bounded."""

CALIBRATION_KEYS = 32768
CALIBRATION_QUERIES = 4
"""The calibration problem: one KV head's sketch of 32k keys against the 4 query heads of a group."""

CALIBRATION_REPEATS = 3

ENVIRONMENT_VARIABLE = "SPARSA_SKETCH_KERNEL"
NIBBLE_ENVIRONMENT_VARIABLE = "SPARSA_NIBBLE_KERNEL"

COMPILED_SOURCE = Path(__file__).with_name("csrc") / "page_max_dots.cpp"


def page_max_dots(codes: Tensor, query_codes: Tensor, page_size: int) -> Tensor:
    """The largest u . c over each page of ``page_size`` consecutive keys, exact.

    codes (N, D) int8 in [-127, 127], N a multiple of ``page_size``;
    query_codes (Q, D) int16 in [-QUERY_LEVELS, QUERY_LEVELS]. Returns (Q, N / page_size) int32.
    """
    dim = codes.shape[1]
    if dim > MAX_HEAD_DIM:
        raise ValueError(f"the sketch's products are exact only for head_dim <= {MAX_HEAD_DIM}, got {dim}")
    kernel = KERNELS[calibration(codes.device, dim, page_size).kernel]
    return kernel.page_max(codes, query_codes, page_size)


def page_max_nibble_dots(packed: Tensor, query_codes: Tensor, page_size: int) -> Tensor:
    """The largest u . c over each page of 4-bit codes c, exact.

    packed (N, D / 2) uint8 (``pack_nibbles``, D a multiple of NIBBLE_BLOCK); query_codes (Q, D) int8
    in [-127, 127]. Returns (Q, N / page_size) int32.
    """
    dim = 2 * packed.shape[1]
    kernel = NIBBLE_KERNELS[calibration(packed.device, dim, page_size, coarse=True).kernel]
    return kernel.page_max(packed, query_codes, page_size)


def nibble_dim(dim: int) -> int:
    """The packed dimension of D-dimensional keys: D rounded up to a multiple of NIBBLE_BLOCK."""
    return -(-dim // NIBBLE_BLOCK) * NIBBLE_BLOCK


def pack_nibbles(codes: Tensor) -> Tensor:
    """(..., D) codes in [-7, 7] (any dtype holding them) as (..., nibble_dim(D) / 2) uint8."""
    dim = codes.shape[-1]
    stored = torch.nn.functional.pad(codes.to(torch.int16) + NIBBLE_OFFSET, (0, nibble_dim(dim) - dim),
                                     value=NIBBLE_OFFSET)  # fmt: skip
    blocks = stored.view(*codes.shape[:-1], -1, 2, NIBBLE_BLOCK // 2)
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).flatten(-2).to(torch.uint8)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """The int8 codes (..., 2 W) of packed codes (..., W): the inverse of ``pack_nibbles``."""
    halves = packed.view(*packed.shape[:-1], -1, NIBBLE_BLOCK // 2).to(torch.int16)
    codes = torch.stack([halves & 15, halves >> 4], -2).flatten(-3) - NIBBLE_OFFSET
    return codes.to(torch.int8)


def _unpacked(packed: Tensor, query_codes: Tensor, page_size: int) -> Tensor:
    out = torch.empty(
        query_codes.shape[0], packed.shape[0] // page_size, dtype=torch.int32, device=packed.device
    )
    step = max(1, FLOAT_KEYS // page_size) * page_size
    wide_queries = query_codes.to(torch.int16)
    for start in range(0, packed.shape[0], step):
        codes = unpack_nibbles(packed[start : start + step])
        out[:, start // page_size : (start + step) // page_size] = page_max_dots(
            codes, wide_queries, page_size
        )
    return out


def _compiled_nibbles(packed: Tensor, query_codes: Tensor, page_size: int) -> Tensor:
    return torch.ops.sparsa_sketch.page_max_nibble_dots(packed, query_codes, page_size)


def _parts(query_codes: Tensor) -> Tensor:
    """(2Q, D) int8: hi over lo, with u = 255 hi + lo (|lo| <= 127: u / 255 is never a half)."""
    high = torch.round(query_codes.float() / PART_BASE)
    low = query_codes.float() - PART_BASE * high
    return torch.cat([high, low]).to(torch.int8)


def _joined(high: Tensor, low: Tensor) -> Tensor:
    """255 hi . c + lo . c in int32 (exact: the parts' sums are exact integers, their join below 2^31)."""
    return high.to(torch.int32).mul_(PART_BASE).add_(low.to(torch.int32))


def _int_mm(codes: Tensor, query_codes: Tensor, page_size: int) -> Tensor:
    count = query_codes.shape[0]
    dots = torch._int_mm(codes, _parts(query_codes).T.contiguous())
    joined = _joined(dots[:, :count], dots[:, count:])
    return joined.view(-1, page_size, count).amax(1).T


def _int_mm_query_major(codes: Tensor, query_codes: Tensor, page_size: int) -> Tensor:
    # The same product with the operands swapped: oneDNN picks another kernel (3x faster on AVX2 here).
    count = query_codes.shape[0]
    dots = torch._int_mm(_parts(query_codes), codes.T)
    return _joined(dots[:count], dots[count:]).view(count, -1, page_size).amax(-1)


def _float_mm(codes: Tensor, query_codes: Tensor, page_size: int) -> Tensor:
    count = query_codes.shape[0]
    parts = _parts(query_codes).float().T
    out = torch.empty(count, codes.shape[0] // page_size, dtype=torch.int32, device=codes.device)
    step = max(1, FLOAT_KEYS // page_size) * page_size
    for start in range(0, codes.shape[0], step):
        dots = codes[start : start + step].float() @ parts
        joined = _joined(dots[:, :count], dots[:, count:])
        out[:, start // page_size : (start + step) // page_size] = joined.view(-1, page_size, count).amax(1).T
    return out


def _compiled(codes: Tensor, query_codes: Tensor, page_size: int) -> Tensor:
    return torch.ops.sparsa_sketch.page_max_dots(codes, query_codes, page_size)


SKETCH_LIBRARY = NativeLibrary("sparsa_sketch", COMPILED_SOURCE, "the AVX2 sketch kernel")


def _compiled_available(device: torch.device, dim: int, page_size: int) -> bool:
    shape_fits = dim % 16 == 0 and page_size % 8 == 0 and dim <= MAX_HEAD_DIM
    return shape_fits and device.type == "cpu" and SKETCH_LIBRARY.built()


@dataclass(frozen=True)
class Kernel:
    name: str
    page_max: Callable[[Tensor, Tensor, int], Tensor]
    available: Callable[[torch.device, int, int], bool]
    """(device, D, page size) -> whether the kernel can run there."""


def _has_int_mm(device: torch.device, dim: int, page_size: int) -> bool:
    return hasattr(torch, "_int_mm")


KERNELS = {
    kernel.name: kernel
    for kernel in (
        Kernel("compiled", _compiled, _compiled_available),
        Kernel("int_mm", _int_mm, _has_int_mm),
        Kernel("int_mm_query_major", _int_mm_query_major, _has_int_mm),
        Kernel("float_mm", _float_mm, lambda device, dim, page_size: True),
    )
}
"""Every exact implementation of :func:`page_max_dots`. A kernel that raises on a shape
(``torch._int_mm`` on CUDA below 17 query rows) is rejected."""

NIBBLE_KERNELS = {
    kernel.name: kernel
    for kernel in (
        Kernel("compiled", _compiled_nibbles, _compiled_available),
        Kernel("unpacked", _unpacked, lambda device, dim, page_size: dim <= MAX_HEAD_DIM),
    )
}
"""Every exact implementation of :func:`page_max_nibble_dots`."""


@dataclass(frozen=True)
class Product:
    """One of the two exact products: its kernels, the variable that forces one, and its code ranges."""

    kernels: dict[str, Kernel]
    variable: str
    key_limit: int
    query_limit: int
    query_dtype: torch.dtype


PRODUCTS = {
    False: Product(KERNELS, ENVIRONMENT_VARIABLE, CODE_LIMIT, QUERY_LEVELS, torch.int16),
    True: Product(NIBBLE_KERNELS, NIBBLE_ENVIRONMENT_VARIABLE, NIBBLE_LIMIT, NIBBLE_QUERY_LEVELS, torch.int8),
}
"""The int8 sketch's product (False) and the 4-bit one's (True), by ``coarse``."""


@dataclass(frozen=True)
class Calibration:
    """What the calibration found for one (device type, D, page size): the kernel used and each one's time."""

    kernel: str
    milliseconds: dict[str, float]
    """Each exact kernel's time on the calibration problem (inexact or unavailable ones are absent)."""
    rejected: tuple[str, ...]
    """Kernels that returned a wrong integer at the extremes."""


_calibrations: dict[tuple[bool, str, int, int, str | None], Calibration] = {}


def calibration(
    device: torch.device | str, dim: int, page_size: int = 16, *, coarse: bool = False
) -> Calibration:
    """The calibration for ``device``'s type, head dimension ``dim`` and ``page_size``, run on first use;
    of the coarse (4-bit) sketch's kernels if ``coarse`` (``dim``: the packed dimension)."""
    device = torch.device(device)
    forced = _forced_kernel(coarse)
    key = (coarse, device.type, dim, page_size, forced)
    if key not in _calibrations:
        _calibrations[key] = _calibrate(device, dim, page_size, forced, coarse)
    return _calibrations[key]


def _forced_kernel(coarse: bool) -> str | None:
    product = PRODUCTS[coarse]
    name = os.environ.get(product.variable) or None
    if name is not None and name not in product.kernels:
        raise ValueError(f"{product.variable} must be one of {sorted(product.kernels)}, got {name!r}")
    return name


def _calibrate(
    device: torch.device, dim: int, page_size: int, forced: str | None, coarse: bool
) -> Calibration:
    kernels = PRODUCTS[coarse].kernels
    cases = [
        _reference_case(codes, query_codes, page_size, coarse)
        for codes, query_codes in _extreme_cases(dim, coarse)
    ]
    candidates = [forced] if forced else list(kernels)
    exact, rejected = [], []
    for name in candidates:
        kernel = kernels[name]
        if not kernel.available(device, dim, page_size):
            if forced:
                where = f"on {device.type} for D={dim} and pages of {page_size}"
                raise ValueError(f"{PRODUCTS[coarse].variable}={name} is not available {where}")
            continue
        if all(_agrees(kernel, page_size, device, *case) for case in cases):
            exact.append(name)
        else:
            rejected.append(name)
    if not exact:
        erred = ", ".join(rejected)
        raise RuntimeError(f"no exact sketch product on {device.type} for D={dim}: {erred} erred")
    milliseconds = {name: _time(kernels[name].page_max, device, dim, page_size, coarse) for name in exact}
    return Calibration(min(milliseconds, key=milliseconds.get), milliseconds, tuple(rejected))


def _agrees(kernel: Kernel, page_size: int, device: torch.device, codes, query_codes, expected) -> bool:
    try:
        got = kernel.page_max(codes.to(device), query_codes.to(device), page_size)
    except RuntimeError:
        return False
    return torch.equal(got.cpu().long(), expected)


def _reference_case(codes: Tensor, query_codes: Tensor, page_size: int, coarse: bool) -> list[Tensor]:
    """Keys in pages three ways (as given; each alone beside zeros; beside its negation), with the
    int64 page maxima: the last two together show every key's own product, whatever its neighbours.
    Coarse codes are handed to the kernel packed."""
    keys = codes.shape[0]
    padded = torch.zeros(-(-keys // page_size) * page_size, codes.shape[1], dtype=torch.int8)
    padded[:keys] = codes
    alone = torch.zeros(keys, page_size, codes.shape[1], dtype=torch.int8)
    alone[:, 0] = codes
    negated = alone.clone()
    if page_size > 1:
        negated[:, 1] = -codes
    arranged = torch.cat([padded, alone.flatten(0, 1), negated.flatten(0, 1)])
    expected = (query_codes.long() @ arranged.long().T).view(query_codes.shape[0], -1, page_size).amax(-1)
    return [pack_nibbles(arranged) if coarse else arranged, query_codes, expected]


def _extreme_cases(dim: int, coarse: bool) -> list[tuple[Tensor, Tensor]]:
    """Key and query codes whose products reach the largest sums and cancel exactly, beside random ones."""
    generator = torch.Generator().manual_seed(0)
    product = PRODUCTS[coarse]
    key_limit, query_limit = product.key_limit, product.query_limit
    sign = 1 - 2 * (torch.arange(dim) % 2)
    halves = torch.where(torch.arange(dim) < dim // 2, 1, -1)
    patterns = torch.stack([torch.ones(dim, dtype=torch.long), sign, halves])
    patterns = torch.cat([patterns, -patterns])
    random_keys = torch.randint(-key_limit, key_limit + 1, (61, dim), generator=generator)
    codes = torch.cat([key_limit * patterns, random_keys]).to(torch.int8)
    # The largest codes, and for int16 queries the codes where the split into 255 hi + lo turns
    # (127, 128, 32385).
    query_patterns = [query_limit * patterns]
    if not coarse:
        query_patterns += [127 * sign[None], 128 * halves[None]]
    random_queries = torch.randint(-query_limit, query_limit + 1, (3, dim), generator=generator)
    query_codes = torch.cat([*query_patterns, random_queries]).to(product.query_dtype)
    return [(codes, query_codes), (codes, query_codes[:1])]


def _time(page_max: Callable, device: torch.device, dim: int, page_size: int, coarse: bool) -> float:
    generator = torch.Generator().manual_seed(1)
    keys = -(-CALIBRATION_KEYS // page_size) * page_size
    product = PRODUCTS[coarse]
    key_limit, query_limit = product.key_limit, product.query_limit
    codes = torch.randint(-key_limit, key_limit + 1, (keys, dim), generator=generator).to(torch.int8)
    query_codes = torch.randint(
        -query_limit, query_limit + 1, (CALIBRATION_QUERIES, dim), generator=generator
    )
    codes = pack_nibbles(codes) if coarse else codes
    codes, query_codes = codes.to(device), query_codes.to(product.query_dtype).to(device)
    best = float("inf")
    for _ in range(CALIBRATION_REPEATS + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        page_max(codes, query_codes, page_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 1000 * best
