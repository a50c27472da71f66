"""Forward SDEs of score-based diffusion: variance exploding (VE) and variance preserving (VP).

Both follow Song et al., "Score-Based Generative Modeling through Stochastic Differential
Equations" (ICLR 2021); ALGORITHMS.md §1 states the equations.  Time ``t`` is continuous in
``[0, 1]``; ``t`` tensors have shape ``(B,)`` and broadcast over ``(B, C, H, W)`` images.

Conventions
-----------
* ``marginal(x0, t)`` returns the mean and standard deviation of ``p_t(x | x0)``:
  VE: ``(x0, sigma(t))``; VP: ``(a(t) x0, sqrt(1 - a(t)^2))`` with
  ``a(t) = exp(-t^2 (beta_max - beta_min) / 4 - t beta_min / 2)``.
* ``discretize(x, t)`` returns the ``(f, G)`` of the discrete reverse-diffusion predictor of
  ALGORITHMS.md §2 (VE: SMLD, VP: DDPM), for a grid of ``n_steps`` steps.
* ``noise_condition(t)`` is what the network sees as its time input (``999 t`` for both), so
  the sinusoidal embedding of MONAI's ``DiffusionModelUNet`` covers its useful range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from medrecon.errors import SettingsError

__all__ = ["SDE", "VESDE", "VPSDE", "sde_from_dict"]


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``(B,)`` tensor so that it broadcasts over ``x`` of shape ``(B, ...)``."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)).to(dtype=x.dtype)


def _as_t(t: Tensor | float, x: Tensor) -> Tensor:
    """Return ``t`` as a ``(B,)`` tensor on ``x``'s device (float64 for exact schedule maths)."""
    if not isinstance(t, Tensor):
        t = torch.tensor(float(t), device=x.device)
    t = t.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise SettingsError(
            f"SDE: t must be a scalar or shape ({x.shape[0]},); got {tuple(t.shape)}"
        )
    return t


class SDE:
    """Base class: the interface every forward SDE provides.

    Attributes
    ----------
    n_steps : int
        Default number of discretisation steps of the reverse process.
    eps : float
        Smallest time used in training and sampling (avoids ``sigma = 0``).
    """

    kind: str = ""
    n_steps: int = 1000
    eps: float = 1e-5

    def std(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Return the standard deviation of ``p_t(x | x0)``, shape like ``t``."""
        raise NotImplementedError

    def mean_coeff(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Factor ``a(t)`` with ``E[x_t | x0] = a(t) x0``, shape like ``t``."""
        raise NotImplementedError

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """Drift ``f(x, t)`` (shape of ``x``) and diffusion coefficient ``g(t)`` (shape ``(B,)``)."""
        raise NotImplementedError

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """Discrete ``(f, G)`` of the reverse-diffusion predictor at time ``t``."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict (round-trips through :func:`sde_from_dict`)."""
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]

    # shared helpers -----------------------------------------------------------------------
    def marginal(self, x0: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of ``p_t(x | x0)``.

        Parameters
        ----------
        x0 : Tensor, shape (B, C, H, W)
            Clean images in normalised space.
        t : Tensor, shape (B,) or scalar
            Diffusion times in ``[0, 1]``.

        Returns
        -------
        mean : Tensor, shape (B, C, H, W)
        std : Tensor, shape (B, 1, 1, 1)
        """
        tt = _as_t(t, x0)
        return _bcast(self.mean_coeff(tt), x0) * x0, _bcast(self.std(tt), x0)

    def perturb(
        self, x0: Tensor, t: Tensor | float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``x_t ~ p_t(x | x0)``; returns ``(x_t, z, std)`` with ``x_t = mean + std z``."""
        mean, std = self.marginal(x0, t)
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return mean + std * z, z, std

    def prior_sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Sample the terminal distribution ``p_1`` (``N(0, sigma_max^2 I)`` or ``N(0, I)``)."""
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        one = torch.ones(shape[0], device=device, dtype=dtype)
        return z * _bcast(self.std(one), z)

    def noise_condition(self, t: Tensor) -> Tensor:
        """Time input of the network: ``999 t``, shape ``(B,)``."""
        return 999.0 * t

    def timesteps(
        self,
        n_steps: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Return the sampling grid ``linspace(1, eps, n_steps)`` (ALGORITHMS.md §2)."""
        n = self.n_steps if n_steps is None else int(n_steps)
        return torch.linspace(1.0, self.eps, n, device=device, dtype=dtype)


@dataclass(frozen=True)
class VESDE(SDE):
    """Variance-exploding SDE, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.

    Parameters
    ----------
    sigma_min, sigma_max : float
        Noise range in normalised image units; ``sigma_max`` should be about the largest
        Euclidean distance between two training images (Song & Ermon 2020, technique 1).
    n_steps : int
        Default number of reverse steps.
    eps : float
        Smallest time.

    Examples
    --------
    >>> sde = VESDE(0.01, 50.0)
    >>> float(sde.sigma(torch.tensor([1.0]))[0])
    50.0
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    n_steps: int = 1000
    eps: float = 1e-5
    kind = "ve"  # class attribute, not a field

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise SettingsError(
                f"VESDE: need 0 < sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}"
            )

    def sigma(self, t: Tensor) -> Tensor:
        """Noise level ``sigma(t)``, shape like ``t``."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def std(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.sigma(t)

    def mean_coeff(self, t: Tensor) -> Tensor:  # noqa: D102
        return torch.ones_like(t)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        tt = _as_t(t, x)
        g = self.sigma(tt) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), g.to(x.dtype)

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """SMLD step: ``f = 0``, ``G = sqrt(sigma_i^2 - sigma_{i-1}^2)`` on the ``n_steps`` grid."""
        tt = _as_t(t, x)
        sig = self.sigma(tt)
        prev = self.sigma(torch.clamp(tt - 1.0 / self.n_steps, min=0.0))
        prev = torch.where(tt - 1.0 / self.n_steps > 0, prev, torch.zeros_like(prev))
        return torch.zeros_like(x), torch.sqrt(sig**2 - prev**2).to(x.dtype)


