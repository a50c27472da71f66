"""Diffusion methods as presets of sampler pieces: Song et al. 2022, DPS, CCDF and score-MRI.

| method | start | predictor / corrector | conditioning |
|---|---|---|---|
| ``song`` | noise at t = 1 | reverse diffusion + Langevin | λ data consistency with ŷ_t |
| ``dps`` | noise at t = 1 | reverse diffusion (ancestral) | ∇‖y − A x̂₀(x_t)‖ through the network |
| ``ccdf`` | forward-diffused initial estimate (TV by default) at t₀ | as ``song`` | as ``song``, N′ = t₀·N steps |
| ``score-mri`` | noise | reverse diffusion + Langevin | hard consistency; SENSE gradient every m steps (multi-coil) |
| ``mbir3d`` | forward-diffused FBP/TV at t₀ (or noise) | slice-wise in chunks | one ADMM-TV iteration along z on the volume |

``mbir3d`` (Chung et al., CVPR 2023) takes a volume as slices on the batch axis; its network
evaluations run on chunks of slices whose size follows ``max_memory``, the ADMM variables and
duals persist across diffusion steps, and posterior samples are drawn one volume at a time.

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
    start : {"auto", "noise", "ccdf"}
        Start from noise at t = 1 or from the forward-diffused initial estimate at t₀
        (auto: ccdf for ``ccdf`` and ``mbir3d``, noise otherwise).
    lam_tv, rho_tv : float
        mbir3d: TV weight and ADMM penalty, relative to the normalised data term ½‖Ax−y‖²/‖A‖².
    tv_axes : tuple of str
        mbir3d: ("z",) (default, TV along slices) or ("z", "y", "x") (isotropic 3-D TV).
    admm_cg_iters : int
        mbir3d: CG steps of the ADMM x-update per diffusion step (DiffusionMBIR's fast code: 1).
    chunk : int, optional
        Network evaluations on at most this many slices at a time (wins over ``max_memory``).
    max_memory : float or None
        Memory budget in bytes, 4 GiB by default for every method; sets ``chunk`` (see
        :func:`chunk_for_budget`), so that a volume's slices (or many samples) pass the network
        in chunks rather than all at once.  None: one batch, however large.
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
    start: str = "auto"
    lam_tv: float = 1e-3
    rho_tv: float = 1e-2
    tv_axes: tuple[str, ...] = ("z",)
    admm_cg_iters: int = 1
    chunk: int | None = None
    max_memory: float | None = 4 * 2**30
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, dict[str, Any]] = {
    "song": {"steps": 1000, "snr": 0.16, "lam": 1.0},
    "dps": {"steps": 1000, "snr": 0.0, "zeta": 1.0},
    # CCDF from a TV image at t0 = 0.2 (σ(t0) ≈ 0.057 for ct-256): measured with ct-256 on two
    # 23-view validation slices (N = 100, 2 samples), TV 35.84 dB; CCDF from TV at t0 = 0.1 /
    # 0.15 / 0.2: 36.82 / 36.90 / 36.85 dB; from FBP at the paper's t0 = 0.3: 33.44 dB.  MRI 8×
    # (mri-256): from TV at 0.2 / 0.3 21.92 / 22.04 dB, from zero-filled at 0.4 20.86 dB
    "ccdf": {"steps": 1000, "snr": 0.16, "lam": 1.0, "t0": 0.2, "init": "tv"},
    "score-mri": {"steps": 500, "snr": 0.16, "lam": 1.0, "sense_every": 50},
    # 2000 steps from noise in the paper (≈8 h per volume on a GPU); a CCDF start at t0 = 0.3
    # of an N = 100 grid, predictor only (31 network evaluations per slice), is the benchmarked
    # setting: 64 slices of 256² with 8 views in 29 min on one CPU core (docs/benchmarks.md);
    # the Langevin corrector (snr 0.16) doubles the time for +0.3 dB there
    "mbir3d": {"steps": 100, "snr": 0.0, "t0": 0.3, "lam_tv": 1e-3, "rho_tv": 1e-2},
}

#: memory per slice of a network evaluation, in bytes per pixel (measured for the "S" UNet at
#: 256², about 0.4 GB per image in inference, ENVIRONMENT.md)
NET_BYTES_PER_PIXEL = 6000


def chunk_for_budget(max_memory: float, volume: Tensor) -> int:
    """Slices per network evaluation that fit ``max_memory`` bytes next to the volume itself.

    The volume-sized state (x, noise, measurement, ADMM variables, CG temporaries) is taken as
    12 copies of the volume; the rest is divided by :data:`NET_BYTES_PER_PIXEL` per pixel.  A
    budget smaller than the fixed part still runs, one slice at a time.
    """
    fixed = 12 * volume.numel() * volume.element_size()
    per_slice = NET_BYTES_PER_PIXEL * volume[0].numel()
    return max(1, int((max_memory - fixed) // per_slice))
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
    if s.start not in ("auto", "noise", "ccdf"):
        raise SettingsError(f"start must be auto, noise or ccdf; got {s.start!r}")
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
    from medrecon.solvers.tuning import operator_key, tuned_defaults  # card["tuned"][key][method]

    tuned = tuned_defaults(getattr(model, "card", None), A, method)
    s = _settings(method, {**tuned, **overrides})
    b = y.shape[0]
    start = s.start if s.start != "auto" else ("ccdf" if method in ("ccdf", "mbir3d") else "noise")
    # the initial estimate is deterministic: computed once, shared by every sample
    x_init = _initial_estimate(y, A, s.init) if start == "ccdf" else None
    if method == "mbir3d":
        # one volume per sample: the TV couples the slices of a volume, not different samples
        outs, nfe, steps_run = [], 0, 0
        for k in range(n_samples):
            x, n_k, steps_run = _chain(y, A, model, method, s, seed * 1_000_003 + k, progress, x_init)
            outs.append(x)
            nfe += n_k
        samples = torch.stack(outs)
    else:
        yr = y.repeat(n_samples, *([1] * (y.ndim - 1)))
        xr = None if x_init is None else x_init.repeat(n_samples, *([1] * (x_init.ndim - 1)))
        x, nfe, steps_run = _chain(yr, A, model, method, s, seed, progress, xr)
        samples = x.reshape(n_samples, b, *x.shape[1:])
    info = {
        "settings": {k: v for k, v in dataclasses.asdict(s).items() if k != "extra"},
        "nfe": nfe,  # network evaluations (each on the whole batch of samples)
        "steps_run": steps_run,
        "n_samples": n_samples,
        "tuned": operator_key(A) if tuned else None,  # the card's tuned defaults were applied
    }
    return samples, info


def _chain(
    yr: Tensor, A: SamplingOperator, model: ScoreModel, method: str, s: DiffusionSettings,  # noqa: N803
    seed: int, progress: bool, x0: Tensor | None,
) -> tuple[Tensor, int, int]:
    """One run of the sampler on a batch from noise, or (CCDF start) from the initial estimate
    ``x0`` of each item forward-diffused to t₀; returns (final images, NFE, steps run)."""
    sde = dataclasses.replace(model.sde, n_steps=s.steps)
    like = A.adjoint(yr)
    if not A.in_complex:
        like = like.real if like.is_complex() else like
    chunk = s.chunk if s.chunk is not None or s.max_memory is None else chunk_for_budget(s.max_memory, like)
    score = ScoreCounter(model, track_grad=(method == "dps"), chunk=chunk)
    score.sde = sde
    rng = torch.Generator(device="cpu").manual_seed(seed)
    schedule = sde.timesteps(s.steps, device=yr.device, dtype=like.real.dtype)
    exact = s.exact_dc if s.exact_dc is not None else not isinstance(A, MaskedFourierType)

    if x0 is not None:
        schedule = schedule[schedule <= s.t0 + 1e-9]
        t_start = schedule[:1].expand(x0.shape[0])
        a = sde.mean_coeff(t_start.double()).reshape(-1, *([1] * (x0.ndim - 1))).to(like.real.dtype)
        sd = sde.std(t_start.double()).reshape(-1, *([1] * (x0.ndim - 1))).to(like.real.dtype)
        x = a * x0 + sd * randn_like(x0, rng)
    else:
        one = torch.ones(like.shape[0], dtype=torch.float64, device=yr.device)
        sd = sde.std(one).reshape(-1, *([1] * (like.ndim - 1))).to(like.real.dtype)
        x = sd * randn_like(like, rng)

    predictor = _predictor(s, score)
    corrector = pieces.langevin(score, s.snr, s.corrector_steps) if s.snr > 0 else pieces.identity_step
    if method == "dps":
        condition = pieces.dps_guidance(A, yr, score, s.zeta, classical.operator_norm(A, like))
    elif method == "mbir3d":
        condition = pieces.admm_tv(A, yr, s.lam_tv, s.rho_tv, tuple(s.tv_axes), s.admm_cg_iters)
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
    return x, score.nfe, int(len(schedule))
