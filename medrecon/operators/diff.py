"""Finite differences (forward, Neumann boundary) and their adjoints.

Images are ``(B, C, H, W)``; for a volume stored as slices on the batch axis, ``"z"``
differentiates along the batch axis.  :class:`FiniteDifference` stacks the requested
differences on a new last axis: ``(B, C, H, W) -> (B, C, H, W, n_axes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from medrecon.errors import SettingsError
from medrecon.operators.base import LinearOperator

__all__ = ["diff_forward", "diff_adjoint", "FiniteDifference", "AXES"]

AXES = {"z": 0, "y": 2, "x": 3}


def diff_forward(x: Tensor, dim: int) -> Tensor:
    """``(Dx)[i] = x[i+1] − x[i]``, and 0 at the last index."""
    d = torch.zeros_like(x)
    n = x.shape[dim]
    if n > 1:
        d.narrow(dim, 0, n - 1).copy_(x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1))
    return d


def diff_adjoint(p: Tensor, dim: int) -> Tensor:
    """Adjoint of :func:`diff_forward` (minus the backward-difference divergence)."""
    n = p.shape[dim]
    out = torch.zeros_like(p)
    if n == 1:
        return out
    inner = p.narrow(dim, 0, n - 1)
    out.narrow(dim, 0, n - 1).sub_(inner)
    out.narrow(dim, 1, n - 1).add_(inner)
    return out


class FiniteDifference(LinearOperator):
    """Forward differences along ``axes`` (any of ``"z"``, ``"y"``, ``"x"``).

    Parameters
    ----------
    shape : (H, W)
        Image size.
    axes : sequence of str
        ``("y", "x")`` for 2-D TV, ``("z", "y", "x")`` for 3-D, ``("z",)`` along slices only.
    """

    def __init__(self, shape: tuple[int, int], axes: Sequence[str] = ("y", "x")):
        bad = [a for a in axes if a not in AXES]
        if bad or not axes:
            raise SettingsError(f"FiniteDifference: axes must be drawn from z, y, x; got {tuple(axes)}")
        self.dims = [AXES[a] for a in axes]
        super().__init__((None, *shape), (None, *shape, len(self.dims)), in_complex=False, out_complex=False)
        self.complex_ok = True

    def _forward(self, x: Tensor) -> Tensor:
        return torch.stack([diff_forward(x, d) for d in self.dims], dim=-1)

    def _adjoint(self, y: Tensor) -> Tensor:
        return sum(diff_adjoint(y[..., i], d) for i, d in enumerate(self.dims))
