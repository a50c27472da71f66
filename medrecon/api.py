"""``medrecon.reconstruct``: one call for every method, in the caller's image units.

``reconstruct(y, A, method=...)`` maps the problem to the normalised space the solvers work in
(CT: ``(HU + 1024) / 4096``; MRI: the measurement divided by the 99.5th percentile of the
zero-filled magnitude), runs the method and maps the result back.  Because ``A`` is linear an
affine normaliser ``x_n = (x − low) / width`` carries through the measurement exactly:
``y_n = (y − A(low·𝟙)) / width``.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from medrecon.errors import SettingsError
from medrecon.operators.base import LinearOperator
from medrecon.operators.ct import CTProjector
from medrecon.solvers import classical
from medrecon.solvers.cards import DefaultChoice, measured_default

__all__ = ["Reconstruction", "reconstruct", "METHODS", "BEST_DIFFUSION", "default_choice", "default_method",
           "prior_card", "problem_scale"]

#: classical methods and their defaults (weights in normalised units, see solvers.classical)
METHODS: dict[str, dict[str, Any]] = {
    "fbp": {},
    "zero-filled": {},
    "cg": {"iters": 30},
    "tv": {"lam": 1e-4, "iters": 100},
    "l1-wavelet": {"lam": 3e-3, "iters": 100},
}


#: the diffusion method with the best measured reconstructions (docs/benchmarks.md, from
#: benchmarks/recon.py): the default wherever a prior for the problem exists
BEST_DIFFUSION = "dds"
#: a diffusion result whose relative data residual exceeds this many times that of the simple
#: initial estimate (FBP / zero-filled), and FAILING_FLOOR, is reported as failing; so is one
#: whose roughness (mean absolute finite difference) exceeds FAILING_ROUGHNESS times the initial
#: estimate's: noise that fits the data (a DPS run with a step outside its range measured 4.5×
#: FBP's roughness at 18 dB; good reconstructions are smoother than sparse-view FBP)
FAILING_RATIO, FAILING_FLOOR, FAILING_ROUGHNESS = 3.0, 0.1, 3.0


def default_choice(operator: LinearOperator, prior: Any = None) -> DefaultChoice:
    """The method :func:`reconstruct` (and ``medrecon reconstruct``) uses for ``operator`` when
    none is named, with the measurement behind the choice
    (:func:`medrecon.solvers.cards.measured_default`).

    The prior's card (``prior``: a name, a card path or a prior object; default the shipped prior
    of the modality) holds a benchmark per operator key: :data:`BEST_DIFFUSION` is the default
    where it beat the best classical method there, that classical method otherwise.  A key with
    no measurement gets the best classical method, and the reason says that the diffusion method
    is unmeasured there.  Without a prior for the modality: TV.
    """
    card, why_none = prior_card(prior, operator)
    if card is None:
        return DefaultChoice("tv", {}, f"tv is the default: {why_none}", False)
    return measured_default(card, operator, BEST_DIFFUSION)


def default_method(operator: LinearOperator, prior: Any = None) -> str:
    """The name of :func:`default_choice`'s method."""
    return default_choice(operator, prior).method


def prior_card(prior: Any, operator: LinearOperator) -> tuple[dict[str, Any] | None, str]:
    """The model card of ``prior`` (name, card path or object; None: the modality's shipped
    prior), or None and why there is none."""
    from pathlib import Path

    from medrecon.priors.registry import read_card, shipped_registry

    if prior is None:
        prior = _default_prior_name(operator)
        if prior not in shipped_registry():
            return None, f"no shipped prior {prior!r} for this modality"
    if isinstance(prior, str | Path):
        reg = shipped_registry()
        if str(prior) in reg:
            return reg.card(str(prior)), ""
        path = Path(prior)
        if path.suffix in (".json", ".safetensors") or path.exists():
            return read_card(path.with_suffix(".json")), ""
        return None, f"unknown prior {prior!r}"
    card = getattr(prior, "card", None)
    return (card, "") if isinstance(card, dict) else (None, "the prior object has no model card")


