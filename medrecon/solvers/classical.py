"""Classical reconstructions: FBP, zero-filled, CG(-SENSE), TV and L1-wavelet.

They are the baselines of the benchmarks and the initial estimates of CCDF.  Every function
takes the measurement ``y`` and the operator ``A`` and returns an image ``(B, C, H, W)`` in the
units ``A`` maps from.

Regularisation weights are relative to the operator's scale: the data term is
``½‖Ax − y‖² / ‖A‖²`` (``‖A‖`` estimated by power iteration and cached on the operator), so a
weight that works for one view count or coil count carries over to another.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medrecon.errors import SettingsError, ShapeError
from medrecon.linalg import conjugate_gradient
from medrecon.operators.base import LinearOperator
from medrecon.operators.diff import FiniteDifference
from medrecon.solvers.wavelet import Wavelet2D

__all__ = [
    "fbp", "zero_filled", "cg", "tv", "l1_wavelet", "operator_norm", "shrink", "ADMMTV", "CLASSICAL_METHODS",
]


def _image_like(A: LinearOperator, y: Tensor) -> Tensor:  # noqa: N803
    return A.adjoint(y)


def operator_norm(A: LinearOperator, like: Tensor, iters: int = 30, seed: int = 0) -> float:  # noqa: N803
    """Largest singular value of ``A`` by power iteration on ``AᴴA`` (cached on the operator).

    Parameters
    ----------
    like : Tensor, shape (B, *in_shape)
        Fixes dtype, device and the size of carried axes; only its first item is used.
    """
    key = ("_opnorm", like.device.type, str(like.dtype))
    cache = A.__dict__.setdefault("_norm_cache", {})
    if key in cache:
        return cache[key]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(like[:1].shape, generator=g, dtype=like.real.dtype if like.is_complex() else like.dtype)
    x = x.to(like.device).to(like.dtype)
    try:
        A.normal(x)
    except ShapeError:  # per-slice masks or maps: iterate on the whole batch
        x = torch.randn(like.shape, generator=g, dtype=x.real.dtype).to(like.device).to(like.dtype)
    s = 0.0
    for _ in range(iters):
        x = x / torch.linalg.norm(x)
        x = A.normal(x)
        s = math.sqrt(float(torch.linalg.norm(x)))
    cache[key] = s * 1.01  # a margin for the unconverged tail
    return cache[key]


def fbp(y: Tensor, A: LinearOperator, filter_name: str = "ramp") -> Tensor:  # noqa: N803
    """Filtered back-projection for a CT operator (parallel or fan beam)."""
    if not hasattr(A, "fbp"):
        raise SettingsError(f"fbp: operator {A.name} is not a CT projector")
    return A.fbp(y, filter_name)


def zero_filled(y: Tensor, A: LinearOperator) -> Tensor:  # noqa: N803
    """``Aᴴ y``: the zero-filled (coil-combined, for SENSE) reconstruction of MRI data."""
    return A.adjoint(y)


def cg(
    y: Tensor, A: LinearOperator, iters: int = 30, l2: float = 0.0, x0: Tensor | None = None,  # noqa: N803
    tol: float = 1e-6,
) -> Tensor:
    """Least squares ``min ‖Ax − y‖² + l2·‖A‖²·‖x‖²`` by conjugate gradients on the normal equations.

    With a :class:`~medrecon.operators.MultiCoilMRI` operator this is CG-SENSE.
    """
    aty = A.adjoint(y)
    reg = l2 * operator_norm(A, aty) ** 2 if l2 else 0.0

    def normal(v: Tensor) -> Tensor:
        return A.normal(v) + reg * v if reg else A.normal(v)

    return conjugate_gradient(normal, aty, x0=x0, iters=iters, tol=tol)


def shrink(v: Tensor, t: float | Tensor, isotropic: bool = True) -> Tensor:
    """Soft-threshold ``v`` by ``t``: per pixel across the last axis (isotropic) or per entry.

    The proximal map of ``t·‖v‖_{2,1}`` (isotropic) or ``t·‖v‖₁``; complex entries shrink in
    magnitude.
    """
    mag = torch.sqrt((v.abs() ** 2).sum(-1, keepdim=True)) if isotropic else v.abs()
    return v * torch.clamp(1 - t / torch.clamp(mag, min=1e-30), min=0)


class ADMMTV:
    """ADMM for ``½‖Ax − y‖²/‖A‖² + lam·‖W D x‖₁`` (+ x ≥ 0), one iteration per :meth:`step`.

    ``W`` weighs the difference axes (all 1 by default; :meth:`set_weights`).  Splits
    ``w = W D x`` (and ``v = x`` for non-negativity); the x-update solves
    ``(AᴴA/‖A‖² + ρ DᴴW²D [+ ρ I]) x = Aᴴy/‖A‖² + ρ DᴴW(w − u) [+ ρ (v − u₂)]`` with a few
    warm-started CG steps; ``w`` is a soft threshold; the scaled duals ``u`` persist between
    steps, which is what DiffusionMBIR needs (one ADMM iteration per diffusion step, duals kept).
    With ``"z"`` among the axes the slices of the batch are one volume, and CG solves one system
    over all of them.

    Parameters
    ----------
    A : LinearOperator
    y : Tensor
        Measurement.
    lam : float
        TV weight relative to the normalised data term.
    rho : float
        ADMM penalty.
    axes : tuple of str
        Difference axes (``("z",)`` for TV along slices of a volume on the batch axis).
    isotropic : bool
    nonneg : bool
    cg_iters : int
        CG steps per x-update.
    weights : sequence of float, optional
        Weight of each axis of ``axes`` (default all 1): ``(1, 0.5, 0.5)`` with axes
        ``("z", "y", "x")`` regularises in-plane half as much as along z.
    """

    def __init__(
        self, A: LinearOperator, y: Tensor, lam: float, rho: float, *,  # noqa: N803
        axes: tuple[str, ...] = ("y", "x"), isotropic: bool = True, nonneg: bool = False,
        cg_iters: int = 5, weights: tuple[float, ...] | None = None,
    ):
        self.A, self.lam, self.rho, self.cg_iters = A, lam, rho, cg_iters
        self.isotropic, self.nonneg = isotropic, nonneg
        aty = A.adjoint(y)
        if nonneg and aty.is_complex():
            raise SettingsError("tv: nonneg applies to real images only")
        self.scale2 = operator_norm(A, aty) ** 2
        self.rhs0 = aty / self.scale2
        self.y = y
        self.axes = tuple(axes)
        self.D = FiniteDifference(tuple(aty.shape[-2:]), axes, weights)  # W D
        self.joint = "z" in axes
        self.w: Tensor | None = None
        self.u: Tensor | None = None
        self.v: Tensor | None = None
        self.u2: Tensor | None = None

    def set_weights(self, weights: tuple[float, ...]) -> None:
        """New axis weights; the splitting variable and dual of each axis are rescaled with its
        weight, so that ADMM goes on from where it was (an axis whose weight was 0 restarts)."""
        old = self.D.weights or (1.0,) * len(self.axes)
        self.D = FiniteDifference(self.D.in_shape[1:], self.axes, weights)
        if self.w is not None:
            new = self.D.weights or (1.0,) * len(self.axes)
            ratio = torch.tensor([n / o if o > 0 else 0.0 for n, o in zip(new, old, strict=True)],
                                 dtype=self.w.real.dtype, device=self.w.device)
            self.w, self.u = self.w * ratio, self.u * ratio

    def reset(self) -> None:
        """Forget the splitting variables and duals: the next :meth:`step` starts afresh."""
        self.w = self.u = self.v = self.u2 = None

    def _normal(self, x: Tensor) -> Tensor:
        out = self.A.normal(x) / self.scale2 + self.rho * self.D.normal(x)
        return out + self.rho * x if self.nonneg else out

    def step(self, x: Tensor) -> Tensor:
        """One ADMM iteration from the image ``x`` (the CG warm start); returns the new image."""
        if self.w is None:
            self.w = self.D(x)
            self.u = torch.zeros_like(self.w)
            if self.nonneg:
                self.v, self.u2 = x.clamp_min(0), torch.zeros_like(x)
        rhs = self.rhs0 + self.rho * self.D.adjoint(self.w - self.u)
        if self.nonneg:
            rhs = rhs + self.rho * (self.v - self.u2)
        x = conjugate_gradient(self._normal, rhs, x0=x, iters=self.cg_iters, tol=1e-8, joint=self.joint)
        dx = self.D(x)
        self.w = shrink(dx + self.u, self.lam / self.rho, self.isotropic)
        self.u = self.u + dx - self.w
        if self.nonneg:
            self.v = (x + self.u2).clamp_min(0)
            self.u2 = self.u2 + x - self.v
            return self.v
        return x

    def objective(self, x: Tensor) -> float:
        """The objective ½‖Ax − y‖²/‖A‖² + lam·‖W D x‖₁ summed over the batch."""
        r = self.A(x) - self.y
        dx = self.D(x)
        tvx = torch.sqrt((dx.abs() ** 2).sum(-1)).sum() if self.isotropic else dx.abs().sum()
        return float(0.5 * (r.abs() ** 2).sum() / self.scale2 + self.lam * tvx)


def tv(
    y: Tensor,
    A: LinearOperator,  # noqa: N803
    lam: float = 1e-4,
    iters: int = 100,
    *,
    rho: float | None = None,
    nonneg: bool = False,
    axes: tuple[str, ...] = ("y", "x"),
    isotropic: bool = True,
    x0: Tensor | None = None,
    cg_iters: int = 5,
) -> Tensor:
    """Total-variation regularised least squares by ADMM (:class:`ADMMTV`).

    Minimises ``½‖Ax − y‖² / ‖A‖² + lam·‖D x‖₁ (+ indicator of x ≥ 0)`` with D the forward
    differences along ``axes`` (isotropic: the per-pixel L2 norm across directions).  Works for
    real (CT) and complex (MRI) images.

    Parameters
    ----------
    lam : float
        TV weight in units of the normalised data term.
    iters : int
        ADMM iterations (each with ``cg_iters`` CG steps).
    rho : float, optional
        ADMM penalty; default ``10·lam`` clipped to [1e-4, 1].
    nonneg : bool
        Constrain the image to be non-negative (real images only).
    axes : tuple of str
        ``("y", "x")`` in-plane TV; ``("z", "y", "x")`` for a volume on the batch axis.
    x0 : Tensor, optional
        Starting image: FBP for CT is a good one; default ``Aᴴy / ‖A‖²``, or FBP when A has one.
    """
    solver = ADMMTV(A, y, lam, rho if rho is not None else min(1.0, max(1e-4, 10 * lam)),
                    axes=axes, isotropic=isotropic, nonneg=nonneg, cg_iters=cg_iters)
    if x0 is None:
        x0 = A.fbp(y) if hasattr(A, "fbp") else solver.rhs0
    x = x0
    for _ in range(iters):
        x = solver.step(x)
    return x


def l1_wavelet(
    y: Tensor,
    A: LinearOperator,  # noqa: N803
    lam: float = 3e-3,
    iters: int = 100,
    *,
    wavelet: str = "db4",
    levels: int = 3,
    x0: Tensor | None = None,
) -> Tensor:
    """L1-wavelet compressed sensing by FISTA: ``½‖Ax − y‖²/‖A‖² + lam·‖Ψx‖₁``.

    Ψ is an orthonormal DWT (periodic); images whose sides are not divisible by
    ``2**levels`` are zero-padded for the transform (Ψ is then an isometry, and the
    proximal step an approximation at the padded border).
    """
    aty = A.adjoint(y)
    s = operator_norm(A, aty)
    h, w = aty.shape[-2:]
    m = 2**levels
    ph, pw = (-h) % m, (-w) % m
    W = Wavelet2D((h + ph, w + pw), wavelet, levels)  # noqa: N806

    def prox(v: Tensor, t: float) -> Tensor:
        c = W(torch.nn.functional.pad(v, (0, pw, 0, ph)) if (ph or pw) else v)
        out = W.adjoint(shrink(c, t, isotropic=False))
        return out[..., :h, :w]

    x = aty / s**2 if x0 is None else x0.clone()
    z, t_k = x.clone(), 1.0
    step = 1.0  # Lipschitz constant of the normalised data term is 1
    for _ in range(iters):
        grad = A.adjoint(A(z) - y) / s**2
        x_new = prox(z - step * grad, step * lam)
        t_new = 0.5 * (1 + math.sqrt(1 + 4 * t_k * t_k))
        z = x_new + ((t_k - 1) / t_new) * (x_new - x)
        x, t_k = x_new, t_new
    return x


CLASSICAL_METHODS = {
    "fbp": fbp,
    "zero-filled": zero_filled,
    "cg": cg,
    "tv": tv,
    "l1-wavelet": l1_wavelet,
}
