"""Tune diffusion settings per operator and store them as defaults on a prior's model card.

Song et al. (2022) tuned λ and snr per task by Bayesian optimisation; the samplers are sensitive to
them (ALGORITHMS.md §8).  :func:`tune` runs successive halving over random configurations of a
search space (λ, snr, ζ, t₀, steps, ...) on a few validation images, with PSNR as the objective,
and always keeps the current defaults as a candidate, so its answer is never worse than them on
the tuning images.  :func:`store_tuned_defaults` writes the winner to the card as
``card["tuned"][operator_key][method]``; :func:`medrecon.solvers.presets.run_diffusion` applies it (through
:mod:`medrecon.solvers.cards`)
between the preset and the caller's overrides.  The card's sha256 covers the weights file only,
so editing the card keeps the prior loadable.

:func:`calibrate` measures, on the same kind of held-out images, by how much a method's posterior
spread under- or overstates its error, and :func:`store_calibration` writes the factor to
``card["calibration"][operator_key][method]``; :func:`std_scale` looks it up so that
:func:`medrecon.reconstruct` returns a calibrated uncertainty map (post-hoc recalibration of the
standard deviation, as for regression models in Kuleshov et al., ICML 2018).

Operator keys (:func:`operator_key`): ``parallel-23`` (parallel-beam CT, 23 measured views),
``fan-64``, ``mri-1d-8`` (single-coil Cartesian line mask, 8×), ``mri-2d-8`` (2-D mask such as
Poisson disc), ``sense-8`` (multi-coil, 8×).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medrecon.api import reconstruct
from medrecon.errors import SettingsError
from medrecon.metrics import calibration
from medrecon.operators.base import LinearOperator
from medrecon.priors.registry import read_card, write_card
from medrecon.solvers.cards import operator_key, spread_settings
from medrecon.solvers.presets import PRESETS, evaluations_per_chain, reuse_starts, settings_defaults, tuned_entry

__all__ = [
    "DEFAULT_SPACES",
    "tune",
    "z_error",
    "store_tuned_defaults",
    "store_benchmark",
    "calibrate",
    "store_calibration",
]

DEFAULT_SPACES: dict[str, dict[str, Any]] = {
    "song": {"lam": (0.5, 1.0), "snr": (0.04, 0.4, "log"), "steps": [50, 100, 200]},
    # CCDF: the start (FBP / zero-filled / CG-SENSE vs TV) matters as much as t0: from a TV image
    # a small t0 (σ(t0) of a few per cent) is enough, from FBP streaks it is not
    "ccdf": {
        "init": ["auto", "tv"],
        "lam": (0.5, 1.0),
        "snr": (0.04, 0.4, "log"),
        "t0": (0.08, 0.6),
        "steps": [50, 100, 200],
    },
    "dps": {"zeta": (0.1, 3.0, "log"), "steps": [50, 100, 200]},
    "score-mri": {"snr": (0.04, 0.4, "log"), "steps": [50, 100, 200]},
    # DDS: the start (t0 on a grid of `steps`: t0·steps network evaluations), the DDIM noise η,
    # the CG steps on x̂₀ and the proximal weight (which matters for noisy data)
    "dds": {
        "t0": (0.1, 0.5),
        "steps": [60, 100, 150, 200],
        "eta": (0.5, 1.0),
        "dc_iters": [2, 3, 5, 10],
        "dc_gamma": [0.0, 0.0, 1e-3, 1e-2, 1e-1],
    },
    # the volume methods, from their 3-D TV start: how far to go back (t0, the grid), the TV
    # weights of the consistency step along z and in-plane (at t0, falling to 0 with σ(t)), the
    # ADMM penalty (λ/ρ is the shrinkage threshold: 0.001-0.01 worked, 0.1 did not) and the
    # iteration counts.  The network evaluations per slice are about t0·steps: max_nfe
    # (tune.py --max-nfe) keeps the search within a time budget
    "dds3d": {
        "t0": (0.05, 0.3),
        "steps": [20, 30, 40, 60, 100],
        "eta": (0.5, 1.0),
        "lam_tv": [1e-5, 2e-5, 3e-5, 5e-5, 1e-4],
        "lam_tv_xy": [0.0, 1e-5, 3e-5, 5e-5, 1e-4],
        "rho_tv": (3e-3, 1e-1, "log"),
        "admm_iters": [1, 1, 2],
        "admm_cg_iters": [5, 10, 20],
        "admm_keep": [True, True, False],
    },
    "mbir3d": {
        "t0": (0.05, 0.3),
        "steps": [20, 30, 40, 60, 100],
        "lam_tv": [1e-5, 2e-5, 3e-5, 5e-5, 1e-4],
        "lam_tv_xy": [0.0, 1e-5, 3e-5, 5e-5, 1e-4],
        "rho_tv": (3e-3, 1e-1, "log"),
        "admm_cg_iters": [5, 10, 20],
    },
}


def _draw(space: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            out[name] = spec[int(rng.integers(len(spec)))]
        elif isinstance(spec, tuple) and len(spec) in (2, 3):
            lo, hi = float(spec[0]), float(spec[1])
            if len(spec) == 3 and spec[2] == "log":
                v = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            else:
                v = rng.uniform(lo, hi)
            out[name] = float(f"{v:.3g}")
        else:
            raise SettingsError(
                f"tune: space[{name!r}] must be a list of choices or (low, high[, 'log']); got {spec!r}"
            )
    return out


def _item(images: Tensor, i: int, where: str) -> Tensor:
    """Item ``i`` of the tuning images: an image ``(1, 1, H, W)`` of ``(n, 1, H, W)``, or a
    volume ``(Z, 1, H, W)`` of ``(n, Z, 1, H, W)`` (slices on the batch axis, for the volume
    methods)."""
    if images.ndim not in (4, 5) or images.shape[0] < 1:
        raise SettingsError(
            f"{where}: images must be (n, 1, H, W) images or (n, Z, 1, H, W) volumes with n ≥ 1; got shape "
            f"{tuple(images.shape)}"
        )
    return images[i : i + 1] if images.ndim == 4 else images[i]


def _measure(A: LinearOperator, x: Tensor, noise: Callable[[Tensor, int], Tensor] | None, i: int) -> Tensor:  # noqa: N803
    """``A x`` of image ``i`` (complex for a complex operator), with ``noise(y, i)`` if given."""
    y = A(x.to(torch.complex64 if A.in_complex else x.dtype))
    return noise(y, i) if noise is not None else y


def _psnr(x: Tensor, ref: Tensor, data_range: float) -> float:
    a = x.abs() if x.is_complex() else x
    b = ref.abs() if ref.is_complex() else ref
    mse = float(((a.double() - b.double()) ** 2).mean())
    if not math.isfinite(mse):
        return float("-inf")  # a diverged run ranks last
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def z_error(x: Tensor, ref: Tensor) -> float:
    """Inter-slice error of a volume: ``mean |D_z(x − ref)|`` over ``(…, Z, C, H, W)`` (or a
    ``(Z, C, H, W)``) volume, in its units (issue 34's z-coherence)."""
    d = (x.abs() if x.is_complex() else x).double() - (ref.abs() if ref.is_complex() else ref).double()
    return float((d[..., 1:, :, :, :] - d[..., :-1, :, :, :]).abs().mean()) if d.shape[-4] > 1 else 0.0


def tune(
    prior: Any,
    operator_factory: Callable[[int], LinearOperator],
    images: Tensor,
    space: dict[str, Any] | None = None,
    budget: int = 24,
    seed: int = 0,
    *,
    method: str = "ccdf",
    data_range: float | None = None,
    noise: Callable[[Tensor, int], Tensor] | None = None,
    n_samples: int = 1,
    fixed: dict[str, Any] | None = None,
    eta: int = 3,
    max_nfe: int | None = None,
    z_error_cap: Sequence[float] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Search diffusion settings by successive halving of random configurations; objective PSNR.

    Every configuration is scored by the mean PSNR of the posterior mean over a prefix of the
    images: the first rung uses ``ceil(n / eta²)`` images (at least one), each next rung keeps
    the best ``1/eta`` and uses ``eta`` times more images, up to all of them.  The current
    defaults (preset, then the tuned values already on the prior's card) are always a candidate
    and always reach the last rung, so the result is at least as good as them on ``images``; so
    do the values the card holds from earlier weights of the prior (re-measured on these).
    All runs use the same seed (common random numbers), so differences are due to the settings,
    and the same initial estimate of an image (:func:`~medrecon.solvers.presets.reuse_starts`:
    computed once, so a trial's ``seconds`` leave out the start after the first trial).

    Parameters
    ----------
    prior : ScoreModel
        Prior object (``ScorePrior`` or the analytic ``GaussianPrior``).
    operator_factory : callable ``i -> LinearOperator``
        The operator for image ``i`` (one fixed operator: ``lambda i: A``).
    images : Tensor, shape (n, 1, H, W) or (n, Z, 1, H, W)
        Ground truth in the caller's units (what :func:`medrecon.reconstruct` takes: HU for CT):
        images, or volumes of Z slices for the volume methods (the PSNR of a volume is over all
        its voxels).
    space : dict, optional
        ``{setting: [choices] | (low, high) | (low, high, "log")}``; default
        :data:`DEFAULT_SPACES` of ``method``.
    budget : int
        Reconstructions (configuration × image) to spend, approximately.
    seed : int
        Seeds the configuration draws and every reconstruction.
    method : str
        Diffusion method to tune.
    data_range : float, optional
        PSNR peak; default ``max − min`` of ``images``.
    noise : callable ``(y, i) -> y``, optional
        Adds measurement noise to image ``i``'s measurement (seed it with ``i``).
    n_samples : int
        Posterior samples per reconstruction (the objective uses their mean).
    fixed : dict, optional
        Settings held fixed for every candidate, the defaults included (e.g. ``{"steps": 50}``
        to tune λ and snr at a step count the machine can afford).
    eta : int
        Halving rate.
    max_nfe : int, optional
        Draw only configurations whose sampler chain takes at most this many network evaluations
        (:func:`~medrecon.solvers.presets.evaluations_per_chain`: per image, or per slice of a
        volume, and per sample), to tune within a time budget.  The defaults are a candidate
        whatever they cost.
    z_error_cap : sequence of float, optional
        Volumes only: per volume, the largest inter-slice error ``mean |D_z(x − x_true)|`` (in
        the units of ``images``) a configuration may leave, e.g. that of its 3-D TV start.  A
        configuration above the cap on any volume it was run on is infeasible: it ranks below
        every feasible one (its PSNR is kept in ``trials`` with ``z_error`` and ``feasible``),
        so the winner is the best PSNR among those as z-coherent as the cap, where one is.
    log : callable, optional
        Progress messages.

    Returns
    -------
    dict
        ``method``, ``operator_key``, ``best`` (settings, the fixed ones included), ``best_psnr``,
        ``defaults`` (the settings it started from, with the fixed ones), ``defaults_psnr``, ``fixed``, ``n_images``, ``trials`` (settings, PSNR,
        images used, seconds, NFE per reconstruction), ``runs`` (reconstructions spent), ``seconds``.

    Examples
    --------
    >>> import torch
    >>> from medrecon.operators import ParallelBeamCT
    >>> from medrecon.priors.sde import VESDE
    >>> from medrecon.solvers.analytic import GaussianPrior, periodic_rbf_covariance
    >>> prior = GaussianPrior(0.3 * torch.ones(8, 8, dtype=torch.float64), periodic_rbf_covariance(8), VESDE(0.01, 5.0))
    >>> A = ParallelBeamCT.sparse_view(8, 4)
    >>> hu = prior.sample(2, torch.Generator().manual_seed(0)).float() * 4096 - 1024
    >>> res = tune(prior, lambda i: A, hu, {"lam": (0.5, 1.0)}, budget=4, method="song")  # doctest: +SKIP
    """
    if method not in PRESETS:
        raise SettingsError(
            f"tune: unknown diffusion method {method!r}; known: {', '.join(PRESETS)}"
        )
    if space is None and method not in DEFAULT_SPACES:
        raise SettingsError(
            f"tune: no default search space for {method!r} (defaults exist for {', '.join(DEFAULT_SPACES)}); pass space="
        )
    space = dict(DEFAULT_SPACES[method] if space is None else space)
    for k in fixed or {}:
        space.pop(k, None)
    _item(images, 0, "tune")
    if budget < 1 or eta < 2:
        raise SettingsError(f"tune: budget must be ≥ 1 and eta ≥ 2; got {budget}, {eta}")
    say = log or (lambda _msg: None)
    n = images.shape[0]
    peak = (
        float(data_range) if data_range is not None else float(images.max() - images.min()) or 1.0
    )
    if z_error_cap is not None and (images.ndim != 5 or len(z_error_cap) != n):
        raise SettingsError(
            f"tune: z_error_cap needs volumes (n, Z, 1, H, W) and one cap per volume; got images "
            f"{tuple(images.shape)} and {None if z_error_cap is None else len(z_error_cap)} caps"
        )
    ops = [operator_factory(i) for i in range(n)]
    key = operator_key(ops[0])
    card = getattr(prior, "card", None)
    tuned, stale = tuned_entry(card, ops[0], method)
    defaults = {**PRESETS[method], **({} if stale else tuned)}
    start = {k: defaults.get(k, _preset_field(k)) for k in space}
    truth = [_item(images, i, "tune") for i in range(n)]
    meas = [_measure(ops[i], truth[i], noise, i) for i in range(n)]

    # successive halving schedule: rung sizes in images and surviving configurations
    rungs: list[int] = []
    m = n
    while True:
        rungs.insert(0, m)
        if m == 1:
            break
        m = max(1, math.ceil(m / eta))
    rungs = rungs[-3:] if len(rungs) > 3 else rungs

    # choose the number of configurations so that the total runs fit the budget
    def cost(k: int) -> int:
        total, alive = 0, k
        for r in rungs:
            total += alive * r
            alive = max(1, math.ceil(alive / eta))
        return total

    n_conf = 1
    while cost(n_conf + 1) <= budget and n_conf < 10_000:
        n_conf += 1
    rng = np.random.default_rng(seed)
    held = dict(fixed or {})
    start = {**held, **start}
    # values tuned on earlier weights of this prior (the card keeps them, not applied: see
    # solvers.cards.tuned_on_other_weights) are re-measured as a candidate that, like the
    # defaults, always reaches the last rung
    earlier = {**held, **{k: tuned.get(k, start[k]) for k in space}} if stale else None
    seeded = [start] + ([earlier] if earlier and earlier != start else [])
    def affordable(config: dict[str, Any]) -> bool:
        if max_nfe is None:
            return True
        full = {**settings_defaults(), **defaults, **config}
        return evaluations_per_chain(prior.sde, method, full) <= max_nfe

    draws: list[dict[str, Any]] = []
    for _ in range(100 * max(1, n_conf)):  # redraw what does not fit max_nfe
        if len(draws) >= max(0, n_conf - len(seeded)):
            break
        c = {**held, **_draw(space, rng)}
        if affordable(c):
            draws.append(c)
    configs = seeded + [c for c in draws if c not in seeded]  # a draw equal to a seeded one is not run twice
    scores: dict[int, dict[int, float]] = {c: {} for c in range(len(configs))}
    z_errors: dict[int, dict[int, float]] = {c: {} for c in range(len(configs))}
    trials: dict[int, dict[str, Any]] = {}
    runs = 0
    t_all = time.perf_counter()

    def evaluate(c: int, upto: int) -> float:
        nonlocal runs
        for i in range(upto):
            if i in scores[c]:
                continue
            t0 = time.perf_counter()
            rec = reconstruct(
                meas[i], ops[i], method, prior=prior, n_samples=n_samples, seed=seed, **configs[c]
            )
            scores[c][i] = _psnr(rec.mean, truth[i], peak)
            if z_error_cap is not None:
                z_errors[c][i] = z_error(rec.mean, truth[i])
            runs += 1
            tr = trials.setdefault(
                c, {"settings": configs[c], "seconds": 0.0, "nfe": rec.info.get("nfe", 0)}
            )
            tr["seconds"] += time.perf_counter() - t0
        v = float(np.mean([scores[c][i] for i in range(upto)]))
        trials[c].update({"psnr": round(v, 3), "n_images": upto})
        if z_error_cap is not None:
            zs = [z_errors[c][i] for i in range(upto)]
            trials[c].update({"z_error": round(float(np.mean(zs)), 6),
                              "feasible": all(z <= float(z_error_cap[i]) for i, z in enumerate(zs))})
        return v

    def rank(c: int, v: float) -> tuple[bool, float]:  # feasible first, then PSNR
        return (bool(trials[c].get("feasible", True)), v)

    alive = list(range(len(configs)))
    # the initial estimates (TV, 3-D TV) are deterministic: computed once per image for all configurations
    with reuse_starts():
        for r, upto in enumerate(rungs):
            vals = {c: evaluate(c, upto) for c in alive}
            say(
                f"tune {method} {key}: rung {r} ({upto} image(s)), {len(alive)} configs, best "
                f"{max(vals.values()):.2f} dB"
            )
            if r == len(rungs) - 1:
                break
            keep = max(1, math.ceil(len(alive) / eta))
            alive = sorted(alive, key=lambda c: rank(c, vals[c]), reverse=True)[:keep]
            alive += [c for c in range(len(seeded)) if c not in alive]  # the seeded ones reach the last rung
    final = {c: trials[c]["psnr"] for c in alive}
    # ties go to the cheaper configuration (fewer network evaluations)
    best = max(alive, key=lambda c: (*rank(c, final[c]), -trials[c]["nfe"]))
    for t in trials.values():
        t["seconds"] = round(t["seconds"] / max(1, t["n_images"]), 3)
    return {
        "method": method,
        "operator_key": key,
        "best": dict(configs[best]),
        "best_psnr": final[best],
        "defaults": dict(start),
        "defaults_psnr": final[0],
        "fixed": dict(fixed or {}),
        "n_images": n,
        "best_feasible": trials[best].get("feasible"),
        "z_error_cap": None if z_error_cap is None else [float(v) for v in z_error_cap],
        "trials": sorted(trials.values(), key=lambda t: (-t["n_images"], not t.get("feasible", True), -t["psnr"])),
        "runs": runs,
        "seconds": round(time.perf_counter() - t_all, 1),
    }


def _preset_field(name: str) -> Any:
    fields = settings_defaults()
    if name not in fields:
        raise SettingsError(
            f"tune: {name!r} is not a diffusion setting; known: {', '.join(sorted(fields))}"
        )
    return fields[name]


def store_tuned_defaults(
    card_path: str | Path,
    operator_key: str,
    settings: dict[str, dict[str, Any]],  # noqa: F811
) -> dict[str, Any]:
    """Write ``card["tuned"][operator_key][method] = {...}`` into a model card, atomically.

    Entries of other operators and methods are kept; a method's entry is replaced, with the
    sha256 of the weights it was tuned on (``weights_sha256``: a re-export of the prior with new
    weights does not silently reuse it).  Only the card (JSON) changes: its ``sha256`` covers the
    weights file, so the prior still loads.

    Parameters
    ----------
    card_path : path
        The prior's ``NAME.json``.
    operator_key : str
        From :func:`operator_key` (e.g. ``"parallel-23"``).
    settings : dict
        ``{method: {setting: value}}``, e.g. ``{"ccdf": {"lam": 0.9, "snr": 0.12, "t0": 0.3}}``;
        keys must be :class:`~medrecon.solvers.presets.DiffusionSettings` fields.

    Returns
    -------
    dict
        The card as written.
    """
    path = Path(card_path)
    card = read_card(path)
    names = set(settings_defaults())
    for method, values in settings.items():
        if method not in PRESETS or not isinstance(values, dict):
            raise SettingsError(
                f"store_tuned_defaults: settings must be {{method: {{setting: value}}}} with a method in "
                f"{', '.join(PRESETS)}; got {method!r}: {values!r}"
            )
        bad = sorted(set(values) - names)
        if bad:
            raise SettingsError(
                f"store_tuned_defaults: {', '.join(bad)} are not diffusion settings"
            )
    entry = card.setdefault("tuned", {}).setdefault(operator_key, {})
    for method, values in settings.items():
        entry[method] = {k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()}
        if card.get("sha256"):  # tuned values hold for the weights they were measured on
            entry[method]["weights_sha256"] = card["sha256"]
    write_card(path, card)
    return card


def store_benchmark(
    card_path: str | Path,
    operator_key: str,
    rows: list[dict[str, Any]],
    *,
    images: str,
    n_images: int,
    command: str = "",
) -> dict[str, Any]:
    """Write a measured benchmark into ``card["benchmark"][operator_key]``, atomically.

    :func:`medrecon.api.default_choice` reads it to pick the default method for the key.  Each
    row is one measurement setting of the key (e.g. noiseless and noisy):
    ``{"config": name, "noise_rel": float, "psnr": {method: mean dB}, "settings": {method:
    {...}}}``.  Rows of other configs already stored for these weights are kept; a row of the
    same config is replaced; rows measured on other weights are dropped.

    Parameters
    ----------
    card_path : path
        The prior's ``NAME.json``.
    operator_key : str
        From :func:`operator_key`.
    rows : list of dict
        As above; ``psnr`` must name at least one classical method (tv, l1-wavelet).
    images : str
        Which held-out images were measured (e.g. ``"ct/val.npz rows 2, 13, 27"``).
    n_images : int
    command : str
        The command that measured them.
    """
    from medrecon.solvers.cards import CLASSICAL_FOR_DEFAULT

    for row in rows:
        if not isinstance(row.get("psnr"), dict) or not set(row["psnr"]) & set(CLASSICAL_FOR_DEFAULT):
            raise SettingsError(f"store_benchmark: each row needs psnr of one of {', '.join(CLASSICAL_FOR_DEFAULT)}; "
                                f"got {row!r}")
    path = Path(card_path)
    card = read_card(path)
    table = card.setdefault("benchmark", {})
    old = table.get(operator_key, {})
    keep = [] if old.get("weights_sha256") != card.get("sha256") else [
        r for r in old.get("rows", []) if r.get("config") not in {n.get("config") for n in rows}]
    table[operator_key] = {
        "weights_sha256": card.get("sha256"),
        "images": images,
        "n_images": int(n_images),
        "measured": time.strftime("%Y-%m-%d"),
        "command": command,
        "rows": [*keep, *({**r, "psnr": {m: round(float(v), 3) for m, v in r["psnr"].items()}} for r in rows)],
    }
    write_card(path, card)
    return card


# ----------------------------------------------------------------------------- calibration
def calibrate(
    prior: Any,
    operator_factory: Callable[[int], LinearOperator],
    images: Tensor,
    *,
    method: str = "ccdf",
    n_samples: int = 4,
    settings: dict[str, Any] | None = None,
    noise: Callable[[Tensor, int], Tensor] | None = None,
    level: float = 0.95,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the factor ``c`` for which ``|error| ≤ 2·c·std`` holds on ``level`` of the pixels.

    Reconstructs every image with ``n_samples`` posterior samples (the card's tuned defaults,
    then ``settings``; no calibration applied), pools the pixel ratios ``|mean − truth| / std``
    (magnitudes for complex images; a zero std with a zero error counts as 0) over the images
    and returns ``c = quantile(ratio, level) / 2``.  ``c > 1``: the samples scatter less than
    the error (a CCDF run started close to its initial estimate does); ``c < 1``: more.  Pass
    measurements with and without noise (``noise`` decides per image index) to cover both.

    Parameters
    ----------
    prior, operator_factory, images, noise, seed, log
        As for :func:`tune` (images or volumes in the caller's units).
    method : str
    n_samples : int
        Posterior samples per reconstruction (≥ 2); :func:`std_scale` converts the factor to
        other sample counts.
    settings : dict, optional
        Overrides of the method's settings.
    level : float
        Target share of pixels inside ±2·c·std, in (0, 1).

    Returns
    -------
    dict
        ``std_scale`` (c), ``level``, ``n_samples``, ``n_images``, ``settings`` (the run's values
        of :func:`~medrecon.solvers.cards.spread_settings`), ``coverage_raw`` / ``coverage_calibrated`` (share of pixels
        inside ±2·std and ±2·c·std on these images), ``spearman_raw`` (mean over images) and
        ``seconds``.
    """
    if n_samples < 2:
        raise SettingsError(f"calibrate: n_samples must be ≥ 2 to have a spread; got {n_samples}")
    if not 0 < level < 1:
        raise SettingsError(f"calibrate: level must be in (0, 1); got {level}")
    _item(images, 0, "calibrate")
    say = log or (lambda _msg: None)
    t_all = time.perf_counter()
    ratios, rhos, used, key = [], [], {}, ""
    for i in range(images.shape[0]):
        A = operator_factory(i)  # noqa: N806
        key = operator_key(A)
        xi = _item(images, i, "calibrate")
        y = _measure(A, xi, noise, i)
        rec = reconstruct(
            y, A, method, prior=prior, n_samples=n_samples, seed=seed, calibrated=False, **(settings or {})
        )
        mean = rec.mean.abs() if rec.mean.is_complex() else rec.mean
        ref = xi.abs() if xi.is_complex() else xi
        err = (mean.double() - ref.double()).abs().flatten()
        std = rec.std.double().flatten()
        r = torch.where(std > 0, err / std.clamp_min(1e-300), torch.where(err > 0, math.inf, 0.0))
        ratios.append(r)
        rhos.append(calibration(mean, rec.std, ref)["spearman"])
        used = {k: rec.info["settings"][k] for k in spread_settings(method) if k in rec.info["settings"]}
        say(f"calibrate {method} {key}: image {i}: coverage ±2·std {float((r <= 2).double().mean()):.3f}")
    r = torch.cat(ratios)
    # the smallest factor with ≥ level of the pixels inside (an infinite ratio is never inside)
    c = float(torch.sort(r).values[max(0, math.ceil(level * r.numel()) - 1)] / 2)
    c = math.ceil(c * 1e4) / 1e4 if math.isfinite(c) else c  # rounded up: coverage stays ≥ level
    if not math.isfinite(c) or c <= 0:
        raise SettingsError(
            f"calibrate: no usable spread for {method} on {key} (factor {c}); the samples do not differ"
        )
    return {
        "method": method,
        "operator_key": key,
        "std_scale": c,
        "level": level,
        "n_samples": n_samples,
        "n_images": int(images.shape[0]),
        "n_slices": int(images.shape[1]) if images.ndim == 5 else 1,
        "settings": used,
        "coverage_raw": round(float((r <= 2).double().mean()), 4),
        "coverage_calibrated": round(float((r <= 2 * c).double().mean()), 4),
        "spearman_raw": round(float(np.nanmean(rhos)), 4),
        "seconds": round(time.perf_counter() - t_all, 1),
    }


def store_calibration(card_path: str | Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write a :func:`calibrate` result to ``card["calibration"][operator_key][method]``, atomically
    (other entries are kept), with the sha256 of the weights it was measured on (so that a
    re-export of the prior with new weights does not silently reuse it).  Returns the card as
    written."""
    path = Path(card_path)
    card = read_card(path)
    need = ("method", "operator_key", "std_scale", "level", "n_samples", "settings")
    missing = [k for k in need if k not in result]
    if missing:
        raise SettingsError(f"store_calibration: the result lacks {', '.join(missing)} (use calibrate())")
    entry = {k: v for k, v in result.items() if k not in ("method", "operator_key")}
    if card.get("sha256"):  # a factor holds for the weights it was measured on
        entry["weights_sha256"] = card["sha256"]
    card.setdefault("calibration", {}).setdefault(result["operator_key"], {})[result["method"]] = entry
    write_card(path, card)
    return card


