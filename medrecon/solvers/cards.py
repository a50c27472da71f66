"""What a prior's model card says about a solver run: tuned defaults and uncertainty calibration.

The solvers read these; writing and measuring them (:mod:`medrecon.tuning`) runs whole
reconstructions and so lives above the API.

:func:`medrecon.solvers.presets.tuned_defaults` returns ``card["tuned"][operator_key][method]``, which
:func:`medrecon.solvers.presets.run_diffusion` applies between the preset and the caller's
overrides; :func:`std_scale` returns the factor of ``card["calibration"][operator_key][method]``
that :func:`medrecon.reconstruct` multiplies the posterior spread by.

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
from typing import Any

import numpy as np

from medrecon.operators.base import LinearOperator

__all__ = ["operator_key", "SPREAD_SETTINGS", "VOLUME_METHODS", "VOLUME_SPREAD_SETTINGS", "spread_settings", "same_setting", "std_scale"]


def operator_key(A: LinearOperator) -> str:  # noqa: N803
    """A short name of the measurement setting: geometry and sampling, not the image size.

    ``parallel-<views>``, ``fan-<views>``, ``mri-1d-<R>`` / ``mri-2d-<R>`` (single coil, line or 2-D
    mask, R = round(pixels / measured)), ``sense-<R>`` (multi-coil); otherwise the operator's name.
    """
    from medrecon.operators.ct import FanBeamCT, ParallelBeamCT
    from medrecon.operators.mri import MaskedFourier, MultiCoilMRI

    if isinstance(A, ParallelBeamCT | FanBeamCT):
        kind = "parallel" if isinstance(A, ParallelBeamCT) else "fan"
        return f"{kind}-{int(np.asarray(A.view_mask_np).sum())}"
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
        what = "calibrated" if "std_scale" in entry else "tuned"
        fix = "benchmarks/calibrate.py --store" if what == "calibrated" else "benchmarks/tune.py --store"
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