def _default_prior_name(operator: LinearOperator) -> str:
    return "ct-256" if isinstance(operator, CTProjector) else "mri-256"


@dataclass
class Reconstruction:
    """The result of :func:`reconstruct`.

    Attributes
    ----------
    mean : Tensor, shape (B, C, H, W)
        The reconstruction, in the input's units.
    std : Tensor or None
        Pixel-wise posterior standard deviation (diffusion methods); None for classical ones.
    samples : Tensor or None, shape (n_samples, B, C, H, W)
        Posterior samples (diffusion methods).
    info : dict
        Method, settings, seed, NFE, wall time and the final relative data residual.
    """

    mean: Tensor
    std: Tensor | None = None
    samples: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def problem_scale(y: Tensor, A: LinearOperator) -> tuple[float, float]:  # noqa: N803
    """``(low, width)`` of the affine normaliser for this problem's image units.

    CT projectors: the HU window ``[-1024, 3071]``, i.e. ``(−1024, 4096)``.  Otherwise (MRI):
    ``(0, p99.5 of |Aᴴ y|)``.
    """
    if isinstance(A, CTProjector):
        return -1024.0, 4096.0
    zf = A.adjoint(y).abs().flatten()
    k = max(1, int(0.995 * zf.numel()))
    width = float(zf.kthvalue(k).values) if zf.numel() > 1 else float(zf.max())
    return 0.0, width if width > 0 else 1.0


def _nearest(name: str, known) -> str:
    near = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown method {name!r}{hint} Known: {', '.join(sorted(known))}"


def _load_prior(prior: Any, operator: LinearOperator, device: torch.device) -> Any:
    """A prior object as given, or the shipped prior named (default: by modality)."""
    if prior is None:
        prior = _default_prior_name(operator)
    if isinstance(prior, str):
        from medrecon.priors import ScorePrior

        return ScorePrior.load(prior, device=device)
    return prior


def _diffusion(y, operator, method, prior, n_samples, steps, seed, progress, calibrated, settings):
    from medrecon.solvers.presets import run_diffusion
    from medrecon.solvers.cards import std_scale

    model = _load_prior(prior, operator, y.device)
    low, width = problem_scale(y, operator)
    y_n = _normalise_measurement(y, operator, low, width)
    if steps is not None:
        settings = {**settings, "steps": steps}
    t0 = time.perf_counter()
    samples_n, info = run_diffusion(y_n, operator, model, method, n_samples=n_samples, seed=seed,
                                    progress=progress, **settings)
    wall = time.perf_counter() - t0
    mean_n = samples_n.mean(0)
    samples = samples_n * width + low
    std = samples_n.std(0) * width if n_samples > 1 else torch.zeros_like(mean_n.real)
    if std.is_complex():
        std = std.abs()
    scale, how = (
        std_scale(getattr(model, "card", None), operator, method, n_samples, info["settings"])
        if calibrated else (1.0, "off (calibrated=False)")
    )
    std = std * scale
    residual = _residual(operator, mean_n, y_n)
    warnings = list(info.get("warnings", []))
    x_init = _initial_estimate(y_n, operator)
    initial = _residual(operator, x_init, y_n)
    if residual > max(FAILING_RATIO * initial, FAILING_FLOOR):
        warnings.append(
            f"{method} is failing: its data residual {residual:.3g} is {residual / max(initial, 1e-12):.1f}× that "
            f"of the initial estimate ({initial:.3g}); check the settings (steps, tuned values) or use --method tv"
        )
    rough = _roughness(mean_n) / max(_roughness(x_init), 1e-12)
    if rough > FAILING_ROUGHNESS:
        warnings.append(
            f"{method} is failing: its result is {rough:.1f}× as rough as the initial estimate (noise that fits "
            f"the data); check the settings (steps, tuned values) or use --method tv"
        )
    info.update({
        "failing": len(warnings) > len(info.get("warnings", [])),
        "std_scale": round(scale, 4), "std_calibration": how,
        "method": method, "seed": seed, "wall_time_s": round(wall, 4),
        "prior": getattr(model, "name", type(model).__name__) or type(model).__name__,
        "data_residual": residual, "initial_residual": initial, "roughness_vs_initial": round(rough, 3),
        "warnings": warnings,
        "normaliser": {"low": low, "width": width},
    })
    return Reconstruction(mean=mean_n * width + low, std=std, samples=samples, info=info)