@dataclass(frozen=True)
class VPSDE(SDE):
    """Variance-preserving SDE, ``beta(t) = beta_min + t (beta_max - beta_min)``.

    Parameters
    ----------
    beta_min, beta_max : float
        Linear noise schedule; with ``n_steps = 1000`` the discretisation is DDPM's
        ``beta in [1e-4, 0.02]``.
    n_steps : int
        Default number of reverse steps.
    eps : float
        Smallest time.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    n_steps: int = 1000
    eps: float = 1e-5
    kind = "vp"

    def __post_init__(self) -> None:
        if not 0 <= self.beta_min < self.beta_max:
            raise SettingsError(
                f"VPSDE: need 0 <= beta_min < beta_max; got {self.beta_min}, {self.beta_max}"
            )

    def beta(self, t: Tensor) -> Tensor:
        """Instantaneous rate ``beta(t)``."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _log_mean(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def mean_coeff(self, t: Tensor) -> Tensor:  # noqa: D102
        return torch.exp(self._log_mean(t))

    def std(self, t: Tensor) -> Tensor:  # noqa: D102
        return torch.sqrt(-torch.expm1(2.0 * self._log_mean(t)))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        tt = _as_t(t, x)
        b = self.beta(tt)
        return -0.5 * _bcast(b, x) * x, torch.sqrt(b).to(x.dtype)

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM step: ``f = (sqrt(1 - beta_i) - 1) x``, ``G = sqrt(beta_i)``, ``beta_i = beta(t)/N``."""
        tt = _as_t(t, x)
        b = self.beta(tt) / self.n_steps
        f = (_bcast(torch.sqrt(1.0 - b), x) - 1.0) * x
        return f, torch.sqrt(b).to(x.dtype)


def sde_from_dict(d: dict[str, Any]) -> SDE:
    """Build an SDE from :meth:`SDE.to_dict` output.

    Raises
    ------
    SettingsError
        If ``kind`` is unknown or a field is not accepted.
    """
    d = dict(d)
    kind = d.pop("kind", None)
    classes: dict[str, type[SDE]] = {"ve": VESDE, "vp": VPSDE}
    if kind not in classes:
        raise SettingsError(f"sde_from_dict: unknown SDE kind {kind!r}; known: ve, vp")
    try:
        return classes[kind](**d)  # type: ignore[call-arg]
    except TypeError as err:
        raise SettingsError(f"sde_from_dict: bad settings for {kind!r}: {d}") from err
