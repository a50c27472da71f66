"""Benchmark reconstruction quality: classical baselines vs the diffusion methods, CT and MRI.

On the validation data under ``$MEDRECON_DATA`` (default ``<repo>/../shared/data``), at 256²:

* CT (``ct/val.npz``, HU): parallel beam with 10, 23 and 60 views, noiseless and with 0.5 %
  Gaussian sinogram noise.  **Noise definition**: per slice, std = 0.005 × RMS of the noiseless
  sinogram of the normalised image ``(HU + 1024) / 4096`` (i.e. ``0.005 · 4096 · RMS`` in the
  HU·pixel units the operator maps HU images to).
* MRI (``mri/val.npz``, magnitude in [0, 1]): single-coil 4× and 8× equispaced (centre 8 %), 8×
  Poisson disc, and 8 simulated birdcage coils (SENSE, 8× equispaced), noiseless.

Methods: FBP / zero-filled, TV (ADMM), L1-wavelet (MRI), CG-SENSE (multi-coil), and the diffusion
methods Song, DPS, CCDF when a prior is available (``--prior-ct``, ``--prior-mri``: registry name
or card path; otherwise the rows say why they were skipped).  Diffusion settings: the preset,
overridden by the prior card's tuned defaults for the operator (``medrecon.tuning``),
then by ``--steps``.

Metrics, per slice then mean ± std over slices: PSNR and SSIM with data range 1 on the
normalised image (CT ``(HU + 1024) / 4096``, MRI magnitude), reconstructions clipped to [0, 1];
for CT also PSNR and SSIM inside the soft-tissue window W400/L40 (``metrics.SOFT_TISSUE_HU``);
seconds per slice (wall time of a batched call / slices); NFE (network evaluations of one
call); for diffusion methods the calibration of the pixel-wise std over ``--samples`` posterior
samples (share of pixels with ``|error| ≤ 2·std``, Spearman correlation of std with ``|error|``,
over all pixels, averaged over slices).

TV and L1-wavelet weights are tuned by a small log-grid sweep (PSNR) on *separate* slices — CT
rows 7 and 24, MRI the middle slices of the first two subjects — never on the reported slices;
one sweep per family (CT noiseless and CT noisy at 23 views, single-coil MRI at 8× equispaced,
SENSE at 8×) since the weights are relative to the operator norm.  Sweep results are cached in
``$MEDRECON_CACHE/bench/recon_sweep.json`` (default ``~/.cache/medrecon``).

All slices of a setting go through ``medrecon.reconstruct`` as one batch.  MRI slices are first
scaled to their own normaliser (``api.problem_scale`` per slice) so a batch gives the per-slice
scaling of a single call.  Prints a table, the targets of issue 5 (relative to the baselines in
the same run) and one JSON line.  ``--quick``: 3 slices per modality.  CPU note: on a quiet
2-core machine expect minutes for the classical rows; diffusion rows need a GPU (``--device
cuda``) or few ``--steps``.  ``LD_PRELOAD`` of tcmalloc speeds up the network (ENVIRONMENT.md).

    python benchmarks/recon.py --quick
    python benchmarks/recon.py --configs ct-23 --methods fbp,tv,ccdf --prior-ct path/to/ct-256.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon import reconstruct
from medrecon.api import problem_scale
from medrecon.metrics import SOFT_TISSUE_HU, calibration, psnr, ssim, window
from medrecon.operators import MaskedFourier, MultiCoilMRI, ParallelBeamCT, mri_mask

REPO = Path(__file__).resolve().parents[1]
CLASSICAL = ("fbp", "zero-filled", "cg", "tv", "l1-wavelet")
DIFFUSION = ("song", "dps", "ccdf", "dds")
ALL_METHODS = ("fbp", "zero-filled", "cg", "tv", "l1-wavelet", "song", "dps", "ccdf", "dds")
NOISE_REL = 0.005
HU_LOW, HU_WIDTH = -1024.0, 4096.0
# slices used only to tune the TV / L1 weights (never reported)
CT_TUNE_ROWS = (7, 24)
CT_QUICK_ROWS = (2, 13, 27)
MRI_TUNE_SUBJECTS = 2
SWEEP_START = {"tv": 1e-4, "l1-wavelet": 3e-3}
SWEEP_MAX_EVALS = 6


@dataclass(frozen=True)
class Config:
    """One measurement setting."""

    name: str
    modality: str  # "ct" or "mri"
    family: str  # the TV/L1 weight sweep this setting uses
    build: Callable[[int], Any]  # image size -> operator
    noise: float = 0.0
    methods: tuple[str, ...] = ()


def _ct(n_views: int) -> Callable[[int], Any]:
    return lambda size: ParallelBeamCT.sparse_view(size, n_views)


def _mri(kind: str, acc: int) -> Callable[[int], Any]:
    return lambda size: MaskedFourier(mri_mask(kind, (size, size), acc, 0.08, seed=0))


def _sense(n_coils: int, acc: int) -> Callable[[int], Any]:
    def build(size: int):
        from medrecon.datasets.simulate import birdcage_coil_maps

        maps = torch.from_numpy(birdcage_coil_maps(n_coils, (size, size)))
        return MultiCoilMRI(maps, mri_mask("equispaced", (size, size), acc, 0.08, seed=0))

    return build


CT_METHODS = ("fbp", "tv", *DIFFUSION)
MRI_METHODS = ("zero-filled", "tv", "l1-wavelet", *DIFFUSION)
CONFIGS = [
    *[Config(f"ct-{v}v", "ct", "ct-noiseless", _ct(v), 0.0, CT_METHODS) for v in (10, 23, 60)],
    *[
        Config(f"ct-{v}v-noisy", "ct", "ct-noisy", _ct(v), NOISE_REL, CT_METHODS)
        for v in (10, 23, 60)
    ],
    Config("mri-4x-equispaced", "mri", "mri", _mri("equispaced", 4), 0.0, MRI_METHODS),
    Config("mri-8x-equispaced", "mri", "mri", _mri("equispaced", 8), 0.0, MRI_METHODS),
    Config("mri-8x-poisson", "mri", "mri", _mri("poisson", 8), 0.0, MRI_METHODS),
    Config(
        "sense8-8x-equispaced",
        "mri",
        "sense",
        _sense(8, 8),
        0.0,
        ("zero-filled", "cg", "tv", "l1-wavelet", *DIFFUSION),
    ),
]
#: views over the arc of a limited-angle setting ``ct-la<arc>`` (operator key ``parallel-60-la<arc>``)
LIMITED_VIEWS = 60


def limited_angle_config(arc_deg: float, n_views: int = LIMITED_VIEWS) -> Config:
    """``ct-la<arc>``: ``n_views`` equally spaced parallel views over ``[0, arc)`` of the half
    circle, noiseless.  Not in :data:`CONFIGS` (not a row of this benchmark's table); named by
    :func:`select_configs`, so ``tune.py``, ``calibrate.py`` and ``uncertainty.py`` take it."""
    n_full = round(n_views * 180 / arc_deg)

    def build(size: int) -> ParallelBeamCT:
        return ParallelBeamCT.limited_angle(size, math.radians(arc_deg), n_full=n_full)

    return Config(f"ct-la{arc_deg:g}", "ct", f"ct-la{arc_deg:g}", build, 0.0, ("fbp", "tv", *DIFFUSION))


# the setting each family's weights are swept on
SWEEP_CONFIG = {
    "ct-noiseless": "ct-23v",
    "ct-noisy": "ct-23v-noisy",
    "mri": "mri-8x-equispaced",
    "sense": "sense8-8x-equispaced",
}


# ------------------------------------------------------------------------------------ data
def data_root() -> Path:
    """``$MEDRECON_DATA``, default ``<repo>/../shared/data``."""
    return Path(os.environ.get("MEDRECON_DATA", REPO.parent / "shared" / "data"))


def cache_dir() -> Path:
    """``$MEDRECON_CACHE/bench`` (default ``~/.cache/medrecon/bench``)."""
    base = os.environ.get("MEDRECON_CACHE", Path.home() / ".cache" / "medrecon")
    return Path(base) / "bench"


def mri_rows(
    subject_id: np.ndarray, slice_index: np.ndarray, quick: bool
) -> tuple[list[int], list[int]]:
    """(report rows, tuning rows): the middle slice of the first subjects tunes; the others report.

    Full: the middle slice and the slices 3 positions either side, per remaining subject;
    quick: the middle slice of three of them.
    """
    subjects = sorted(set(subject_id.tolist()))
    middle = {}
    for s in subjects:
        rows = np.flatnonzero(subject_id == s)
        rows = rows[np.argsort(slice_index[rows])]
        middle[s] = (rows, len(rows) // 2)
    tune = [int(middle[s][0][middle[s][1]]) for s in subjects[:MRI_TUNE_SUBJECTS]]
    report: list[int] = []
    rest = subjects[MRI_TUNE_SUBJECTS:]
    if quick:
        for s in rest[:: max(1, len(rest) // 3)][:3]:
            rows, m = middle[s]
            report.append(int(rows[m]))
    else:
        for s in rest:
            rows, m = middle[s]
            report += [int(rows[i]) for i in (m - 3, m, m + 3) if 0 <= i < len(rows)]
    return report, tune


#: ``--mri-data``: report slices taken from a volume, every this many of its slices with the
#: most foreground, at most this many
MRI_DATA_EVERY, MRI_DATA_SLICES = 6, 6


def load_data(root: Path, quick: bool, crop: int | None, mri_data: str | None = None) -> dict[str, dict[str, Any]]:
    """Ground truth per modality: ``images`` (N, 1, S, S) float32 in caller units, row ids.

    ``mri_data`` (a NIfTI file or DICOM series folder, e.g. the held-out T1 volume IXI012):
    the MRI report rows become slices of that volume, resliced and normalised as the training
    volumes are (:func:`medrecon.training.data.volume_training_slices`); the TV/L1 sweep still
    tunes on the FLAIR tuning rows, so every method is tuned on FLAIR and reported on the volume.
    """
    out: dict[str, dict[str, Any]] = {}
    ct_path, mri_path = root / "ct" / "val.npz", root / "mri" / "val.npz"
    if ct_path.is_file():
        hu = np.load(ct_path)["images"].astype(np.float32)
        tune = list(CT_TUNE_ROWS)
        report = list(CT_QUICK_ROWS) if quick else [i for i in range(len(hu)) if i not in tune]
        out["ct"] = {"images": hu, "report": report, "tune": tune}
    if mri_path.is_file():
        d = np.load(mri_path)
        img = d["images"].astype(np.float32) / 65535.0
        report, tune = mri_rows(d["subject_id"], d["slice_index"], quick)
        if mri_data:
            from medrecon.training.data import volume_training_slices

            src = Path(mri_data) if Path(mri_data).exists() else root / mri_data
            vol = volume_training_slices(src, "mri")
            fg = (vol > 0.05).mean(axis=(1, 2))
            best = np.sort(np.argsort(fg)[::-1][: MRI_DATA_EVERY * MRI_DATA_SLICES])  # the brain's bulk
            picked = best[:: MRI_DATA_EVERY][: 3 if quick else MRI_DATA_SLICES]
            report = list(range(len(img), len(img) + len(picked)))
            img = np.concatenate([img, vol[picked]])
        out["mri"] = {"images": img, "report": report, "tune": tune}
    for v in out.values():
        if crop:
            h, w = v["images"].shape[-2:]
            t, left = (h - crop) // 2, (w - crop) // 2
            v["images"] = v["images"][:, t : t + crop, left : left + crop]
        v["size"] = int(v["images"].shape[-1])
    return out


def ground_truth(data: dict[str, Any], rows: list[int]) -> torch.Tensor:
    """(B, 1, S, S) float32 in caller units (HU or magnitude)."""
    return torch.from_numpy(np.ascontiguousarray(data["images"][rows]))[:, None]


def measure(cfg: Config, A: Any, x: torch.Tensor, seed: int) -> torch.Tensor:  # noqa: N803
    """``y = A x`` (+ the CT noise of the module docstring, seeded)."""
    if cfg.modality == "mri":
        return A(x.to(torch.complex64))
    y = A(x)
    if cfg.noise:
        clean_n = A((x - HU_LOW) / HU_WIDTH)
        rms = clean_n.reshape(clean_n.shape[0], -1).pow(2).mean(1).sqrt().reshape(-1, 1, 1, 1)
        g = torch.Generator().manual_seed(seed)
        y = y + HU_WIDTH * cfg.noise * rms * torch.randn(y.shape, generator=g, dtype=y.dtype)
    return y


def normalised(cfg: Config, img: torch.Tensor) -> np.ndarray:
    """Caller units -> [0, 1] (not clipped): CT ``(HU + 1024)/4096``, MRI magnitude."""
    a = img.detach().cpu()
    a = a.abs() if a.is_complex() else a
    if cfg.modality == "ct":
        a = (a - HU_LOW) / HU_WIDTH
    return a.numpy().astype(np.float64)


# ------------------------------------------------------------------------------- reconstruct
def run_method(
    cfg: Config,
    A: Any,
    y: torch.Tensor,
    method: str,
    settings: dict[str, Any],
    prior: Any,  # noqa: N803
    n_samples: int,
    steps: int | None,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], float]:
    """Batched reconstruction in caller units; MRI items pre-scaled to their own normaliser."""
    scale = torch.ones(y.shape[0], *([1] * (y.ndim - 1)))
    if cfg.modality == "mri":
        scale = torch.tensor([problem_scale(y[i : i + 1], A)[1] for i in range(y.shape[0])])
        scale = scale.reshape(-1, *([1] * (y.ndim - 1)))
    kw = dict(settings)
    if method in DIFFUSION:
        kw.update(prior=prior, n_samples=n_samples, steps=steps, seed=seed)
    t0 = time.perf_counter()
    rec = reconstruct(y / scale.to(y.real.dtype), A, method, **kw)
    wall = time.perf_counter() - t0
    s4 = scale.reshape(-1, 1, 1, 1)
    std = rec.std * s4 if rec.std is not None else None
    return rec.mean * s4, std, rec.info, wall


def slice_metrics(
    cfg: Config, mean: torch.Tensor, std: torch.Tensor | None, x: torch.Tensor
) -> dict[str, list[float]]:
    """Per-slice metrics (lists over the batch)."""
    rec_n, ref_n = normalised(cfg, mean), normalised(cfg, x)
    rec_c = np.clip(rec_n, 0, 1)
    out: dict[str, list[float]] = {"psnr": [], "ssim": []}
    if cfg.modality == "ct":
        out.update({"psnr_soft": [], "ssim_soft": []})
    if std is not None:
        out.update({"coverage_2sigma": [], "spearman": []})
        std_n = std.detach().cpu().abs().numpy().astype(np.float64) / (
            HU_WIDTH if cfg.modality == "ct" else 1.0
        )
    for i in range(rec_n.shape[0]):
        out["psnr"].append(psnr(rec_c[i], ref_n[i], data_range=1.0))
        out["ssim"].append(ssim(rec_c[i], ref_n[i], data_range=1.0))
        if cfg.modality == "ct":
            lo, hi = SOFT_TISSUE_HU
            w_rec, w_ref = window(mean[i], lo, hi), window(x[i], lo, hi)
            out["psnr_soft"].append(psnr(w_rec, w_ref, data_range=1.0))
            out["ssim_soft"].append(ssim(w_rec, w_ref, data_range=1.0))
        if std is not None:
            c = calibration(rec_n[i], std_n[i], ref_n[i])
            out["coverage_2sigma"].append(c["coverage_2sigma"])
            out["spearman"].append(c["spearman"])
    return out


# ------------------------------------------------------------------------------- weight sweep
def sweep_weight(
    cfg: Config, A: Any, x: torch.Tensor, method: str, seed: int, iters: dict[str, Any]
) -> dict[str, Any]:  # noqa: N803
    """Log-grid search of ``lam`` (half-decade steps from the API default, extended while the
    best value is at an edge, at most ``SWEEP_MAX_EVALS`` runs); objective: mean PSNR."""
    y = measure(cfg, A, x, seed + 1000)
    tried: dict[int, float] = {}  # half-decade index k -> PSNR of lam0 · 10^(k/2)
    lam0 = SWEEP_START[method]

    def lam_of(k: int) -> float:
        return float(f"{lam0 * 10 ** (k / 2):.3g}")

    def score(k: int) -> None:
        if k not in tried:
            mean, _, _, _ = run_method(
                cfg, A, y, method, {"lam": lam_of(k), **iters}, None, 1, None, seed
            )
            tried[k] = float(np.mean(slice_metrics(cfg, mean, None, x)["psnr"]))

    for k in (-1, 0, 1):
        score(k)
    while len(tried) < SWEEP_MAX_EVALS:
        best = max(tried, key=tried.__getitem__)
        if best == min(tried):
            score(best - 1)
        elif best == max(tried):
            score(best + 1)
        else:
            break
    best = max(tried, key=tried.__getitem__)
    return {
        "lam": lam_of(best),
        "psnr": round(tried[best], 3),
        "grid": {f"{lam_of(k):.3g}": round(v, 3) for k, v in sorted(tried.items())},
    }


def tuned_weights(
    configs: list[Config],
    data: dict[str, dict[str, Any]],
    methods: list[str],
    seed: int,
    use_cache: bool,
    log: Callable[[str], None],
    iters: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{family: {method: sweep result}}`` for the families and CS methods in use (cached)."""
    iters = iters or {}
    path = cache_dir() / "recon_sweep.json"
    cache = json.loads(path.read_text()) if use_cache and path.is_file() else {}
    by_name = {c.name: c for c in CONFIGS}
    out: dict[str, dict[str, Any]] = {}
    for family in sorted({c.family for c in configs}):
        # a family's weights are swept on its sweep setting; a limited-angle one on itself
        cfg = by_name[SWEEP_CONFIG[family]] if family in SWEEP_CONFIG else next(c for c in configs if c.family == family)
        if cfg.modality not in data:
            continue
        d = data[cfg.modality]
        for method in ("tv", "l1-wavelet"):
            if method not in methods or not any(
                c.family == family and method in c.methods for c in configs
            ):
                continue
            key = (
                f"{family}|{method}|{d['size']}|{','.join(map(str, d['tune']))}|seed{seed}|{iters}"
            )
            if key not in cache:
                t0 = time.perf_counter()
                A = cfg.build(d["size"])  # noqa: N806
                cache[key] = sweep_weight(cfg, A, ground_truth(d, d["tune"]), method, seed, iters)
                log(
                    f"# swept {method} on {cfg.name} (tuning rows {d['tune']}): lam={cache[key]['lam']:.3g} "
                    f"grid {cache[key]['grid']} ({time.perf_counter() - t0:.0f} s)"
                )
                if use_cache:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".json.tmp")
                    tmp.write_text(json.dumps(cache, indent=1))
                    os.replace(tmp, path)
            out.setdefault(family, {})[method] = cache[key]
    return out


