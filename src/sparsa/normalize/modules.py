"""nn.Module wrappers of the normalizers and their losses."""

from __future__ import annotations

from torch import Tensor, nn

from .losses import entmax_loss
from .maps import entmax, softmax


class Softmax(nn.Module):
    """:func:`sparsa.softmax` along ``dim`` (zeros for fully masked rows)."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Entmax(nn.Module):
    """:func:`sparsa.entmax` along ``dim`` with a fixed alpha (a float or a buffer-like tensor)."""

    def __init__(self, alpha: float | Tensor = 1.5, dim: int = -1, k: int | None = None) -> None:
        super().__init__()
        self.alpha = alpha
        self.dim = dim
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return entmax(x, self.alpha, self.dim, k=self.k)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, dim={self.dim}"


class Entmax15(Entmax):
    """:func:`sparsa.entmax15` along ``dim``."""

    def __init__(self, dim: int = -1, k: int | None = None) -> None:
        super().__init__(1.5, dim, k)


class Sparsemax(Entmax):
    """:func:`sparsa.sparsemax` along ``dim``."""

    def __init__(self, dim: int = -1, k: int | None = None) -> None:
        super().__init__(2.0, dim, k)


class EntmaxLoss(nn.Module):
    """:func:`sparsa.entmax_loss` as a module, like ``nn.CrossEntropyLoss``."""

    def __init__(self, alpha: float = 1.5, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return entmax_loss(
            input, target, self.alpha, ignore_index=self.ignore_index, reduction=self.reduction
        )


class SparsemaxLoss(EntmaxLoss):
    def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__(2.0, ignore_index, reduction)


class Entmax15Loss(EntmaxLoss):
    def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__(1.5, ignore_index, reduction)
