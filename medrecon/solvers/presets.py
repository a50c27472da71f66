"""Diffusion methods as presets of sampler pieces: Song et al. 2022, DPS, CCDF, score-MRI, DDS.

| method | start | predictor / corrector | conditioning |
|---|---|---|---|
| ``song`` | noise at t = 1 | reverse diffusion + Langevin | λ data consistency with ŷ_t |
| ``dps`` | noise at t = 1 | reverse diffusion (ancestral) | ∇‖y − A x̂₀(x_t)‖ through the network |
| ``ccdf`` | forward-diffused initial estimate (TV by default) at t₀ | as ``song`` | as ``song``, N′ = t₀·N steps |
| ``score-mri`` | noise | reverse diffusion + Langevin | hard consistency; SENSE gradient every m steps (multi-coil) |
| ``mbir3d`` | forward-diffused FBP/TV at t₀ (or noise) | slice-wise in chunks | one ADMM-TV iteration along z on the volume |
| ``dds`` | forward-diffused TV at t₀ (or noise) | DDIM whose x̂₀ gets M CG steps before re-noising | (inside the predictor) |
| ``dds3d`` | as ``dds`` | as ``dds``, slice-wise in chunks | ADMM on data + TV along z on x̂₀ (inside the predictor) |

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
from medrecon.operators.ct import CTProjector
from medrecon.operators.mri import MaskedFourier as MaskedFourierType
from medrecon.operators.mri import MultiCoilMRI
from medrecon.solvers import classical, pieces
from medrecon.solvers.cards import operator_key, same_setting, tuned_on_other_weights
from medrecon.solvers.sampler import ScoreCounter, ScoreModel, randn_like, sample

__all__ = ["DiffusionSettings", "PRESETS", "DIFFUSION_METHODS", "run_diffusion", "sample_unconditional"]


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
        mbir3d and dds3d: CG steps of the ADMM x-update (DiffusionMBIR's fast code: 1).
    dc_iters : int
        dds: conjugate-gradient steps of the data consistency on x̂₀ per step (M).
    dc_gamma : float
        dds: proximal weight γ relative to ‖A‖² (0: plain CG from x̂₀; > 0 for noisy data).
    admm_iters : int
        dds3d: ADMM iterations of the data term + TV along z on x̂₀ per step.
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
    dc_iters: int = 5
    dc_gamma: float = 0.0
    admm_iters: int = 1
    chunk: int | None = None
    max_memory: float | None = 4 * 2**30
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, dict[str, Any]] = {
    # step counts where no tuned value exists: the papers' 1000-2000 steps take 10+ minutes per
    # slice on a CPU; these are the counts the cards' tuned and calibrated entries use (100 for
    # CCDF and DPS) or the shortest that sampled well in the tests' analytic posteriors (150)
    "song": {"steps": 200, "snr": 0.16, "lam": 1.0},
    "dps": {"steps": 100, "snr": 0.0, "zeta": 1.0},
    # CCDF from a TV image at t0 = 0.2 (σ(t0) ≈ 0.057 for ct-256): measured with ct-256 on two
    # 23-view validation slices (N = 100, 2 samples), TV 35.84 dB; CCDF from TV at t0 = 0.1 /
    # 0.15 / 0.2: 36.82 / 36.90 / 36.85 dB; from FBP at the paper's t0 = 0.3: 33.44 dB.  MRI 8×
    # (mri-256): from TV at 0.2 / 0.3 21.92 / 22.04 dB, from zero-filled at 0.4 20.86 dB
    "ccdf": {"steps": 100, "snr": 0.16, "lam": 1.0, "t0": 0.2, "init": "tv"},
    "score-mri": {"steps": 200, "snr": 0.16, "lam": 1.0, "sense_every": 20},
    # 2000 steps from noise in the paper (≈8 h per volume on a GPU); a CCDF start at t0 = 0.3
    # of an N = 100 grid, predictor only (31 network evaluations per slice), is the benchmarked
    # setting: 64 slices of 256² with 8 views in 29 min on one CPU core (docs/benchmarks.md);
    # the Langevin corrector (snr 0.16) doubles the time for +0.3 dB there
    "mbir3d": {"steps": 100, "snr": 0.0, "t0": 0.3, "lam_tv": 1e-3, "rho_tv": 1e-2},
    # DDS (Chung, Lee & Ye, ICLR 2024): DDIM (η 0.85 as in the paper) whose Tweedie estimate
    # gets M = 5 CG steps of data consistency before re-noising; started, as CCDF, from a TV
    # image forward-diffused to t0.  t0 = 0.2 of an N = 150 grid is 30 network evaluations.
    # Operator-specific values come from the card's tuned settings (benchmarks/tune.py).
    "dds": {"steps": 150, "predictor": "ddim", "eta": 0.85, "snr": 0.0, "t0": 0.2, "init": "tv",
            "start": "ccdf", "dc_iters": 5},
    # DDS for volumes: the 2-D prior slice-wise in chunks; the data consistency on x̂₀ is ADMM on
    # the data term + TV along z over the whole volume (CG inner steps)
    "dds3d": {"steps": 150, "predictor": "ddim", "eta": 0.85, "snr": 0.0, "t0": 0.3, "init": "tv",
              "start": "ccdf", "lam_tv": 1e-3, "rho_tv": 1e-2, "admm_iters": 2, "admm_cg_iters": 3},
}

#: methods that run one volume per posterior sample (their data consistency couples slices)
VOLUME_METHODS = ("mbir3d", "dds3d")
#: methods whose data consistency acts on the Tweedie estimate inside the DDIM step
DDS_METHODS = ("dds", "dds3d")

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


def settings_defaults() -> dict[str, Any]:
    """Every :class:`DiffusionSettings` field with its default value."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(DiffusionSettings) if f.name != "extra"}