def _normalise_measurement(y: Tensor, operator: LinearOperator, low: float, width: float) -> Tensor:
    if not low:
        return y / width
    channels = y.shape[1] if operator.in_shape[0] is None else operator.in_shape[0]
    ones = torch.ones((y.shape[0], channels, *operator.in_shape[1:]), dtype=y.real.dtype, device=y.device)
    return (y - operator(low * ones)) / width


def _initial_estimate(y_n: Tensor, operator: LinearOperator) -> Tensor:
    """The cheap estimate a diffusion result is checked against: FBP for CT, Aᴴy otherwise (the
    samplers' :func:`~medrecon.solvers.presets.initial_estimate`, reused inside ``reuse_starts``)."""
    from medrecon.solvers.presets import initial_estimate

    x = initial_estimate(y_n, operator, "fbp" if hasattr(operator, "fbp") else "zero-filled")
    return x if operator.in_complex or not x.is_complex() else x.real


def _roughness(x: Tensor) -> float:
    """Mean absolute finite difference along the image axes (of the magnitude for complex images)."""
    a = x.abs() if x.is_complex() else x
    return float((a.diff(dim=-1).abs().mean() + a.diff(dim=-2).abs().mean()) / 2)


def _residual(operator: LinearOperator, x_n: Tensor, y_n: Tensor) -> float:
    return float(torch.linalg.norm(operator(x_n) - y_n) / torch.linalg.norm(y_n).clamp_min(1e-30))


def reconstruct(
    y: Tensor,
    operator: LinearOperator,
    method: str | None = None,
    *,
    prior: Any = None,
    n_samples: int = 4,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
    calibrated: bool = True,
    fallback: bool | None = None,
    **settings: Any,
) -> Reconstruction:
    """Reconstruct an image from measurements ``y = A x``.

    Parameters
    ----------
    y : Tensor
        Measurement, shape ``(B, *operator.out_shape)``: a sinogram in the units of the image
        (e.g. HU · pixel) or k-space.
    operator : LinearOperator
        The forward model ``A``.
    method : str, optional
        Diffusion: ``"dds"``, ``"ccdf"``, ``"song"``, ``"dps"``, ``"score-mri"``, and for volumes
        (slices on the batch axis) ``"dds3d"``, ``"mbir3d"``; classical: ``"fbp"``,
        ``"zero-filled"``, ``"cg"``, ``"tv"``, ``"l1-wavelet"``.  Default
        (:func:`default_choice`): per operator key, from the prior card's measured benchmark —
        :data:`BEST_DIFFUSION` where it beat the best classical method, that classical method
        (at its measured weight) otherwise and where the key was never measured.
        ``info["default"]`` says which and why.
    prior : str or prior object, optional
        Diffusion methods: a shipped prior's name (default ``"ct-256"`` for CT operators,
        ``"mri-256"`` otherwise) or any object with ``sde`` and ``score(x, t)`` in normalised space.
    n_samples : int
        Posterior samples (diffusion), drawn as one batch; ``mean`` is their average and ``std``
        their pixel-wise standard deviation.
    steps : int, optional
        Number of diffusion steps N (default from the method's preset).
    seed : int
        Seed of every random draw (classical methods are deterministic).
    progress : bool
        Show a progress bar (long methods).
    calibrated : bool
        Diffusion: multiply ``std`` by the factor the prior's card stores for this operator and
        method (measured on held-out images, :func:`medrecon.tuning.calibrate`) when the
        run uses the calibrated settings; ``info["std_scale"]`` and ``info["std_calibration"]``
        say which factor was applied and why.  False: the raw spread of the samples.
    fallback : bool, optional
        When a diffusion run flags itself as failing (``info["failing"]``: data residual or
        roughness far above the initial estimate's), return the best classical estimate for the
        key instead, with the reason in ``info["fallback"]`` and the warnings.  Default: True when
        ``method`` is None (the default method), False for a named method, which keeps its
        result with the warning.
    **settings
        Method settings overriding :data:`METHODS` (e.g. ``lam``, ``iters``).

    Returns
    -------
    Reconstruction

    Examples
    --------
    >>> import torch
    >>> from medrecon import reconstruct
    >>> from medrecon.operators import ParallelBeamCT
    >>> A = ParallelBeamCT.sparse_view(32, 8)
    >>> hu = torch.full((1, 1, 32, 32), -1000.0); hu[..., 8:24, 8:24] = 40.0
    >>> rec = reconstruct(A(hu), A, method="tv", iters=20)
    >>> rec.mean.shape
    torch.Size([1, 1, 32, 32])
    """
    from medrecon.solvers.presets import DIFFUSION_METHODS

    choice = None
    if method is None:
        choice = default_choice(operator, prior)
        method, settings = choice.method, {**choice.settings, **settings}
    if fallback is None:
        fallback = choice is not None
    if method in DIFFUSION_METHODS:
        rec = _diffusion(y, operator, method, prior, n_samples, steps, seed, progress, calibrated, settings)
        if fallback and rec.info.get("failing"):
            rec = _fall_back(y, operator, method, rec, choice or default_choice(operator, prior), seed)
    elif method not in METHODS:
        raise SettingsError(_nearest(method, (*METHODS, *DIFFUSION_METHODS)))
    else:
        rec = _classical(y, operator, method, seed, settings, choice)
    if choice is not None:
        rec.info["default"] = {"method": choice.method, "reason": choice.reason, "measured": choice.measured}
    return rec


