"""Conjugate gradients for Hermitian positive (semi-)definite systems, batched per item.

The bottom layer: operators (exact data consistency) and solvers both use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["conjugate_gradient"]


def _dot(a: Tensor, b: Tensor, joint: bool = False) -> Tensor:
    """Real inner product Re⟨a, b⟩ per item (over all but the batch axis) or, ``joint``, over the
    whole tensor; shaped for broadcasting."""
    d = (a.conj() * b).real if a.is_complex() else a * b
    if joint:
        return d.sum().reshape([1] * a.ndim)
    return d.reshape(d.shape[0], -1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


def conjugate_gradient(
    normal: Callable[[Tensor], Tensor],
    rhs: Tensor,
    x0: Tensor | None = None,
    iters: int = 20,
    tol: float = 1e-6,
    precond: Callable[[Tensor], Tensor] | None = None,
    joint: bool = False,
) -> Tensor:
    """Solve ``normal(x) = rhs`` for every batch item.

    Parameters
    ----------
    normal : callable
        A Hermitian positive semi-definite linear map on tensors shaped like ``rhs``.
    rhs : Tensor, shape (B, ...)
    x0 : Tensor, optional
        Warm start (default zeros).
    iters : int
        Maximum iterations.
    tol : float
        Stop when every item's residual norm falls below ``tol`` times its right-hand side's.
        The tolerance is floored at ``10·eps`` of the dtype: below that the residual is rounding
        noise, partly outside the range of a singular ``normal`` (e.g. a masked-Fourier
        projection), and further steps would divide by a curvature of zero.
    precond : callable, optional
        An approximate inverse of ``normal`` (Hermitian positive definite), e.g. a Jacobi
        diagonal: preconditioned CG.
    joint : bool
        One system over the whole batch (inner products and step sizes over every item): for a
        ``normal`` that couples the items, e.g. TV along the slices of a volume stored on the
        batch axis.  False (default): an independent system per item.

    Returns
    -------
    Tensor, shape like ``rhs``
    """
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - normal(x) if x0 is not None else rhs.clone()
    z = precond(r) if precond is not None else r
    p = z.clone()
    rz = _dot(r, z, joint)
    eps = torch.finfo(rz.dtype).eps
    stop = (max(tol, 10 * eps) ** 2) * _dot(rhs, rhs, joint)
    tiny = torch.finfo(rz.dtype).tiny
    done = torch.zeros_like(rz, dtype=torch.bool)
    curvature = torch.zeros_like(rz)  # largest Rayleigh quotient pᴴNp/pᴴp seen, per item
    for _ in range(iters):
        done = done | (_dot(r, r, joint) <= stop)
        if bool(done.all()):
            break
        ap = normal(p)
        pap, pp = _dot(p, ap, joint), _dot(p, p, joint)
        curvature = torch.maximum(curvature, pap / pp.clamp_min(tiny))
        # breakdown: p lies (to rounding) in the null space of a singular normal operator
        done = done | (pap <= 10 * eps * curvature * pp)
        alpha = torch.where(done, torch.zeros_like(rz), rz / pap.clamp_min(tiny))
        x = x + alpha * p
        r = r - alpha * ap
        z = precond(r) if precond is not None else r
        rz_new = _dot(r, z, joint)
        p = torch.where(done, p, z + (rz_new / rz.clamp_min(tiny)) * p)
        rz = torch.where(done, rz, rz_new)
    return x
