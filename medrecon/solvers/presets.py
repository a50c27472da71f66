"""Diffusion methods as presets of sampler pieces: Song et al. 2022, DPS, CCDF, score-MRI, DDS.

| method | start | predictor / corrector | conditioning |
|---|---|---|---|
| ``song`` | noise at t = 1 | reverse diffusion + Langevin | λ data consistency with ŷ_t |
| ``dps`` | noise at t = 1 | reverse diffusion (ancestral) | ∇‖y − A x̂₀(x_t)‖ through the network |
| ``ccdf`` | forward-diffused initial estimate (TV by default) at t₀ | as ``song`` | as ``song``, N′ = t₀·N steps |
| ``score-mri`` | noise | reverse diffusion + Langevin | hard consistency; SENSE gradient every m steps (multi-coil) |
| ``mbir3d`` | forward-diffused 3-D TV at t₀ (or noise) | slice-wise in chunks | one ADMM-TV iteration on the volume |
| ``dds`` | forward-diffused TV at t₀ (or noise) | DDIM whose x̂₀ gets M CG steps before re-noising | (inside the predictor) |
| ``dds3d`` | forward-diffused 3-D TV at t₀ | as ``dds``, slice-wise in chunks | ADMM on data + 3-D TV on x̂₀ (inside the predictor) |

The volume methods ``mbir3d`` (Chung et al., CVPR 2023) and ``dds3d`` take a volume as slices
on the batch axis.  They start from the best classical volume, 3-D TV (``init="tv3d"``, the
``reconstruct(method="tv", axes=("z", "y", "x"))`` result, computed once and shared by every
sample), forward-diffused to t₀, and refine it: with t₀ = 0 they return it unchanged.  Their
consistency step is TV on every axis: ``lam_tv`` along z and in-plane ``lam_tv_xy`` at t₀,
falling with the noise level σ(t) to 0 at the end (:func:`_tv_weights`), so the in-plane weight
starts as that of the start and goes to 0 as the prior's estimate sharpens.  Network evaluations run on chunks of slices (:func:`chunk_for_budget`: the fastest
batch per slice, within ``max_memory``); posterior samples are drawn one volume at a time (TV
couples the slices of a volume, not different samples), and mbir3d's ADMM variables and duals
persist across diffusion steps.

All run in the prior's normalised space; :func:`run_diffusion` draws ``n_samples`` posterior
samples as one batch and finishes with a Tweedie denoising step and a λ = 1 data-consistency
projection (Song et al.'s code does the same).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
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
from medrecon.solvers.cards import VOLUME_METHODS, operator_key, same_setting, tuned_on_other_weights
from medrecon.solvers.sampler import ScoreCounter, ScoreModel, randn_like, sample

__all__ = ["DiffusionSettings", "PRESETS", "DIFFUSION_METHODS", "run_diffusion", "sample_unconditional", "initial_estimate",
           "reuse_starts", "chunk_for_budget", "evaluations_per_chain", "start_kind"]


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
        CCDF start time; 0 returns the initial estimate itself (no diffusion step).
    init : str
        CCDF initial estimate: "fbp", "zero-filled", "tv", "tv3d" (isotropic TV over the
        volume's z, y and x), "cg" or "auto".
    sense_every : int
        score-MRI: SENSE gradient step every this many steps.
    eta : float
        DDIM stochasticity.
    start : {"auto", "noise", "ccdf"}
        Start from noise at t = 1 or from the forward-diffused initial estimate at t₀
        (auto: ccdf for ``ccdf`` and ``mbir3d``, noise otherwise).
    lam_tv, rho_tv : float
        mbir3d and dds3d: TV weight (along z) and ADMM penalty, relative to the normalised data
        term ½‖Ax−y‖²/‖A‖².
    lam_tv_xy : float
        mbir3d and dds3d: in-plane TV weight at t₀ (with ``tv_axes`` holding y and x); at time t
        it is ``lam_tv_xy·(σ(t) − σ(ε))/(σ(t₀) − σ(ε))``, going to 0 at the end of the run as the
        prior's estimate sharpens.
    tv_axes : tuple of str
        mbir3d and dds3d: ("z",) (TV along slices only) or ("z", "y", "x") (every axis, the
        volume methods' presets).
    admm_cg_iters : int
        mbir3d and dds3d: CG steps of the ADMM x-update (DiffusionMBIR's fast code: 1).
    dc_iters : int
        dds: conjugate-gradient steps of the data consistency on x̂₀ per step (M).
    dc_gamma : float
        dds: proximal weight γ relative to ‖A‖² (0: plain CG from x̂₀; > 0 for noisy data).
    admm_iters : int
        dds3d: ADMM iterations of the data term + TV on x̂₀ per step.
    admm_keep : bool
        dds3d: keep the ADMM splitting variables and duals across diffusion steps (True) or
        restart them from each x̂₀ (False; see :func:`pieces.admm_tv_consistency`).
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
    lam_tv_xy: float = 0.0
    tv_axes: tuple[str, ...] = ("z",)
    admm_cg_iters: int = 1
    dc_iters: int = 5
    dc_gamma: float = 0.0
    admm_iters: int = 1
    admm_keep: bool = False
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
    # the volume methods (issue 34) start from 3-D TV (the classical volume they must never lose
    # to) at a small t0 and refine it with few network evaluations (6 per slice: t0 0.1 of an
    # N = 60 grid), so that a 64-slice volume with 4 samples takes minutes on 2 cores; their
    # consistency step is TV on every axis (in-plane falling to 0 with σ(t)).  Measured with
    # ct-256 on the central 8 slices of the report volume at 256² (one sample; 3-D TV 42.90 /
    # 45.91 / 35.36 dB at 23 / 60 / 8 views): dds3d 43.85 / 49.11 / 35.59 dB with z-errors at or
    # below 3-D TV's, 43.94 dB with 4 samples at 23 views; the weights matter most: λ 1e-4 with
    # ρ 1e-3 (threshold λ/ρ 0.1) gave 41.9 dB, λ 3e-5 with ρ 1e-2 (0.003) 43.85; one ADMM
    # iteration of 10 CG steps per step beat two of 5 (43.3 vs 41.9), and ADMM variables kept
    # across steps made the slices as coherent as 3-D TV's (z-error 0.0036 vs 0.0048 restarted).
    # Operator-specific values come from the card's tuned settings (benchmarks/tune.py --method).
    # DiffusionMBIR (2000 steps from noise in the paper, ≈8 h per volume on a GPU): the
    # reverse-diffusion predictor, one ADMM iteration on the noisy volume per step, duals kept
    "mbir3d": {"steps": 60, "snr": 0.0, "t0": 0.1, "init": "tv3d", "start": "ccdf", "lam_tv": 3e-5,
               "lam_tv_xy": 3e-5, "rho_tv": 1e-2, "tv_axes": ("z", "y", "x"), "admm_cg_iters": 10},
    # DDS (Chung, Lee & Ye, ICLR 2024): DDIM (η 0.85 as in the paper) whose Tweedie estimate
    # gets M = 5 CG steps of data consistency before re-noising; started, as CCDF, from a TV
    # image forward-diffused to t0.  t0 = 0.2 of an N = 150 grid is 30 network evaluations.
    # Operator-specific values come from the card's tuned settings (benchmarks/tune.py).
    "dds": {"steps": 150, "predictor": "ddim", "eta": 0.85, "snr": 0.0, "t0": 0.2, "init": "tv",
            "start": "ccdf", "dc_iters": 5},
    # DDS for volumes: the 2-D prior slice-wise in chunks; the data consistency on x̂₀ is ADMM on
    # the data term + TV on every axis over the whole volume (CG inner steps)
    "dds3d": {"steps": 60, "predictor": "ddim", "eta": 0.85, "snr": 0.0, "t0": 0.1, "init": "tv3d",
              "start": "ccdf", "lam_tv": 3e-5, "lam_tv_xy": 3e-5, "rho_tv": 1e-2, "tv_axes": ("z", "y", "x"),
              "admm_iters": 1, "admm_cg_iters": 10, "admm_keep": True},
}

#: methods that run one volume per posterior sample (their data consistency couples slices):
#: :data:`medrecon.solvers.cards.VOLUME_METHODS`
#: methods whose data consistency acts on the Tweedie estimate inside the DDIM step
DDS_METHODS = ("dds", "dds3d")

#: memory per slice of a network evaluation, in bytes per pixel (measured for the "S" UNet at
#: 256², about 0.4 GB per image in inference, ENVIRONMENT.md)
NET_BYTES_PER_PIXEL = 6000
#: pixels per network evaluation from which the time per pixel stops falling on the 2-core CPU:
#: ct-256 in bfloat16 took 0.276 / 0.267 / 0.251 / 0.245 / 0.243 / 0.244 CPU-s per 256² image at
#: batch 1 / 2 / 4 / 8 / 16 / 32 (benchmarks/speed.py --batches --clock cpu, AMD EPYC with
#: AVX512-BF16, host shared with other jobs): larger batches only cost memory
NET_FASTEST_PIXELS = 8 * 256 * 256


def chunk_for_budget(max_memory: float, volume: Tensor) -> int:
    """Slices per network evaluation: the fastest batch (:data:`NET_FASTEST_PIXELS`), or fewer
    where ``max_memory`` bytes next to the volume itself do not hold it.

    The volume-sized state (x, noise, measurement, ADMM variables, CG temporaries) is taken as
    12 copies of the volume; the rest is divided by :data:`NET_BYTES_PER_PIXEL` per pixel.  A
    budget smaller than the fixed part still runs, one slice at a time.
    """
    fixed = 12 * volume.numel() * volume.element_size()
    pixels = volume[0].numel()
    fits = int((max_memory - fixed) // (NET_BYTES_PER_PIXEL * pixels))
    return max(1, min(fits, NET_FASTEST_PIXELS // pixels))


DIFFUSION_METHODS = tuple(PRESETS)


def settings_defaults() -> dict[str, Any]:
    """Every :class:`DiffusionSettings` field with its default value."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(DiffusionSettings) if f.name != "extra"}