def tuned_entry(card: dict[str, Any] | None, A: LinearOperator, method: str) -> tuple[dict[str, Any], str]:  # noqa: N803
    """The settings fields of ``card["tuned"][operator_key(A)][method]`` (empty when there is no
    entry) and why they do not hold for the card's weights (``""`` when they do): entries tuned
    on other weights (:func:`~medrecon.solvers.cards.tuned_on_other_weights`) are kept on the
    card as a candidate for re-tuning but not applied."""
    key = operator_key(A)
    entry = (card or {}).get("tuned", {}).get(key, {}).get(method, {})
    names = settings_defaults()
    return {k: v for k, v in entry.items() if k in names}, tuned_on_other_weights(card, entry, f"{key}/{method}")


def tuned_defaults(card: dict[str, Any] | None, A: LinearOperator, method: str) -> dict[str, Any]:  # noqa: N803
    """The tuned settings stored on ``card`` for ``A``'s key and ``method`` that hold for its
    weights (:func:`tuned_entry`); empty when there are none."""
    settings, stale = tuned_entry(card, A, method)
    return {} if stale else settings


#: tuned values that scale with the number of steps, kept right by a rule when the caller
#: changes ``steps``: DPS's ζ (the total guidance Σζ over the run stays the same)
_PER_STEP_RULES = {"dps": {"zeta": lambda zeta, tuned_steps, steps: zeta * tuned_steps / steps}}


def _tuned_for(
    method: str, tuned: dict[str, Any], overrides: dict[str, Any], key: str,
) -> tuple[dict[str, Any], list[str]]:
    """The card's tuned settings for a run whose caller overrides some of them.

    Tuned values hold for the settings they were tuned with.  Where the caller changes one of
    those (``steps`` most often), a value with a known rule is rescaled (DPS's ζ with the step
    count); any other tuned value still applied is named in a warning, since it was measured at
    other settings.
    """
    changed = sorted(k for k, v in overrides.items() if k in tuned and not same_setting(tuned[k], v))
    if not changed:
        return tuned, []
    out, warnings = dict(tuned), []
    rules = _PER_STEP_RULES.get(method, {})
    if "steps" in changed:
        for name, rule in rules.items():
            if name in out and name not in overrides:
                new = float(f"{rule(float(out[name]), int(tuned['steps']), int(overrides['steps'])):.4g}")
                warnings.append(
                    f"{method}: {name} {out[name]} was tuned for {tuned['steps']} steps on {key}; "
                    f"rescaled to {new} for {overrides['steps']} steps"
                )
                out[name] = new
    rest = sorted(k for k in out if k not in overrides and k not in rules)
    if rest:
        at = ", ".join(f"{k} {tuned[k]}" for k in changed)
        warnings.append(
            f"{method}: the tuned {', '.join(f'{k} {out[k]}' for k in rest)} for {key} were measured with "
            f"{at}; this run changes that, so they may not suit it (re-tune with benchmarks/tune.py)"
        )
    return out, warnings


def _settings(method: str, overrides: dict[str, Any]) -> DiffusionSettings:
    names = set(settings_defaults())
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
        init = "fbp" if isinstance(A, CTProjector) else ("cg" if isinstance(A, MultiCoilMRI) else "zero-filled")
    if init == "fbp":
        return classical.fbp(y, A)
    if init == "zero-filled":
        return classical.zero_filled(y, A)
    if init == "tv":
        return classical.tv(y, A, nonneg=isinstance(A, CTProjector))
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
    method : {"dds", "ccdf", "song", "dps", "score-mri", "dds3d", "mbir3d"}
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
    card = getattr(model, "card", None)
    tuned, stale = tuned_entry(card, A, method)
    tuned, warnings = _tuned_for(method, {} if stale else tuned, overrides, operator_key(A))
    if stale:
        warnings.append(stale)
    s = _settings(method, {**tuned, **overrides})
    b = y.shape[0]
    start = s.start if s.start != "auto" else ("ccdf" if method in ("ccdf", *VOLUME_METHODS) else "noise")
    # the initial estimate is deterministic: computed once, shared by every sample
    x_init = _initial_estimate(y, A, s.init) if start == "ccdf" else None
    if method in VOLUME_METHODS:
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
        "warnings": warnings,
    }
    return samples, info