# ---------------------------------------------------------------------------------- priors
def load_prior(name: str | None, device: str) -> tuple[Any, str]:
    """(prior or None, reason it is unavailable)."""
    if not name or name == "none":
        return None, "no prior given"
    from medrecon.priors import ScorePrior

    try:
        return ScorePrior.load(name, device=device), ""
    except Exception as err:  # noqa: BLE001 - any failure means "skip with the reason"
        return (
            None,
            f"prior {name!r} not available ({type(err).__name__}: {str(err).splitlines()[0][:120]})",
        )


# ---------------------------------------------------------------------------------- targets
def _best(rows: list[dict], cfg: str, methods: tuple[str, ...], key: str = "psnr") -> dict | None:
    cand = [
        r for r in rows if r["config"] == cfg and r["method"] in methods and r.get(key) is not None
    ]
    return max(cand, key=lambda r: r[key]) if cand else None


def card_path_of(name: str) -> Path:
    """The card file of a prior given by registry name or path."""
    from medrecon.priors.registry import shipped_registry

    reg = shipped_registry()
    return reg.card_path(name) if name in reg else Path(name).with_suffix(".json")


def store_rows(args: argparse.Namespace, configs: list[Config], results: list[dict[str, Any]],
               priors: dict[str, tuple[Any, str]], rows_used: dict[str, list[int]],
               data: dict[str, Any]) -> dict[str, list[str]]:
    """Write each setting's mean PSNR per method into its prior's card (``store_benchmark``),
    grouped by operator key; settings without dds and a regularised classical method are skipped."""
    from medrecon.solvers.cards import CLASSICAL_FOR_DEFAULT, operator_key
    from medrecon.tuning import store_benchmark

    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cfg in configs:
        got = {r["method"]: r for r in results if r["config"] == cfg.name and r.get("psnr") is not None}
        if "dds" not in got or not set(got) & set(CLASSICAL_FOR_DEFAULT) or priors.get(cfg.modality, (None,))[0] is None:
            continue
        key = operator_key(cfg.build(data[cfg.modality]["size"]))
        by_key.setdefault((cfg.modality, key), []).append({
            "config": cfg.name, "noise_rel": cfg.noise,
            "psnr": {m: r["psnr"] for m, r in got.items()},
            "settings": {m: {"lam": r["settings"]["lam"]} for m, r in got.items()
                         if m in CLASSICAL_FOR_DEFAULT and "lam" in r.get("settings", {})},
        })
    stored: dict[str, list[str]] = {}
    for (modality, key), rows in by_key.items():
        path = card_path_of(args.prior_ct if modality == "ct" else args.prior_mri)
        d = data[modality]
        store_benchmark(path, key, rows, images=f"{modality}/val.npz rows {rows_used[modality]}",
                        n_images=len(rows_used[modality]),
                        command="benchmarks/recon.py " + " ".join(sys.argv[1:]))
        stored.setdefault(str(path), []).append(key)
        print(f"stored the benchmark of {key} ({', '.join(r['config'] for r in rows)}) in {path}; size {d['size']}²")
    return stored


