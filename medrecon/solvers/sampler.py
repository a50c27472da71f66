"""The one diffusion sampling loop, and the score bookkeeping its pieces share.

``sample`` runs ``x = condition(corrector(predictor(x, t), t), t)`` over a time grid.  The pieces
(:mod:`medrecon.solvers.pieces`) are small callables ``(x, t, rng) -> x``; a method (Song et al.,
DPS, CCDF, score-MRI) is a preset of pieces and settings (:mod:`medrecon.solvers.presets`), never
a loop of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Step", "ScoreModel", "ScoreCounter", "sample", "randn_like"]

Step = Callable[[Tensor, Tensor, torch.Generator], Tensor]


class ScoreModel(Protocol):
    """What the solvers need from a prior: an SDE and a score in normalised space.

    :class:`medrecon.priors.ScorePrior` and the analytic Gaussian prior of the tests both fit.
    """

    @property
    def sde(self):  # noqa: D102
        ...

    def score(self, x: Tensor, t: Tensor) -> Tensor:  # noqa: D102
        ...


class ScoreCounter:
    """Wraps a score model: counts network evaluations (NFE) and remembers the last call.

    DPS differentiates ``‖y − A x̂₀(x_t)‖`` through the network; the predictor and the
    conditioning share one forward pass through :attr:`last` (x, t, score) instead of running
    the network twice (a pitfall reported in deepinv#896).

    Parameters
    ----------
    model : ScoreModel
    track_grad : bool
        Evaluate with autograd on and keep the graph of the last call (DPS).
    chunk : int, optional
        Evaluate the network on at most this many images at a time (volumes slice by slice).
    """

    def __init__(self, model: ScoreModel, track_grad: bool = False, chunk: int | None = None):
        self.model = model
        self.sde = model.sde
        self.track_grad = track_grad
        self.chunk = chunk
        self.nfe = 0
        self.last: tuple[Tensor, Tensor, Tensor] | None = None

    def _eval(self, x: Tensor, t: Tensor) -> Tensor:
        """The model's score, on at most ``chunk`` images at a time (bounds network memory)."""
        c = self.chunk or x.shape[0]
        if c >= x.shape[0]:
            return self.model.score(x, t)
        return torch.cat([self.model.score(x[i : i + c], t[i : i + c]) for i in range(0, x.shape[0], c)])

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1 if not x.is_complex() else 2  # real and imaginary parts are two evaluations
        if self.track_grad:
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                s = self._eval(x, t)
            self.last = (x, t, s)
            return s.detach()
        with torch.no_grad():
            s = self._eval(x, t)
        self.last = None
        return s


def randn_like(x: Tensor, rng: torch.Generator) -> Tensor:
    """Standard normal noise shaped like ``x``; complex tensors get N(0, 1) real and imaginary
    parts (they are two real images to the prior)."""
    dt = x.real.dtype if x.is_complex() else x.dtype
    z = torch.randn(x.shape, generator=rng, dtype=dt, device=rng.device).to(x.device)
    if x.is_complex():
        zi = torch.randn(x.shape, generator=rng, dtype=dt, device=rng.device).to(x.device)
        return torch.complex(z, zi)
    return z


def sample(
    x: Tensor,
    schedule: Tensor,
    predictor: Step,
    corrector: Step,
    condition: Step,
    rng: torch.Generator,
    progress: bool = False,
) -> Tensor:
    """Run the predictor–corrector–conditioning loop over ``schedule`` (descending times).

    Parameters
    ----------
    x : Tensor, shape (B, C, H, W)
        Starting state (noise at t = 1, or a forward-diffused estimate for CCDF).
    schedule : Tensor, shape (N,)
        Times, descending.
    predictor, corrector, condition : Step
        ``(x, t, rng) -> x`` with ``t`` of shape ``(B,)``.
    rng : torch.Generator
        The only source of randomness.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    Tensor, shape of ``x``
    """
    steps = schedule
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(schedule, desc="sampling", leave=False)
    for t in steps:
        tb = t.expand(x.shape[0])
        x = condition(corrector(predictor(x, tb, rng), tb, rng), tb, rng)
    return x