def _coeffs(sde, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(a(t), s(t))`` per item, shaped to broadcast over ``like`` in its real dtype."""
    shape = (-1, *([1] * (like.ndim - 1)))
    return (sde.mean_coeff(t.double()).reshape(shape).to(like.real.dtype),
            sde.std(t.double()).reshape(shape).to(like.real.dtype))


def _tweedie(score: ScoreCounter, sde, x: Tensor, t1: Tensor) -> Tensor:
    """The Tweedie estimate ``(x + s² score(x, t)) / a`` at the one time ``t1`` (shape (1,))."""
    t = t1.expand(x.shape[0])
    a, sd = _coeffs(sde, t, x)
    return (x + sd**2 * score(x, t)) / a


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
        a, sd = _coeffs(sde, t_start, like)
        x = a * x0 + sd * randn_like(x0, rng)
    else:
        one = torch.ones(like.shape[0], dtype=torch.float64, device=yr.device)
        sd = _coeffs(sde, one, like)[1]
        x = sd * randn_like(like, rng)

    corrector = pieces.langevin(score, s.snr, s.corrector_steps) if s.snr > 0 else pieces.identity_step
    condition = pieces.identity_step
    x0_step = None
    if method == "dds":
        x0_step = pieces.cg_consistency(A, yr, s.dc_iters, s.dc_gamma, classical.operator_norm(A, like) ** 2)
    elif method == "dds3d":
        x0_step = pieces.admm_tv_consistency(A, yr, s.lam_tv, s.rho_tv, s.admm_iters, tuple(s.tv_axes), s.admm_cg_iters)
    elif method == "dps":
        condition = pieces.dps_guidance(A, yr, score, s.zeta, classical.operator_norm(A, like))
    elif method == "mbir3d":
        condition = pieces.admm_tv(A, yr, s.lam_tv, s.rho_tv, tuple(s.tv_axes), s.admm_cg_iters)
    else:
        condition = pieces.song_consistency(A, yr, sde, s.lam, exact=exact)
        if method == "score-mri" and isinstance(A, MultiCoilMRI):
            condition = pieces.chain(condition, pieces.sense_gradient(A, yr, s.sense_every, len(schedule)))
    if x0_step is not None and s.predictor != "ddim":
        raise SettingsError(f"{method} decomposes the DDIM step: predictor must be 'ddim', got {s.predictor!r}")
    predictor = pieces.ddim(score, s.eta, x0_step) if x0_step is not None else _predictor(s, score)
    x = sample(x, schedule, predictor, corrector, condition, rng, progress=progress)
    if x0_step is None:
        # noise removal: Tweedie at the last time, then an exact λ = 1 projection
        x = _tweedie(score, sde, x, schedule[-1:])
        x = A.data_consistency(x, yr, 1.0, exact=True, cg_iters=10)
    # (DDS: the last DDIM step lands on t = 0 with the data-consistent x̂₀ itself)
    return x.detach(), score.nfe, int(len(schedule))


@torch.no_grad()
def sample_unconditional(
    model: ScoreModel,
    shape: tuple[int, ...],
    *,
    n_steps: int = 200,
    snr: float = 0.16,
    corrector_steps: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Samples of the prior itself: the one loop with reverse diffusion + Langevin and no
    conditioning (ALGORITHMS.md §2), finished by a Tweedie step.  Used by the trainer's previews
    and the priors benchmark's sample grids.

    Parameters
    ----------
    model : ScoreModel
        Anything with ``sde`` and ``score(x, t)`` (a ``ScorePrior`` or a ``ScoreNet``).
    shape : tuple
        ``(B, C, H, W)``.
    n_steps : int
        Number of predictor steps (the SDE is re-discretised on this grid).
    snr : float
        Langevin signal-to-noise ratio.
    corrector_steps : int
        Langevin steps per predictor step (0 disables the corrector).
    generator : torch.Generator, optional
        Source of randomness (default: seed 0).
    device, dtype
        Of the samples (default: the model's parameters' device, float32).

    Returns
    -------
    Tensor, shape ``shape``, normalised space
    """
    if device is None:
        params = getattr(model, "parameters", None)
        first = next(params(), None) if callable(params) else None
        device = first.device if first is not None else "cpu"
    sde = dataclasses.replace(model.sde, n_steps=n_steps)
    rng = generator if generator is not None else torch.Generator().manual_seed(0)
    score = ScoreCounter(model)
    score.sde = sde
    x = sde.prior_sample(shape, rng, device, dtype)
    ts = sde.timesteps(n_steps, device=device, dtype=dtype)
    corrector = pieces.langevin(score, snr, corrector_steps) if corrector_steps > 0 and snr > 0 else pieces.identity_step
    x = sample(x, ts, pieces.reverse_diffusion(score), corrector, pieces.identity_step, rng)
    return _tweedie(score, sde, x, ts[-1:])