def default_column(configs: list[Config], results: list[dict[str, Any]],
                   priors: dict[str, tuple[Any, str]], data: dict[str, Any],
                   names: dict[str, str]) -> list[dict[str, Any]]:
    """Per setting: the method ``reconstruct(method=None)`` runs (from the prior's card as it is
    now on disk) and its PSNR in this run — the chosen method's row, or the classical row where
    the chosen diffusion row flagged itself as failing (what the default then returns)."""
    from medrecon.api import default_choice
    from medrecon.solvers.cards import CLASSICAL_FOR_DEFAULT, operator_key

    out = []
    for cfg in configs:
        prior = priors.get(cfg.modality, (None,))[0]
        got = {r["method"]: r for r in results if r["config"] == cfg.name and r.get("psnr") is not None}
        classical = {m: r["psnr"] for m, r in got.items() if m in CLASSICAL_FOR_DEFAULT}
        if prior is None or not classical:
            continue
        A = cfg.build(data[cfg.modality]["size"])  # noqa: N806
        choice = default_choice(A, str(card_path_of(names[cfg.modality])))
        method = choice.method
        if method in got and got[method].get("failing"):
            method = choice.classical
        best = max(classical, key=classical.get)
        row = {"config": cfg.name, "key": operator_key(A), "method": method, "reason": choice.reason,
               "best_classical": best, "classical_psnr": classical[best]}
        if method in got:
            row.update(psnr=got[method]["psnr"], margin=round(got[method]["psnr"] - classical[best], 3))
        else:
            row.update(psnr=None, note=f"{method} not run here")
        out.append(row)
    return out