def start_kind(method: str, start: str) -> str:
    """``"ccdf"`` (from the forward-diffused initial estimate) or ``"noise"``: the ``start``
    setting, or for ``"auto"`` the method's own (ccdf for ``ccdf`` and the volume methods)."""
    return start if start != "auto" else ("ccdf" if method in ("ccdf", *VOLUME_METHODS) else "noise")


def evaluations_per_chain(sde, method: str, settings: dict[str, Any], dtype: torch.dtype = torch.float32) -> int:
    """Network evaluations of one sampler chain (one batch; one volume of a volume method).

    ``settings`` holds the run's :class:`DiffusionSettings` fields: the steps from t₀ (CCDF-style
    start; none for t₀ below the grid) or from t = 1, the Langevin corrector steps, and the final
    Tweedie step (not in DDS, whose last step lands on t = 0).  ``dtype`` is that of the images
    (the grid is in it).  A complex image costs two evaluations: multiply.
    """
    grid = sde.timesteps(int(settings["steps"]), dtype=dtype)
    if start_kind(method, settings["start"]) == "noise":
        run = len(grid)
    else:
        run = int((grid <= float(settings["t0"]) + 1e-9).sum())
    per_step = 1 + (int(settings["corrector_steps"]) if float(settings["snr"]) > 0 else 0)
    return run * per_step + (1 if run and method not in DDS_METHODS else 0)


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
    if not 0 <= s.t0 <= 1:
        raise SettingsError(f"t0 must be in [0, 1], got {s.t0}")
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


