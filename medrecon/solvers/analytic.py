"""An analytic Gaussian prior and the exact posterior of a linear problem, to verify the solvers.

With ``x ~ N(μ, Σ)`` the diffused marginal is Gaussian too (``p_t = N(a μ, a²Σ + s²I)``), so
its score is known in closed form; and for ``y = A x`` the posterior is Gaussian with

    μ_post = μ + ΣAᴴ(AΣAᴴ)⁺(y − Aμ),   Σ_post = Σ − ΣAᴴ(AΣAᴴ)⁺AΣ.

Complex images are treated as the samplers treat them: real and imaginary parts are two real
images, the real part with mean μ and the imaginary part with mean 0, both with covariance Σ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medrecon.operators.base import LinearOperator

__all__ = ["GaussianPrior", "periodic_rbf_covariance", "gaussian_posterior"]


def periodic_rbf_covariance(n: int, length: float = 1.5, variance: float = 0.04, nugget: float = 1e-3) -> Tensor:
    """Stationary covariance on an n×n periodic grid (circulant, so diagonal in Fourier space).

    ``Σ_ij = variance · exp(−d_ij² / (2 length²)) + nugget · δ_ij`` with the wrap-around distance.
    """
    idx = torch.arange(n, dtype=torch.float64)
    d = (idx[:, None] - idx[None, :]).abs()
    d = torch.minimum(d, n - d)
    yy = d[:, None, :, None] ** 2 + d[None, :, None, :] ** 2  # (y_i, y_j) x (x_i, x_j)
    k = variance * torch.exp(-yy.permute(0, 2, 1, 3).reshape(n * n, n * n) / (2 * length**2))
    return k + nugget * torch.eye(n * n, dtype=torch.float64)


class GaussianPrior:
    """``x ~ N(mean, cov)`` on ``(1, H, W)`` images with an exact score for any SDE.

    Parameters
    ----------
    mean : Tensor, shape (H, W)
    cov : Tensor, shape (H·W, H·W), symmetric positive definite
    sde : SDE
        Forward SDE (``mean_coeff``, ``std``).
    """

    def __init__(self, mean: Tensor, cov: Tensor, sde):
        self.shape = tuple(mean.shape)
        self.mean = mean.reshape(-1).double()
        self.cov = cov.double()
        self.evals, self.evecs = torch.linalg.eigh(self.cov)
        self.sde = sde

    def _score_real(self, x: Tensor, t: Tensor, mean: Tensor) -> Tensor:
        a = self.sde.mean_coeff(t.double())[:, None]
        s = self.sde.std(t.double())[:, None]
        v = x.reshape(x.shape[0], -1).double() - a * mean
        coef = self.evecs.T @ v.T  # (n, B)
        coef = coef / (a.T**2 * self.evals[:, None] + s.T**2)
        return (-(self.evecs @ coef).T).reshape(x.shape).to(x.dtype)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """Exact ``∇ log p_t(x)``; ``x`` (B, 1, H, W) real or complex, ``t`` (B,)."""
        t = torch.as_tensor(t).expand(x.shape[0]) if torch.as_tensor(t).ndim == 0 else t
        if x.is_complex():
            zero = torch.zeros_like(self.mean)
            return torch.complex(self._score_real(x.real, t, self.mean), self._score_real(x.imag, t, zero))
        return self._score_real(x, t, self.mean)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Prior samples, shape (n, 1, H, W), float64."""
        z = torch.randn(n, self.mean.numel(), generator=generator, dtype=torch.float64)
        x = self.mean + (z * self.evals.clamp_min(0).sqrt()) @ self.evecs.T
        return x.reshape(n, 1, *self.shape)


def _dense(A: LinearOperator, n_pix: int, shape, complex_in: bool) -> Tensor:  # noqa: N803
    """A as a real matrix on [Re x; Im x] (complex inputs) or x, to [Re y; Im y] or y."""
    basis = torch.eye(n_pix, dtype=torch.float64).reshape(n_pix, 1, *shape)
    cols = [A(basis)]
    if complex_in:
        cols.append(A(basis.to(torch.complex128) * 1j))
    out = []
    for c in cols:
        c = c.reshape(n_pix, -1)
        out.append(torch.cat([c.real, c.imag], 1) if c.is_complex() else c)
    return torch.cat(out, 0).T  # (m, n or 2n)


def gaussian_posterior(prior: GaussianPrior, A: LinearOperator, y: Tensor) -> tuple[Tensor, Tensor]:  # noqa: N803
    """Exact posterior mean and pixel-wise std of ``x`` given noiseless ``y = A x`` (one item).

    Returns
    -------
    mean, std : Tensor, shape (1, H, W) (complex mean for complex-domain operators)
    """
    n = prior.mean.numel()
    cplx = A.in_complex
    M = _dense(A, n, prior.shape, cplx)  # noqa: N806
    mu = torch.cat([prior.mean, torch.zeros(n, dtype=torch.float64)]) if cplx else prior.mean
    cov = torch.block_diag(prior.cov, prior.cov) if cplx else prior.cov
    yv = y.reshape(-1)
    yv = torch.cat([yv.real, yv.imag]).double() if yv.is_complex() else yv.double()
    gain = cov @ M.T @ torch.linalg.pinv(M @ cov @ M.T, hermitian=True, rtol=1e-10)
    mean = mu + gain @ (yv - M @ mu)
    post = cov - gain @ M @ cov
    var = post.diagonal().clamp_min(0)
    if cplx:
        m = torch.complex(mean[:n], mean[n:]).reshape(1, *prior.shape)
        s = (var[:n] + var[n:]).sqrt().reshape(1, *prior.shape)  # std of the complex value
        return m, s
    return mean.reshape(1, *prior.shape), var.sqrt().reshape(1, *prior.shape)
