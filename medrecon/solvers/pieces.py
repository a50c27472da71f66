"""Predictors, correctors and conditioning steps for :func:`medrecon.solvers.sampler.sample`.

Every piece is a small callable ``(x, t, rng) -> x`` built by a factory that closes over what
it needs (the score, the SDE, the operator and the measurement).  All work in the prior's
normalised space.  Equations: ALGORITHMS.md §2–§6.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from medrecon.linalg import conjugate_gradient
from medrecon.operators.base import LinearOperator, SamplingOperator
from medrecon.solvers.classical import ADMMTV
from medrecon.solvers.sampler import ScoreCounter, Step, randn_like

__all__ = [
    "identity_step",
    "reverse_diffusion",
    "euler_maruyama",
    "ddim",
    "langevin",
    "noised_measurement",
    "song_consistency",
    "dps_guidance",
    "sense_gradient",
    "admm_tv",
    "cg_consistency",
    "admm_tv_consistency",
    "chain",
]


def _b(v: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-item ``(B,)`` tensor over ``x`` (real dtype of ``x``)."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(device=x.device, dtype=x.real.dtype)


def identity_step(x: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
    """A piece that does nothing (no corrector, no conditioning)."""
    return x


def chain(*steps: Step) -> Step:
    """Apply several pieces in order as one piece."""

    def step(x: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
        for s in steps:
            x = s(x, t, rng)
        return x

    return step


# ------------------------------------------------------------------------------- predictors
def reverse_diffusion(score: ScoreCounter) -> Step:
    """Reverse-diffusion predictor on the SDE's discretisation (VE: SMLD, VP: DDPM).

    ``x ← x − f + G² s(x, t) + G z`` with ``(f, G)`` from ``sde.discretize``.
    """
    sde = score.sde

    def step(x: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
        f, g = sde.discretize(x.real if x.is_complex() else x, t)
        if x.is_complex():
            f = f + 1j * sde.discretize(x.imag, t)[0]
        g = _b(g, x)
        return x - f + g**2 * score(x, t) + g * randn_like(x, rng)

    return step


def euler_maruyama(score: ScoreCounter) -> Step:
    """Euler–Maruyama step of the reverse SDE with ``dt = −1/N``."""
    sde = score.sde

    def step(x: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
        dt = -1.0 / sde.n_steps
        xr = x.real if x.is_complex() else x
        drift, g = sde.sde(xr, t)
        if x.is_complex():
            drift = drift + 1j * sde.sde(x.imag, t)[0]
        g = _b(g, x)
        mean = x + (drift - g**2 * score(x, t)) * dt
        return mean + g * math.sqrt(-dt) * randn_like(x, rng)

    return step


def ddim(score: ScoreCounter, eta: float = 0.0, x0_step: Step | None = None) -> Step:
    """DDIM step from t to t − 1/N through the Tweedie estimate x̂₀ (``eta`` = 0: deterministic).

    ``x' = a' x̂₀ + sqrt(s'² − σ²) ε̂ + σ z`` with ``ε̂ = (x − a x̂₀)/s``; for VP
    ``σ = η (s'/s) sqrt(1 − a²/a'²)``, for VE (a = 1) the ancestral ``σ = η s' sqrt(1 − s'²/s²)``.

    ``x0_step`` (a piece applied to x̂₀ before re-noising) makes this the decomposed diffusion
    sampler (DDS, Chung, Lee & Ye, ICLR 2024): the data consistency acts on the clean estimate
    (:func:`cg_consistency`, :func:`admm_tv_consistency`) while ε̂ keeps the network's noise
    direction, so the re-noised state stays on the noisy manifold of time t − 1/N.  At the last
    step (s' = 0) the result is the corrected x̂₀ itself.
    """
    sde = score.sde

    def step(x: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
        tt = t.double()
        tp = (tt - 1.0 / sde.n_steps).clamp_min(0.0)
        a, s = _b(sde.mean_coeff(tt), x), _b(sde.std(tt), x)
        ap, sp = _b(sde.mean_coeff(tp), x), _b(sde.std(tp), x)
        sp = torch.where(_b(tp, x) > 0, sp, torch.zeros_like(sp))
        x0 = (x + s**2 * score(x, t)) / a
        eps = (x - a * x0) / s
        if x0_step is not None:
            x0 = x0_step(x0, t, rng)
        if getattr(sde, "kind", "") == "vp":
            sig = eta * (sp / s) * torch.sqrt((1 - a**2 / ap**2).clamp_min(0))
        else:
            sig = eta * sp * torch.sqrt((1 - sp**2 / s**2).clamp_min(0))
        return ap * x0 + torch.sqrt((sp**2 - sig**2).clamp_min(0)) * eps + sig * randn_like(x, rng)

    return step


# ------------------------------------------------------------------------------- correctors
def langevin(score: ScoreCounter, snr: float, n_steps: int = 1) -> Step:
    """Langevin corrector with a per-image step ``ε = 2α (snr ‖z‖ / ‖s‖)²`` (α = 1 for VE,
    ``1 − β_i`` for VP); ``x ← x + ε s + sqrt(2ε) z``."""
    sde = score.sde

    def norms(v: Tensor) -> Tensor:
        return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)

    def step(x: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
        if snr <= 0:
            return x
        alpha = 1.0 - sde.beta(t.double()) / sde.n_steps if getattr(sde, "kind", "") == "vp" else torch.ones_like(t)
        for _ in range(n_steps):
            g = score(x, t)
            z = randn_like(x, rng)
            eps = 2 * alpha.to(norms(z).dtype) * (snr * norms(z) / norms(g).clamp_min(1e-12)) ** 2
            eps = _b(eps, x)
            x = x + eps * g + torch.sqrt(2 * eps) * z
        return x

    return step


# ---------------------------------------------------------------------------- conditioning
def noised_measurement(A: LinearOperator, y: Tensor, sde, t: Tensor, rng: torch.Generator, like: Tensor) -> Tensor:  # noqa: N803
    """ŷ_t = a(t)·y + s(t)·A z with z drawn in image space (Song et al. 2022: the measurement
    pushed through the forward SDE in transform space)."""
    a, s = sde.mean_coeff(t.double()), sde.std(t.double())
    return _b(a, y) * y + _b(s, y) * A(randn_like(like, rng))


def song_consistency(
    A: SamplingOperator, y: Tensor, sde, lam: float | Callable[[Tensor], float] = 1.0, *,  # noqa: N803
    exact: bool = False, noise_measurement: bool = True,
) -> Step:
    """Song et al. (2022) data consistency with the noised measurement ŷ_t and weight λ.

    Parameters
    ----------
    A : SamplingOperator
    y : Tensor
        Measurement in normalised units.
    lam : float or callable t -> float
        λ ∈ [0, 1]; 1 is hard data consistency.
    exact : bool
        Use the CG projection instead of T⁻¹ (CT, multi-coil MRI).
    noise_measurement : bool
        Draw ŷ_t (True) or use y itself (CCDF's measurement replacement at low noise).
    """

    def step(x: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
        y_t = noised_measurement(A, y, sde, t, rng, x) if noise_measurement else y
        weight = lam(t) if callable(lam) else lam
        return A.data_consistency(x, y_t, weight, exact=exact, cg_iters=5) if exact else A.data_consistency(x, y_t, weight)

    return step


def dps_guidance(A: LinearOperator, y: Tensor, score: ScoreCounter, zeta: float, a_norm: float) -> Step:  # noqa: N803
    """DPS (Chung et al. 2023): ``x ← x − (ζ/‖A‖) ∇_{x_t} ‖y − A x̂₀(x_t)‖₂``.

    x̂₀ is the Tweedie estimate from the predictor's own score evaluation at ``x_t`` (cached by
    :class:`ScoreCounter`, so the network runs once per step); the gradient flows back through
    the network.  This is the official code's convention (gradient of the *unsquared* norm),
    equal to the paper's ``ζ_i ∇‖·‖²`` with ``ζ_i = ζ'/‖y − A x̂₀‖`` for ``ζ = 2ζ'``.  Dividing
    by ``‖A‖`` makes ζ independent of the operator's scale (a 23-view and a 180-view projector,
    or k-space with 1 and 8 coils, take the same ζ).
    """
    sde = score.sde

    def step(x: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
        if score.last is None:
            raise RuntimeError("dps_guidance needs a ScoreCounter with track_grad=True before it")
        xt, tt, s = score.last
        with torch.enable_grad():
            a = _b(sde.mean_coeff(tt.double()), xt)
            sd = _b(sde.std(tt.double()), xt)
            x0 = (xt + sd**2 * s) / a
            r = A(x0) - y
            loss = torch.linalg.vector_norm(r.reshape(r.shape[0], -1), dim=1).sum()
            (grad,) = torch.autograd.grad(loss, xt)
        score.last = None
        return x - (zeta / a_norm) * grad.detach()

    return step


def sense_gradient(
    A: LinearOperator, y: Tensor, every: int, schedule_len: int, lam_start: float = 1.0, lam_end: float = 0.2,  # noqa: N803
) -> Step:
    """score-MRI's SENSE consistency: every ``every`` steps, ``x ← x + λ_k Aᴴ(y − A x)`` with λ
    decaying linearly from ``lam_start`` to ``lam_end`` over the run."""
    count = {"k": 0}

    def step(x: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
        k = count["k"]
        count["k"] += 1
        if k % every:
            return x
        frac = k / max(1, schedule_len - 1)
        lam = lam_start + (lam_end - lam_start) * frac
        return x + lam * A.adjoint(y - A(x))

    return step


def admm_tv(
    A: LinearOperator, y: Tensor, lam: float, rho: float, axes: tuple[str, ...] = ("z",),  # noqa: N803
    cg_iters: int = 1, weights: Callable[[Tensor], tuple[float, ...]] | None = None,
) -> Step:
    """DiffusionMBIR's conditioning: one ADMM iteration of ``½‖Ax − y‖²/‖A‖² + lam‖W D x‖₁`` on the
    whole volume (slices on the batch axis; D along ``axes``), warm-started at the diffused x,
    with the splitting variables and duals kept across diffusion steps.  ``weights(t)`` gives
    the axis weights W at time t (default all 1; e.g. in-plane weights that fall with t)."""
    solver = ADMMTV(A, y, lam, rho, axes=axes, cg_iters=cg_iters)

    def step(x: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
        if weights is not None:
            solver.set_weights(weights(t))
        return solver.step(x)

    step.solver = solver  # type: ignore[attr-defined]
    return step


def cg_consistency(A: LinearOperator, y: Tensor, iters: int, gamma: float = 0.0, scale2: float = 1.0) -> Step:  # noqa: N803
    """DDS data consistency on a clean estimate x̂₀: ``iters`` conjugate-gradient steps on
    ``(AᴴA + γ‖A‖² I) x = Aᴴy + γ‖A‖² x̂₀``, started at x̂₀.

    With γ = 0 the iterates stay in the Krylov space ``x̂₀ + K_M(AᴴA, Aᴴ(y − A x̂₀))``: few steps
    fit the data without leaving the neighbourhood of x̂₀ that the prior put it in (DDS §3.2).
    γ > 0 is the proximal form for noisy data (a Tikhonov pull towards x̂₀); it is relative to
    ``scale2 = ‖A‖²`` so the same value suits operators of any scale.  For MRI with one coil
    AᴴA is a projection and one step is the exact projection; for multi-coil SENSE the steps are
    CG-SENSE.  Images that are real (CT) stay real.
    """
    aty = A.adjoint(y)
    g = float(gamma) * float(scale2)

    def normal(v: Tensor) -> Tensor:
        out = A.normal(v)
        if not v.is_complex() and out.is_complex():
            out = out.real
        return out + g * v if g else out

    def step(x0: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
        if iters <= 0:
            return x0
        rhs = aty.real if not x0.is_complex() and aty.is_complex() else aty
        if g:
            rhs = rhs + g * x0
        return conjugate_gradient(normal, rhs, x0=x0, iters=iters, tol=1e-10)

    return step


def admm_tv_consistency(
    A: LinearOperator, y: Tensor, lam: float, rho: float, iters: int,  # noqa: N803
    axes: tuple[str, ...] = ("z",), cg_iters: int = 5,
    weights: Callable[[Tensor], tuple[float, ...]] | None = None, keep_state: bool = False,
) -> Step:
    """DDS-3D data consistency on a clean volume estimate x̂₀ (slices on the batch axis):
    ``iters`` ADMM iterations of ``½‖Ax − y‖²/‖A‖² + lam‖W D x‖₁`` (D along ``axes``) started at
    x̂₀, each with ``cg_iters`` warm-started CG steps (:class:`medrecon.solvers.classical.ADMMTV`).
    ``weights(t)`` gives the axis weights W at time t (default all 1).

    ``keep_state`` False: the splitting variables restart from x̂₀ at every diffusion step, so
    each step solves its own problem around the new estimate, as in the DDS paper's 3-D CT
    experiments; with one or two iterations the TV then acts only as a pull of the gradients
    towards those of x̂₀.  True: they persist across diffusion steps (as mbir3d's do), so the
    shrinkage of the TV accumulates over the run while every step starts its CG at x̂₀.
    """
    solver = ADMMTV(A, y, lam, rho, axes=axes, cg_iters=cg_iters)

    def step(x0: Tensor, t: Tensor, rng: torch.Generator) -> Tensor:
        if not keep_state:
            solver.reset()
        if weights is not None:
            solver.set_weights(weights(t))
        x = x0
        for _ in range(max(1, iters)):
            x = solver.step(x)
        return x

    step.solver = solver  # type: ignore[attr-defined]
    return step