def _fall_back(y: Tensor, operator: LinearOperator, method: str, failed: Reconstruction,
               choice: DefaultChoice, seed: int) -> Reconstruction:
    """The best classical estimate for the key, returned in place of a diffusion run that flagged
    itself as failing; its warnings and numbers are kept in ``info["fallback"]``."""
    rec = _classical(y, operator, choice.classical, seed, dict(choice.classical_settings), None)
    why = [w for w in failed.info.get("warnings", []) if "is failing" in w]
    rec.info["fallback"] = {
        "from": method, "to": choice.classical, "why": why,
        "data_residual": failed.info.get("data_residual"),
        "roughness_vs_initial": failed.info.get("roughness_vs_initial"),
    }
    rec.info["warnings"] = [
        *failed.info.get("warnings", []),
        f"the default {method} run flagged itself as failing; returned the {choice.classical} estimate instead "
        f"(name --method {method} to keep its result)",
    ]
    return rec


def _classical(y: Tensor, operator: LinearOperator, method: str, seed: int, settings: dict[str, Any],
               choice: DefaultChoice | None) -> Reconstruction:
    import inspect

    func = {"fbp": classical.fbp, "zero-filled": classical.zero_filled, "cg": classical.cg,
            "tv": classical.tv, "l1-wavelet": classical.l1_wavelet}[method]
    accepted = [p for p in inspect.signature(func).parameters if p not in ("y", "A")]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        chosen = f" ({choice.reason})" if choice is not None else ""
        raise SettingsError(
            f"method {method!r}{chosen} does not take {', '.join(unknown)}; it takes: "
            f"{', '.join(accepted) or 'nothing'}"
        )
    opts = {**METHODS[method], **settings}
    low, width = problem_scale(y, operator)
    y_n = _normalise_measurement(y, operator, low, width)
    t0 = time.perf_counter()
    if method == "tv":
        opts.setdefault("nonneg", isinstance(operator, CTProjector))  # attenuation ≥ 0 (HU ≥ −1024)
    x_n = func(y_n, operator, **opts)
    wall = time.perf_counter() - t0
    mean = x_n * width + low
    info = {
        "method": method,
        "settings": {k: v for k, v in opts.items() if isinstance(v, int | float | str | bool)},
        "seed": seed,
        "nfe": 0,
        "warnings": [],
        "wall_time_s": round(wall, 4),
        "data_residual": _residual(operator, x_n, y_n),
        "normaliser": {"low": low, "width": width},
    }
    return Reconstruction(mean=mean, info=info)
