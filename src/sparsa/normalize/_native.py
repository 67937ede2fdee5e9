"""C++ kernels for the CPU (the ``csrc/`` folders), built on first use and cached per machine.

``torch.utils.cpp_extension`` compiles a source file into a library that
registers its operators with PyTorch (``torch.ops.<name>``); the build takes
10 to 20 s once per machine, after which loading is instant. The kernels use
AVX2 and run only where PyTorch reports AVX2 or AVX-512. Where a kernel cannot
be built (no compiler, no ninja) one line says so and the PyTorch code runs
instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from .threshold import MAX_EXACT_STEPS

NATIVE_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]


def cpu_runs_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


class NativeLibrary:
    """One C++ source file built into the operators ``torch.ops.<name>``; ``what`` names it in messages."""

    def __init__(self, name: str, source: Path, what: str) -> None:
        self.name = name
        self.source = source
        self.what = what
        self._built: bool | None = None

    def built(self) -> bool:
        """Whether the library runs here: an AVX2 CPU, and the build (or torch's per-machine cache of it),
        tried once, succeeded."""
        if not cpu_runs_avx2():
            return False
        if self._built is None:
            self._built = self._build()
        return self._built

    def _build(self) -> bool:
        from torch.utils import cpp_extension

        library = Path(cpp_extension._get_build_directory(self.name, verbose=False)) / f"{self.name}.so"
        if not library.exists():
            print(f"sparsa: building {self.what} (once per machine, about 15 s)", file=sys.stderr)
        try:
            cpp_extension.load(
                name=self.name,
                sources=[str(self.source)],
                extra_cflags=NATIVE_FLAGS,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
        # A missing compiler or ninja, or a failed build, raises one of several types; the PyTorch
        # code remains either way.
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"sparsa: {self.what} did not build ({reason}); PyTorch's kernels remain", file=sys.stderr)
            return False
        return True


ENTMAX_ROWS = NativeLibrary(
    "sparsa_entmax", Path(__file__).with_name("csrc") / "entmax_rows.cpp", "the compiled entmax row solver"
)


def native_entmax_rows(
    x: Tensor, alpha: float, newton_steps: int = MAX_EXACT_STEPS
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(weights, m, s) of rows x (rows, n) for alpha 1.5 or 2 from the C++ solver, or None where it
    does not apply (another device or dtype, or the library did not build). Rows that ``newton_steps``
    Newton steps do not certify are sorted."""
    fits = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 2
    if not (fits and x.shape[1] > 0 and ENTMAX_ROWS.built()):
        return None
    return torch.ops.sparsa_entmax.entmax_rows(x.contiguous(), alpha, newton_steps)