#: initial estimates kept while :func:`reuse_starts` is active: key -> (operator, estimate)
_STARTS: dict[tuple[Any, ...], tuple[LinearOperator, Tensor]] | None = None


@contextlib.contextmanager
def reuse_starts() -> Iterator[None]:
    """Inside this block, an initial estimate (TV, 3-D TV, ...) is computed once per operator,
    measurement and kind and reused by every later run: for tuning, which reconstructs the same
    measurements with many settings.  Outside it (the default) every run computes its own, so
    that a run's time includes its start.  Blocks may nest; the outermost one forgets them."""
    global _STARTS
    outer = _STARTS
    if outer is None:
        _STARTS = {}
    try:
        yield
    finally:
        if outer is None:
            _STARTS = None


def initial_estimate(y: Tensor, A: LinearOperator, init: str) -> Tensor:  # noqa: N803
    """The deterministic start of a CCDF-style run, in the prior's normalised space.

    ``"fbp"``, ``"zero-filled"`` (Aᴴy), ``"cg"`` (20 CG steps), ``"tv"`` (the defaults of
    ``reconstruct(method="tv")``: in-plane TV, λ 1e-4, 100 iterations, x ≥ 0 for CT), ``"tv3d"``
    (the same over the volume: ``axes=("z", "y", "x")``) or ``"auto"`` (FBP for CT, CG for
    multi-coil MRI, zero-filled otherwise).  Reused inside :func:`reuse_starts`.
    """
    if init == "auto":
        init = "fbp" if isinstance(A, CTProjector) else ("cg" if isinstance(A, MultiCoilMRI) else "zero-filled")
    key = None
    if _STARTS is not None:
        digest = hashlib.sha1(y.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        key = (id(A), init, tuple(y.shape), str(y.dtype), str(y.device), digest)
        if key in _STARTS:
            return _STARTS[key][1].clone()
    if init == "fbp":
        x = classical.fbp(y, A)
    elif init == "zero-filled":
        x = classical.zero_filled(y, A)
    elif init in ("tv", "tv3d"):
        axes = ("z", "y", "x") if init == "tv3d" else ("y", "x")
        x = classical.tv(y, A, nonneg=isinstance(A, CTProjector), axes=axes)
    elif init == "cg":
        x = classical.cg(y, A, iters=20)
    else:
        raise SettingsError(f"unknown CCDF init {init!r}; known: auto, fbp, zero-filled, tv, tv3d, cg")
    if key is not None:
        _STARTS[key] = (A, x)  # the operator is kept so that its id is not reused meanwhile
        return x.clone()
    return x


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
    start = start_kind(method, s.start)
    # the initial estimate is deterministic: computed once, shared by every sample
    x_init = initial_estimate(y, A, s.init) if start == "ccdf" else None
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


def _tv_weights(s: DiffusionSettings, sde, t_first: Tensor) -> tuple[float, Callable[[Tensor], tuple[float, ...]]]:
    """The TV weight and the axis weights ``W(t)`` of a volume method's consistency step.

    ``lam·W(t)`` is ``lam_tv`` along z and ``lam_tv_xy·r(t)`` along y and x, for the axes in
    ``tv_axes``, with ``r(t) = (σ(t) − σ(ε)) / (σ(t_first) − σ(ε))``: 1 at the first time of the
    run (``t_first``), falling with the noise level to 0 at the grid's last time ε.  ``lam`` is
    the larger of the two weights at the start, so W ≤ 1.
    """
    axes = tuple(s.tv_axes)
    lam = max([s.lam_tv] * ("z" in axes) + [s.lam_tv_xy] * any(a in ("y", "x") for a in axes) + [0.0])
    sig_end = float(sde.std(torch.tensor([float(sde.eps)], dtype=torch.float64)))
    span = float(sde.std(t_first.reshape(1).double())) - sig_end

    def weights(t: Tensor) -> tuple[float, ...]:
        if lam <= 0:
            return tuple(1.0 for _ in axes)
        r = (float(sde.std(t.reshape(-1)[:1].double())) - sig_end) / span if span > 0 else 0.0
        r = min(1.0, max(0.0, r))
        return tuple((s.lam_tv if a == "z" else s.lam_tv_xy * r) / lam for a in axes)

    return lam, weights


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
        if not len(schedule):  # t0 below the grid (t0 = 0): the initial estimate itself
            return x0.clone(), 0, 0
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
        lam, weights = _tv_weights(s, sde, schedule[0])
        x0_step = pieces.admm_tv_consistency(A, yr, lam, s.rho_tv, s.admm_iters, tuple(s.tv_axes), s.admm_cg_iters,
                                             weights, keep_state=bool(s.admm_keep))
    elif method == "dps":
        condition = pieces.dps_guidance(A, yr, score, s.zeta, classical.operator_norm(A, like))
    elif method == "mbir3d":
        lam, weights = _tv_weights(s, sde, schedule[0])
        condition = pieces.admm_tv(A, yr, lam, s.rho_tv, tuple(s.tv_axes), s.admm_cg_iters, weights)
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
