"""Diffusion methods as presets of sampler pieces: Song et al. 2022, DPS, CCDF and score-MRI.

| method | start | predictor / corrector | conditioning |
|---|---|---|---|
| ``song`` | noise at t = 1 | reverse diffusion + Langevin | λ data consistency with ŷ_t |
| ``dps`` | noise at t = 1 | reverse diffusion (ancestral) | ∇‖y − A x̂₀(x_t)‖ through the network |
| ``ccdf`` | forward-diffused initial estimate at t₀ | as ``song`` | as ``song``, N′ = t₀·N steps |
| ``score-mri`` | noise | reverse diffusion + Langevin | hard consistency; SENSE gradient every m steps (multi-coil) |

All run in the prior's normalised space; :func:`run_diffusion` draws ``n_samples`` posterior
samples as one batch and finishes with a Tweedie denoising step and a λ = 1 data-consistency
projection (Song et al.'s code does the same).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from medrecon.errors import SettingsError
from medrecon.operators.base import LinearOperator, SamplingOperator
from medrecon.operators.ct import _Projector
from medrecon.operators.mri import MaskedFourier as MaskedFourierType
from medrecon.operators.mri import MultiCoilMRI
from medrecon.solvers import classical, pieces
from medrecon.solvers.sampler import ScoreCounter, ScoreModel, randn_like, sample

__all__ = ["DiffusionSettings", "PRESETS", "DIFFUSION_METHODS", "run_diffusion"]


@dataclass(frozen=True)
class DiffusionSettings:
    """Settings of a diffusion reconstruction (defaults come from the method's preset).

    Attributes
    ----------
    steps : int
        N, the number of grid points on [ε, 1] (CCDF runs the last t₀·N of them).
    predictor : {"reverse-diffusion", "euler-maruyama", "ddim"}
    snr : float
        Langevin signal-to-noise ratio; 0 disables the corrector.
    corrector_steps : int
    lam : float
        Song et al.'s λ (1 = hard data consistency).
    exact_dc : bool or None
        Project with CG (the minimum-norm correction ``Aᴴ(AAᴴ)⁻¹(ŷ − Ax)``, 5 steps) instead of
        T⁻¹ in every step.  None (default) = exact for CT and multi-coil MRI, where T⁻¹P⁻¹ is
        not a projection (x + FBP(ŷ − Ax) can even diverge on small or coarse grids), and T⁻¹ =
        Tᴴ for single-coil MRI, where it is exact.  The final projection is always exact.
    zeta : float
        DPS step, relative to the operator norm (see :func:`pieces.dps_guidance`).
    t0 : float
        CCDF start time.
    init : str
        CCDF initial estimate: "fbp", "zero-filled", "tv", "cg" or "auto".
    sense_every : int
        score-MRI: SENSE gradient step every this many steps.
    eta : float
        DDIM stochasticity.
    """

    steps: int = 1000
    predictor: str = "reverse-diffusion"
    snr: float = 0.16
    corrector_steps: int = 1
    lam: float = 1.0
    exact_dc: bool | None = None
    zeta: float = 1.0
    t0: float = 0.3
    init: str = "auto"
    sense_every: int = 50
    eta: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, dict[str, Any]] = {
    "song": {"steps": 1000, "snr": 0.16, "lam": 1.0},
    "dps": {"steps": 1000, "snr": 0.0, "zeta": 1.0},
    "ccdf": {"steps": 1000, "snr": 0.16, "lam": 1.0, "t0": 0.3},
    "score-mri": {"steps": 500, "snr": 0.16, "lam": 1.0, "sense_every": 50},
}
DIFFUSION_METHODS = tuple(PRESETS)


def _settings(method: str, overrides: dict[str, Any]) -> DiffusionSettings:
    names = {f.name for f in dataclasses.fields(DiffusionSettings)} - {"extra"}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise SettingsError(
            f"method {method!r} does not take {', '.join(unknown)}; it takes: {', '.join(sorted(names))}"
        )
    s = DiffusionSettings(**{**PRESETS[method], **overrides})
    if s.steps < 2:
        raise SettingsError(f"steps must be ≥ 2, got {s.steps}")
    if not 0 <= s.lam <= 1:
        raise SettingsError(f"lam must be in [0, 1], got {s.lam}")
    if not 0 < s.t0 <= 1:
        raise SettingsError(f"t0 must be in (0, 1], got {s.t0}")
    return s


def _predictor(s: DiffusionSettings, score: ScoreCounter):
    if s.predictor == "reverse-diffusion":
        return pieces.reverse_diffusion(score)
    if s.predictor == "euler-maruyama":
        return pieces.euler_maruyama(score)
    if s.predictor == "ddim":
        return pieces.ddim(score, s.eta)
    raise SettingsError(f"unknown predictor {s.predictor!r}; known: reverse-diffusion, euler-maruyama, ddim")


def _initial_estimate(y: Tensor, A: LinearOperator, init: str) -> Tensor:  # noqa: N803
    if init == "auto":
        init = "fbp" if isinstance(A, _Projector) else ("cg" if isinstance(A, MultiCoilMRI) else "zero-filled")
    if init == "fbp":
        return classical.fbp(y, A)
    if init == "zero-filled":
        return classical.zero_filled(y, A)
    if init == "tv":
        return classical.tv(y, A, nonneg=isinstance(A, _Projector))
    if init == "cg":
        return classical.cg(y, A, iters=20)
    raise SettingsError(f"unknown CCDF init {init!r}; known: auto, fbp, zero-filled, tv, cg")


def run_diffusion(
    y: Tensor,
    A: SamplingOperator,  # noqa: N803
    model: ScoreModel,
    method: str,
    *,
    n_samples: int = 4,
    seed: int = 0,
    progress: bool = False,
    **overrides: Any,
) -> tuple[Tensor, dict[str, Any]]:
    """Posterior samples of ``x`` given ``y = A x`` under the prior ``model`` (normalised space).

    Parameters
    ----------
    y : Tensor, shape (B, *A.out_shape)
        Measurement in the prior's normalised units.
    A : SamplingOperator
    model : ScoreModel
        Prior with ``sde`` and ``score(x, t)``.
    method : {"song", "dps", "ccdf", "score-mri"}
    n_samples : int
        Posterior draws per item, run as one batch of ``n_samples·B``.
    seed : int
    **overrides
        Fields of :class:`DiffusionSettings`.

    Returns
    -------
    samples : Tensor, shape (n_samples, B, *A.in_shape)
    info : dict
        Settings, NFE and the number of steps run.
    """
    if method not in PRESETS:
        raise SettingsError(f"unknown diffusion method {method!r}; known: {', '.join(PRESETS)}")
    if not isinstance(A, SamplingOperator):
        raise SettingsError(f"{method}: the operator must be a SamplingOperator, got {A.name}")
    if n_samples < 1:
        raise SettingsError(f"n_samples must be ≥ 1, got {n_samples}")
    s = _settings(method, overrides)
    sde = dataclasses.replace(model.sde, n_steps=s.steps)
    score = ScoreCounter(model, track_grad=(method == "dps"))
    score.sde = sde
    rng = torch.Generator(device="cpu").manual_seed(seed)
    b = y.shape[0]
    yr = y.repeat(n_samples, *([1] * (y.ndim - 1)))
    like = A.adjoint(yr)
    if not A.in_complex:
        like = like.real if like.is_complex() else like
    schedule = sde.timesteps(s.steps, device=y.device, dtype=like.real.dtype)
    exact = s.exact_dc if s.exact_dc is not None else not isinstance(A, MaskedFourierType)

    if method == "ccdf":
        x0 = _initial_estimate(y, A, s.init).repeat(n_samples, *([1] * (y.ndim - 1)))
        schedule = schedule[schedule <= s.t0 + 1e-9]
        t_start = schedule[:1].expand(x0.shape[0])
        a = sde.mean_coeff(t_start.double()).reshape(-1, *([1] * (x0.ndim - 1))).to(like.real.dtype)
        sd = sde.std(t_start.double()).reshape(-1, *([1] * (x0.ndim - 1))).to(like.real.dtype)
        x = a * x0 + sd * randn_like(x0, rng)
    else:
        one = torch.ones(like.shape[0], dtype=torch.float64, device=y.device)
        sd = sde.std(one).reshape(-1, *([1] * (like.ndim - 1))).to(like.real.dtype)
        x = sd * randn_like(like, rng)

    predictor = _predictor(s, score)
    corrector = pieces.langevin(score, s.snr, s.corrector_steps) if s.snr > 0 else pieces.identity_step
    if method == "dps":
        condition = pieces.dps_guidance(A, yr, score, s.zeta, classical.operator_norm(A, like))
    else:
        condition = pieces.song_consistency(A, yr, sde, s.lam, exact=exact)
        if method == "score-mri" and isinstance(A, MultiCoilMRI):
            condition = pieces.chain(condition, pieces.sense_gradient(A, yr, s.sense_every, len(schedule)))
    x = sample(x, schedule, predictor, corrector, condition, rng, progress=progress)

    # noise removal: Tweedie at the last time, then an exact λ = 1 projection
    t_last = schedule[-1:].expand(x.shape[0])
    a = sde.mean_coeff(t_last.double()).reshape(-1, *([1] * (x.ndim - 1))).to(x.real.dtype)
    sd = sde.std(t_last.double()).reshape(-1, *([1] * (x.ndim - 1))).to(x.real.dtype)
    x = (x + sd**2 * score(x, t_last)) / a
    x = A.data_consistency(x, yr, 1.0, exact=True, cg_iters=10).detach()
    samples = x.reshape(n_samples, b, *x.shape[1:])
    info = {
        "settings": {k: v for k, v in dataclasses.asdict(s).items() if k != "extra"},
        "nfe": score.nfe,  # network evaluations (each on the whole batch of samples)
        "steps_run": int(len(schedule)),
        "n_samples": n_samples,
    }
    return samples, info
