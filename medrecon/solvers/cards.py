"""What a prior's model card says about a solver run: tuned defaults, uncertainty calibration, and
which method is the default for an operator key.

The solvers read these; writing and measuring them (:mod:`medrecon.tuning`) runs whole
reconstructions and so lives above the API.

:func:`medrecon.solvers.presets.tuned_defaults` returns ``card["tuned"][operator_key][method]``, which
:func:`medrecon.solvers.presets.run_diffusion` applies between the preset and the caller's
overrides; :func:`std_scale` returns the factor of ``card["calibration"][operator_key][method]``
that :func:`medrecon.reconstruct` multiplies the posterior spread by; :func:`measured_default`
reads ``card["benchmark"][operator_key]`` (written by ``benchmarks/recon.py --store``) to choose
the default method: the diffusion method where it beat the best classical method there, the
best classical method otherwise.

Operator keys (:func:`operator_key`): ``parallel-23`` (parallel-beam CT, 23 measured views),
``fan-64``, ``mri-1d-8`` (single-coil Cartesian line mask, 8×), ``mri-2d-8`` (2-D mask such as
Poisson disc), ``sense-8`` (multi-coil, 8×).

Entries are per key *and method*: the volume methods (``dds3d``, ``mbir3d``, tuned and calibrated
on volumes) sit beside the 2-D methods of the same key (``tuned["parallel-23"]["dds3d"]`` next to
``tuned["parallel-23"]["dds"]``) and never replace them; a volume method's calibration also
records its TV settings (:func:`spread_settings`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medrecon.operators.base import LinearOperator

__all__ = ["operator_key", "SPREAD_SETTINGS", "VOLUME_METHODS", "VOLUME_SPREAD_SETTINGS", "spread_settings", "same_setting",
           "std_scale", "DefaultChoice", "measured_default", "CLASSICAL_FOR_DEFAULT"]


def operator_key(A: LinearOperator) -> str:  # noqa: N803
    """A short name of the measurement setting: geometry and sampling, not the image size.

    ``parallel-<views>``, ``fan-<views>``, ``mri-1d-<R>`` / ``mri-2d-<R>`` (single coil, line or 2-D
    mask, R = round(pixels / measured)), ``sense-<R>`` (multi-coil); otherwise the operator's name.
    A limited-angle CT scan (views covering part of the period, :meth:`CTProjector.fbp_weights`)
    adds the range it covers in whole degrees, ``parallel-60-la90``: its tuned settings, calibration
    and benchmark are not those of a full scan with as many views.
    """
    from medrecon.operators.ct import FanBeamCT, ParallelBeamCT
    from medrecon.operators.mri import MaskedFourier, MultiCoilMRI

    if isinstance(A, ParallelBeamCT | FanBeamCT):
        kind = "parallel" if isinstance(A, ParallelBeamCT) else "fan"
        key = f"{kind}-{int(np.asarray(A.view_mask).sum())}"
        w = A.fbp_weights()
        return f"{key}-la{round(math.degrees(w.covered_rad))}" if w.scan == "limited" else key
    if isinstance(A, MaskedFourier | MultiCoilMRI):
        m = A.mask.reshape(-1, *A.mask.shape[-2:])[0] != 0
        acc = round(m.numel() / max(1, int(m.sum())))
        if isinstance(A, MultiCoilMRI):
            return f"sense-{acc}"
        lines = bool((m == m[:1]).all())  # every row the same: whole phase-encode lines
        return f"mri-{'1d' if lines else '2d'}-{acc}"
    return A.name


#: settings that change the posterior spread: a stored calibration factor is applied only to a
#: run that uses the values it was measured with
SPREAD_SETTINGS = (
    "steps", "predictor", "snr", "corrector_steps", "lam", "zeta", "t0", "init", "eta", "start", "dc_iters", "dc_gamma",
)
#: the methods that reconstruct a volume as a whole (slices on the batch axis, TV across them)
VOLUME_METHODS = ("mbir3d", "dds3d")
#: and the settings of their TV consistency step
VOLUME_SPREAD_SETTINGS = ("lam_tv", "lam_tv_xy", "rho_tv", "tv_axes", "admm_iters", "admm_cg_iters", "admm_keep")


def spread_settings(method: str) -> tuple[str, ...]:
    """The settings a calibration of ``method`` is measured with (and applied to runs that share them)."""
    return SPREAD_SETTINGS + (VOLUME_SPREAD_SETTINGS if method in VOLUME_METHODS else ())


def same_setting(a: Any, b: Any) -> bool:
    """Equal settings (numbers to a relative 1e-6, a list equal to the tuple it was stored from (JSON
    has no tuples), everything else by ``==``)."""
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_setting(u, v) for u, v in zip(a, b, strict=True))
    return a == b


def tuned_on_other_weights(card: dict[str, Any] | None, entry: dict[str, Any], label: str = "this setting") -> str:
    """Why a stored measurement (a ``tuned`` or ``calibration`` entry) does not hold for the card's
    weights, or ``""`` when it does.

    An entry records the sha256 of the weights it was measured on (``weights_sha256``); it holds
    when that equals the card's ``sha256``.  Entries without the field (cards older than it) hold.
    """
    measured_on, weights = (entry or {}).get("weights_sha256"), (card or {}).get("sha256")
    if measured_on and weights and measured_on != weights:
        what = "calibrated" if "std_scale" in entry else "benchmarked" if "rows" in entry else "tuned"
        fix = {"calibrated": "benchmarks/calibrate.py --store", "benchmarked": "benchmarks/recon.py --store"}.get(
            what, "benchmarks/tune.py --store")
        return (f"not applied: {label} was {what} on other weights (sha256 "
                f"{measured_on[:12]}…, these are {weights[:12]}…); re-run {fix}")
    return ""


def std_scale(
    card: dict[str, Any] | None, A: LinearOperator, method: str, n_samples: int, settings: dict[str, Any],  # noqa: N803
) -> tuple[float, str]:
    """The calibration factor for a run, and a note saying where it came from (or why none).

    A stored factor fitted with ``n_ref`` samples is converted to ``n_samples`` by the ratio of
    Student-t quantiles ``t_{n−1}(q) / t_{n_ref−1}(q)`` with ``q = (1 + level)/2``: if the error
    is Gaussian and the samples scatter by a fixed fraction of it, ``|error| / std`` of ``n``
    samples is that fraction times a t variable with ``n − 1`` degrees of freedom.  The factor is
    applied only when ``settings`` (the run's) agree with the calibrated ones on
    :data:`SPREAD_SETTINGS`, and when it was measured on the card's weights (``weights_sha256``
    equal to the card's ``sha256``, where both are recorded).
    """
    from scipy.stats import t as student_t

    key = operator_key(A)
    entry = (card or {}).get("calibration", {}).get(key, {}).get(method)
    if not entry:
        return 1.0, f"none stored for {key}/{method}"
    if n_samples < 2:
        return 1.0, "one sample: no spread to calibrate"
    stale = tuned_on_other_weights(card, entry, f"{key}/{method}")
    if stale:
        return 1.0, stale
    differ = sorted(k for k, v in entry.get("settings", {}).items() if not same_setting(settings.get(k), v))
    if differ:
        return 1.0, f"not applied: {', '.join(differ)} differ from the calibrated settings of {key}/{method}"
    q = (1 + float(entry["level"])) / 2
    n_ref = int(entry["n_samples"])
    c = float(entry["std_scale"]) * float(student_t.ppf(q, n_samples - 1) / student_t.ppf(q, n_ref - 1))
    return c, f"{key}/{method}: fitted with {n_ref} samples on {entry.get('n_images', '?')} held-out images"


#: the classical methods a default may fall back to (FBP, zero-filled and CG are baselines that
#: the regularised methods beat on every measured row)
CLASSICAL_FOR_DEFAULT = ("tv", "l1-wavelet")
#: the classical default where the card measured nothing of the operator's family
UNMEASURED_CLASSICAL = "tv"


@dataclass(frozen=True)
class DefaultChoice:
    """The default method for one operator key, with the settings and the measurement behind it.

    Attributes
    ----------
    method : str
        The method :func:`medrecon.reconstruct` runs when none is named.
    settings : dict
        Settings measured with it (a classical method's swept weight ``lam``); empty for diffusion
        methods, whose tuned settings the solver reads from the card itself.
    reason : str
        One line that says why: the measured margin, or that the key was never measured.
    measured : bool
        Whether this key's benchmark is on the card (and holds for its weights).
    classical : str
        The best classical method for the key: what the default falls back to when a diffusion
        run flags itself as failing.
    classical_settings : dict
        Its measured settings.
    """

    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    measured: bool = False
    classical: str = UNMEASURED_CLASSICAL
    classical_settings: dict[str, Any] = field(default_factory=dict)


def _family(key: str) -> tuple[str, float]:
    """``("parallel", 23.0)`` from ``"parallel-23"``: the kind of measurement and its count."""
    m = re.fullmatch(r"(.+)-(\d+)", key)
    return (m.group(1), float(m.group(2))) if m else (key, math.nan)


def _best_classical(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """The classical method with the highest mean PSNR over a benchmark entry's rows, and the
    settings it was measured with."""
    scores: dict[str, list[float]] = {}
    for row in rows:
        for m in CLASSICAL_FOR_DEFAULT:
            if m in row.get("psnr", {}):
                scores.setdefault(m, []).append(float(row["psnr"][m]))
    full = [m for m, v in scores.items() if len(v) == len(rows)]
    if not full:
        return None
    best = max(full, key=lambda m: sum(scores[m]) / len(rows))
    settings = {}
    for row in rows:
        settings = dict(row.get("settings", {}).get(best, {})) or settings
    return best, settings


def measured_default(card: dict[str, Any] | None, A: LinearOperator, diffusion: str) -> DefaultChoice:  # noqa: N803
    """The default method for ``A`` with the prior of ``card``, from the card's measured benchmark.

    ``card["benchmark"][operator_key(A)]`` holds rows (one per noise level) of mean PSNR per
    method on held-out images, with the weights' sha256.  ``diffusion`` is the default where it
    beat the best classical method on every row; otherwise the best classical method (highest
    mean PSNR, with the weight it was measured with).  A key with no benchmark for these weights
    gets the best classical method of the nearest measured key of the same kind (``parallel``,
    ``fan``, ``mri-1d``, ``sense``, …), else TV, and the reason says that ``diffusion`` exists but
    is unmeasured there.
    """
    key = operator_key(A)
    table = (card or {}).get("benchmark", {}) or {}
    entry = table.get(key)
    stale = tuned_on_other_weights(card, entry or {}, f"the benchmark of {key}") if entry else ""
    rows = list((entry or {}).get("rows", []))
    if entry and rows and not stale:
        best = _best_classical(rows)
        margins = [float(r["psnr"][diffusion]) - max(float(r["psnr"][m]) for m in CLASSICAL_FOR_DEFAULT
                                                      if m in r["psnr"])
                   for r in rows if diffusion in r.get("psnr", {})]
        if best is not None and len(margins) == len(rows):
            where = f"{len(rows)} measured row(s) of {key} on {entry.get('n_images', '?')} held-out images"
            if min(margins) > 0:
                return DefaultChoice(diffusion, {}, f"{diffusion} is the default for {key}: it beat {best[0]} by "
                                     f"{min(margins):+.2f} dB or more on {where}", True, *best)
            return DefaultChoice(best[0], best[1], f"{best[0]} is the default for {key}: {diffusion} scored "
                                 f"{min(margins):+.2f} dB against the best classical method on {where}", True, *best)
    kind, count = _family(key)
    near = []
    for other, e in table.items():
        k2, c2 = _family(other)
        b = _best_classical(list(e.get("rows", []))) if k2 == kind and not tuned_on_other_weights(card, e) else None
        if b is not None:
            near.append((abs(math.log(max(c2, 1e-9) / max(count, 1e-9))) if count == count else 0.0, other, b))
    why = f"{diffusion} exists for this prior but is unmeasured for {key}" + (f" ({stale})" if stale else "")
    if near:
        _, other, (method, settings) = min(near)
        return DefaultChoice(method, settings, f"{method} is the default for {key}, the best classical method "
                             f"measured at the nearest key {other}; {why}: pass --method {diffusion} to use it",
                             False, method, settings)
    return DefaultChoice(UNMEASURED_CLASSICAL, {}, f"{UNMEASURED_CLASSICAL} is the default for {key}; {why}: "
                         f"pass --method {diffusion} to use it", False)
