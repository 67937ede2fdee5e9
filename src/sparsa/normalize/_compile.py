"""Run row-wise tensor kernels compiled where that pays and eagerly elsewhere.

A kernel is a plain tensor function over a block of rows. Eagerly every
intermediate is a new tensor, so large inputs are processed in blocks of rows
of about a million entries, small enough for the allocator to reuse memory
instead of mapping fresh pages for every intermediate; under ``torch.compile`` (inductor) each kernel
becomes one or two fused passes and runs on big blocks. Kernels are compiled
with dynamic shapes, once per kernel, dtype and layout, so changing lengths do
not recompile. Compilation costs about a second per kernel on first use (then
the inductor cache on disk answers), so ``"auto"`` compiles only for inputs
large enough for the saving to matter.

The mode comes from the environment variable ``SPARSA_COMPILE`` (``auto``,
``always`` or ``never``) and can be changed with :func:`set_compile_mode`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

COMPILE_MODES = ("auto", "always", "never")
AUTO_COMPILE_MIN_NUMEL = 1 << 18
EAGER_BLOCK_NUMEL = 1 << 20
COMPILED_BLOCK_NUMEL = 1 << 22

_mode = os.environ.get("SPARSA_COMPILE", "auto")


def _check_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    return mode


def get_compile_mode() -> str:
    return _check_mode(_mode)


def set_compile_mode(mode: str) -> None:
    """Choose when normalizer kernels are compiled: "auto", "always" or "never"."""
    global _mode
    _mode = _check_mode(mode)


@contextlib.contextmanager
def compile_mode(mode: str) -> Iterator[None]:
    """Temporarily set the compile mode (see :func:`set_compile_mode`)."""
    previous = get_compile_mode()
    set_compile_mode(mode)
    try:
        yield
    finally:
        set_compile_mode(previous)


def wants_compiled(numel: int, device: torch.device) -> bool:
    """Whether kernels for an input of ``numel`` elements should run compiled."""
    mode = get_compile_mode()
    if mode == "never" or torch.compiler.is_compiling():
        return False
    if mode == "always":
        return True
    return numel >= AUTO_COMPILE_MIN_NUMEL and device.type in ("cpu", "cuda")


def row_blocks(rows: int, length: int, compiled: bool) -> Iterator[slice]:
    """Slices of whole rows sized for the chosen execution mode (none for empty input)."""
    if length == 0:
        return
    budget = COMPILED_BLOCK_NUMEL if compiled else EAGER_BLOCK_NUMEL
    step = max(1, budget // max(length, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def map_row_blocks(
    fn: Callable[[slice], Tensor], like: Tensor, compiled: bool, length: int | None = None
) -> Tensor:
    """Apply fn to the row blocks of a problem with rows of ``length`` (default: like's width).

    The result has like's shape and dtype; a single block (the usual compiled
    case) is returned as it comes, without a copy.
    """
    width = like.shape[1] if length is None else length
    blocks = list(row_blocks(like.shape[0], width, compiled))
    if len(blocks) == 1:
        return fn(blocks[0]).to(like.dtype)
    out = torch.empty_like(like)
    for rows in blocks:
        out[rows] = fn(rows)
    return out


class RowKernel:
    """A tensor function that can run eagerly or compiled with dynamic shapes.

    If compilation fails (no working C++ compiler, an unsupported platform),
    a warning is issued once and the kernel runs eagerly from then on.
    """

    def __init__(self, fn: Callable[..., object]) -> None:
        self.fn = fn
        self._compiled: Callable[..., object] | None = None
        self._verified = False
        self._broken = False

    def __call__(self, *args: object, compiled: bool) -> object:
        if not compiled or self._broken:
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        if self._verified:
            return self._compiled(*args)
        try:
            result = self._compiled(*args)
        except Exception as error:  # compilation can fail for many platform reasons
            self._broken = True
            warnings.warn(
                f"sparsa: torch.compile failed for {self.fn.__name__} ({type(error).__name__}: "
                f"{error}); running it eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.fn(*args)
        self._verified = True
        return result


def positive_pow(base: Tensor, exponent: Tensor) -> Tensor:
    """base ** exponent for base > 0, as exp(exponent * log(base)).

    Compiled on CPU this is over twice as fast as ``pow``, which also handles
    negative bases and special cases that never occur here. Callers mask out
    entries with base <= 0.
    """
    return torch.exp(exponent * torch.log(base))


def row_kernel(fn: Callable[..., object]) -> RowKernel:
    return RowKernel(fn)
