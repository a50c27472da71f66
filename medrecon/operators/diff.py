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
    """Forward differences along ``axes`` (any of ``"z"``, ``"y"``, ``"x"``), each times its weight.

    Parameters
    ----------
    shape : (H, W)
        Image size.
    axes : sequence of str
        ``("y", "x")`` for 2-D TV, ``("z", "y", "x")`` for 3-D, ``("z",)`` along slices only.
    weights : sequence of float, optional
        One weight ≥ 0 per axis (default all 1): the operator is ``W D`` with ``W`` diagonal.

    Notes
    -----
    ``normal`` (``DᴴW²D``, what TV solvers apply most) runs one difference per axis into one
    output instead of stacking the differences and taking them apart again.
    """

    def __init__(self, shape: tuple[int, int], axes: Sequence[str] = ("y", "x"),
                 weights: Sequence[float] | None = None):
        bad = [a for a in axes if a not in AXES]
        if bad or not axes:
            raise SettingsError(f"FiniteDifference: axes must be drawn from z, y, x; got {tuple(axes)}")
        self.dims = [AXES[a] for a in axes]
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if len(weights) != len(self.dims) or any(not w >= 0 for w in weights):
                raise SettingsError(
                    f"FiniteDifference: one weight ≥ 0 per axis ({len(self.dims)}); got {weights}"
                )
            if all(w == 1.0 for w in weights):
                weights = None
        self.weights: tuple[float, ...] | None = weights
        super().__init__((None, *shape), (None, *shape, len(self.dims)), in_complex=False, out_complex=False)
        self.complex_ok = True

    def _w(self, like: Tensor) -> Tensor:
        return torch.tensor(self.weights, dtype=like.real.dtype, device=like.device)

    def _forward(self, x: Tensor) -> Tensor:
        d = torch.stack([diff_forward(x, d) for d in self.dims], dim=-1)
        return d if self.weights is None else d * self._w(x)

    def _adjoint(self, y: Tensor) -> Tensor:
        if self.weights is not None:
            y = y * self._w(y)
        return sum(diff_adjoint(y[..., i], d) for i, d in enumerate(self.dims))

    def _normal(self, x: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for i, dim in enumerate(self.dims):
            w2 = 1.0 if self.weights is None else self.weights[i] ** 2
            n = x.shape[dim]
            if w2 == 0 or n < 2:
                continue
            d = torch.diff(x, dim=dim)
            if w2 != 1.0:
                d.mul_(w2)
            out.narrow(dim, 0, n - 1).sub_(d)
            out.narrow(dim, 1, n - 1).add_(d)
        return out