def check_targets(rows: list[dict], defaults: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The targets of issues 25 (DDS) and 23 (priors v2), each ``{"target", "value", "ok"}`` (ok None =
    not measurable)."""
    out: list[dict[str, Any]] = []

    present = {r["config"] for r in rows}

    def add(name: str, value: Any, ok: bool | None) -> None:
        if name.split(":")[0].split("/")[0] in present:  # only the settings that were run
            out.append({"target": name, "value": value, "ok": ok})

    # issue 25 (DDS): 23 views +4, 10 views +2, noisy +3 / +1.5; issue 23 (priors v2): 10 views +3
    margins = [("", 23, 4.0), ("", 10, 2.0), ("", 10, 3.0), ("-noisy", 23, 3.0), ("-noisy", 10, 1.5)]
    for noisy, v, margin in margins:
        cfg = f"ct-{v}v{noisy}"
        tv, best = _best(rows, cfg, ("tv",)), _best(rows, cfg, DIFFUSION)
        if not tv or not best:
            add(f"{cfg}: best diffusion ≥ TV + {margin:g} dB PSNR", None, None)
            continue
        gain = round(best["psnr"] - tv["psnr"], 2)
        add(f"{cfg}: best diffusion ({best['method']}) ≥ TV + {margin:g} dB PSNR", gain, gain >= margin)
    for cfg in sorted(c for c in present if c.startswith("ct-")):
        tv, best = _best(rows, cfg, ("tv",)), _best(rows, cfg, DIFFUSION)
        if tv and best:
            add(f"{cfg}: best diffusion ({best['method']}) SSIM ≥ TV", round(best["ssim"] - tv["ssim"], 4),
                best["ssim"] >= tv["ssim"])
    for cfg in ("mri-8x-equispaced", "mri-8x-poisson", "sense8-8x-equispaced"):
        cs, best = _best(rows, cfg, ("tv", "l1-wavelet")), _best(rows, cfg, DIFFUSION)
        ok = None if not cs or not best else best["psnr"] - cs["psnr"] >= 2
        val = None if ok is None else round(best["psnr"] - cs["psnr"], 2)
        add(f"{cfg}: best diffusion ≥ best CS + 2 dB PSNR", val, ok)
    cal = [r for r in rows if r["method"] in DIFFUSION and r.get("coverage_2sigma") is not None]
    for r in cal:
        c, s = r["coverage_2sigma"], r["spearman"]
        add(f"{r['config']}/{r['method']}: ±2σ coverage in [0.85, 0.99]", c, 0.85 <= c <= 0.99)
        add(f"{r['config']}/{r['method']}: Spearman ≥ 0.4", s, s is not None and s >= 0.4)
    for d in defaults or []:  # issue 31: the default never loses to classical by more than 0.2 dB
        ok = None if d.get("margin") is None else d["margin"] >= -0.2
        add(f"{d['config']}: default ({d['method']}) ≥ best classical − 0.2 dB PSNR", d.get("margin"), ok)
    return out


# ------------------------------------------------------------------------------------ main
def _fmt(m: float | None, s: float | None, digits: int) -> str:
    if m is None:
        return "–"
    return f"{m:.{digits}f}±{s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 slices per modality")
    p.add_argument(
        "--slices",
        default=None,
        help="N (the first N report slices) or comma-separated val.npz rows (not the tuning rows)",
    )
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument(
        "--configs",
        default=None,
        help="comma-separated setting names or prefixes (ct, mri, sense8)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="diffusion steps (default: card's tuned value or preset)",
    )
    p.add_argument("--samples", type=int, default=4, help="posterior samples per slice (diffusion)")
    p.add_argument("--prior-ct", default="ct-256")
    p.add_argument("--prior-mri", default="mri-256")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--crop", type=int, default=None, help="centre crop (smoke tests); default full 256²"
    )
    p.add_argument(
        "--no-cache", action="store_true", help="re-run the TV/L1 sweep and do not write the cache"
    )
    p.add_argument(
        "--lam",
        default=None,
        help="fixed weights instead of the sweep, e.g. tv=1e-4,l1-wavelet=3e-3",
    )
    p.add_argument(
        "--store",
        action="store_true",
        help="write each setting's mean PSNR per method into its prior's card (card['benchmark'][key]), "
        "from which medrecon picks the default method per operator key (needs dds and tv or l1-wavelet)",
    )
    p.add_argument(
        "--mri-data",
        default=None,
        help="report MRI on slices of this volume (NIfTI file or DICOM folder, e.g. the held-out T1 "
        "mri/nifti/IXI012-HH-1211_T1.nii.gz) instead of the FLAIR report rows; tuning stays on FLAIR",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="TV/L1 iterations (default: the API's 100; smoke tests)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table and the JSON line; return the JSON dict."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    return with_two_threads(_run, args)


def with_two_threads(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """``run(args)`` with torch on 2 threads (the machine the targets are stated for), restoring
    the caller's thread count afterwards (the benchmarks also run inside the test process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def select_configs(spec: str | None) -> list[Config]:
    """The settings a comma-separated ``spec`` names, in table order: an exact name selects one
    setting, anything else is a prefix (``ct``, ``mri``); empty = all of :data:`CONFIGS`.
    ``ct-la<arc>`` (e.g. ``ct-la90``) names a limited-angle setting (:func:`limited_angle_config`),
    after the table's."""
    wanted = [w.strip() for w in spec.split(",") if w.strip()] if spec else []
    limited = [w for w in wanted if re.fullmatch(r"ct-la\d+(\.\d+)?", w)]
    wanted = [w for w in wanted if w not in limited]
    names = {c.name for c in CONFIGS}
    table = [
        c for c in CONFIGS
        if (not wanted and not limited) or any(c.name == w or (w not in names and c.name.startswith(w)) for w in wanted)
    ]
    return table + [limited_angle_config(float(w[len("ct-la"):])) for w in limited]


def _select(data: dict[str, Any], spec: str | None) -> list[int]:
    if not spec:
        return data["report"]
    if "," not in spec and spec.isdigit() and int(spec) < len(data["report"]):
        return data["report"][: int(spec)]
    rows = [int(s) for s in spec.split(",") if s]
    bad = [r for r in rows if r in data["tune"] or not 0 <= r < len(data["images"])]
    if bad:
        raise SystemExit(
            f"--slices: rows {bad} are tuning rows or out of range (tuning rows: {data['tune']})"
        )
    return rows


def _run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(ALL_METHODS)}")
    configs = select_configs(args.configs)
    if args.mri_data and args.store:
        raise SystemExit("--mri-data reports on another source: it cannot --store into the card")
    data = load_data(data_root(), args.quick, args.crop, args.mri_data)
    if not data:
        raise SystemExit(f"no validation data under {data_root()} (set MEDRECON_DATA)")
    configs = [c for c in configs if c.modality in data]
    rows_used = {m: _select(d, args.slices) for m, d in data.items()}

    def log(msg: str) -> None:
        print(msg, flush=True)

    sizes = ", ".join(f"{m} {d['size']}²" for m, d in data.items())
    log(
        f"# recon benchmark: data {data_root()}, rows ct={rows_used.get('ct')} mri={rows_used.get('mri')} "
        f"(tuning rows ct={data.get('ct', {}).get('tune')} mri={data.get('mri', {}).get('tune')}), "
        f"size {sizes}, threads {torch.get_num_threads()}"
    )
    iters = {"iters": args.iters} if args.iters else {}
    fixed_lam = (
        {k: {"lam": float(v)} for k, v in (s.split("=") for s in args.lam.split(","))}
        if args.lam
        else None
    )
    weights: dict[str, dict[str, Any]] = {}

    def weight(cfg: Config, method: str) -> float:
        if fixed_lam is not None:
            return fixed_lam[method]["lam"]
        if cfg.family not in weights:  # swept when first needed, so rows appear early
            weights.update(
                tuned_weights([cfg], data, methods, args.seed, not args.no_cache, log, iters)
            )
        return weights[cfg.family][method]["lam"]

    priors: dict[str, tuple[Any, str]] = {}
    if any(m in DIFFUSION for m in methods):
        if any(c.modality == "ct" for c in configs):
            priors["ct"] = load_prior(args.prior_ct, args.device)
        if any(c.modality == "mri" for c in configs):
            priors["mri"] = load_prior(args.prior_mri, args.device)

    results: list[dict[str, Any]] = []
    for cfg in configs:
        d = data[cfg.modality]
        rows = rows_used[cfg.modality]
        A = cfg.build(d["size"])  # noqa: N806
        x = ground_truth(d, rows)
        y = measure(cfg, A, x, args.seed)
        x, y = x.to(args.device), y.to(args.device)
        for method in cfg.methods:
            if method not in methods:
                continue
            row: dict[str, Any] = {"config": cfg.name, "method": method, "n_slices": len(rows)}
            settings: dict[str, Any] = {}
            if method in ("tv", "l1-wavelet"):
                settings.update(lam=weight(cfg, method), **iters)
            prior = None
            if method in DIFFUSION:
                prior, reason = priors.get(cfg.modality, (None, "no prior"))
                if prior is None:
                    row["skipped"] = reason
                    results.append(row)
                    log(f"# {cfg.name:22s} {method:11s} skipped: {reason}")
                    continue
            mean, std, info, wall = run_method(
                cfg, A, y, method, settings, prior, args.samples, args.steps, args.seed
            )
            m = slice_metrics(cfg, mean.cpu(), None if std is None else std.cpu(), x.cpu())
            for k, v in m.items():
                vals = [float(a) for a in v if a is not None and not math.isnan(a)]
                row[k] = round(float(np.mean(vals)), 4) if vals else None
                row[k + "_std"] = round(float(np.std(vals)), 4) if vals else None
            row["s_per_slice"] = round(wall / len(rows), 3)
            row["nfe"] = int(info.get("nfe", 0))
            row["settings"] = {
                k: v
                for k, v in info.get("settings", {}).items()
                if isinstance(v, int | float | str | bool)
            }
            if "tuned" in info:
                row["tuned_defaults"] = info["tuned"]
            if info.get("failing"):
                row["failing"] = True
            results.append(row)
            log(
                f"# {cfg.name:22s} {method:11s} PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f} "
                f"{row['s_per_slice']:.2f} s/slice"
            )

    # table
    head = (
        f"{'setting':22s} {'method':11s} {'PSNR dB':>13s} {'SSIM':>15s} {'PSNR soft':>13s} {'SSIM soft':>15s} "
        f"{'s/slice':>8s} {'NFE':>6s} {'cov±2σ':>7s} {'Spearman':>8s}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if "skipped" in r:
            print(f"{r['config']:22s} {r['method']:11s} skipped: {r['skipped']}")
            continue
        cov = f"{r['coverage_2sigma']:.3f}" if r.get("coverage_2sigma") is not None else "–"
        sp = f"{r['spearman']:.3f}" if r.get("spearman") is not None else "–"
        print(
            f"{r['config']:22s} {r['method']:11s} {_fmt(r['psnr'], r['psnr_std'], 2):>13s} "
            f"{_fmt(r['ssim'], r['ssim_std'], 4):>15s} {_fmt(r.get('psnr_soft'), r.get('psnr_soft_std'), 2):>13s} "
            f"{_fmt(r.get('ssim_soft'), r.get('ssim_soft_std'), 4):>15s} {r['s_per_slice']:8.2f} {r['nfe']:6d} "
            f"{cov:>7s} {sp:>8s}"
        )
    if fixed_lam is not None:
        print(f"TV / L1-wavelet weights fixed by --lam: {args.lam}")
    else:
        print(
            "TV / L1-wavelet weights (swept on the tuning rows, not the reported ones): "
            + "; ".join(
                f"{fam} {m} lam={w['lam']:.3g}"
                for fam, ws in weights.items()
                for m, w in ws.items()
            )
        )
    stored = store_rows(args, configs, results, priors, rows_used, data) if args.store else {}
    defaults = default_column(configs, results, priors, data, {"ct": args.prior_ct, "mri": args.prior_mri})
    if defaults:
        print("default method per setting (medrecon.api.default_choice on the card"
              + (" just written" if stored else "") + "), against the best classical method of this run:")
        for d in defaults:
            print(f"  {d['config']:22s} {d['key']:12s} {d['method']:11s} "
                  + (f"{d['psnr']:.2f} dB, best classical {d['best_classical']} {d['classical_psnr']:.2f} dB "
                     f"({d['margin']:+.2f})" if d.get("psnr") is not None else f"({d['note']})"))
    targets = check_targets(results, defaults)
    print("targets (relative to the baselines of this run):")
    for t in targets:
        status = "n/a " if t["ok"] is None else ("PASS" if t["ok"] else "FAIL")
        print(f"  [{status}] {t['target']}: {t['value']}")
    wall = time.perf_counter() - t_start
    print(f"# wall time {wall:.0f} s")
    out = {
        "bench": "recon",
        "device": args.device
        if args.device != "cpu"
        else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "quick": bool(args.quick),
        "size": {m: d["size"] for m, d in data.items()},
        "rows": rows_used,
        "tuning_rows": {m: d["tune"] for m, d in data.items()},
        "noise": "Gaussian, std = 0.005 × RMS of the noiseless sinogram of (HU + 1024)/4096, per slice",
        "weights": weights if fixed_lam is None else {"fixed": fixed_lam},
        "iters": args.iters,
        "steps": args.steps,
        "samples": args.samples,
        "priors": {m: (r or "loaded") for m, (_, r) in priors.items()},
        "results": results,
        "targets": targets,
        "defaults": defaults,
        "stored": stored,
        "wall_s": round(wall, 1),
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
