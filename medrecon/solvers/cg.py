"""Conjugate gradients for Hermitian positive (semi-)definite systems, batched per item."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["conjugate_gradient"]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-item real inner product Re⟨a, b⟩ over all but the batch axis, shaped for broadcasting."""
    d = (a.conj() * b).real if a.is_complex() else a * b
    return d.reshape(d.shape[0], -1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


def conjugate_gradient(
    normal: Callable[[Tensor], Tensor],
    rhs: Tensor,
    x0: Tensor | None = None,
    iters: int = 20,
    tol: float = 1e-6,
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

    Returns
    -------
    Tensor, shape like ``rhs``
    """
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - normal(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rr = _dot(r, r)
    stop = (tol**2) * _dot(rhs, rhs)
    tiny = torch.finfo(rr.dtype).tiny
    for _ in range(iters):
        if bool((rr <= stop).all()):
            break
        ap = normal(p)
        alpha = rr / _dot(p, ap).clamp_min(tiny)
        alpha = torch.where(rr <= stop, torch.zeros_like(alpha), alpha)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = _dot(r, r)
        p = r + (rr_new / rr.clamp_min(tiny)) * p
        rr = rr_new
    return x
