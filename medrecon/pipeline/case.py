"""One reconstruction case: load, (simulate), reconstruct, write outputs and a JSON record.

The CLI's ``reconstruct`` command builds a :class:`ReconstructConfig` and calls
:func:`run_case`; batch pipelines call the same function per case.  Logs, file names and records
use the case ID (a hash of the input path unless given), never patient names.  The case's seed
is derived from the run seed and the case ID (:func:`case_seed`), so a case gives the same result
alone or inside a batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon.errors import InputError, SettingsError

__all__ = ["ReconstructConfig", "run_case", "case_id_for", "case_seed", "output_stem"]


@dataclass(frozen=True)
class ReconstructConfig:
    """Settings of one reconstruction case.

    Attributes
    ----------
    modality : {"ct", "mri"}
    input : str or None
        DICOM folder/file, NIfTI file or image folder (retrospective); raw sinogram ``.npy`` /
        ``.npz`` + ``.json``, fastMRI ``.h5`` or BART ``.cfl`` (prospective); None = the bundled
        CT slice.
    out : str
        Output folder.
    mode : {"auto", "retrospective", "prospective"}
        ``auto``: retrospective for images, prospective for measured data.
    geometry : {"parallel", "fan"}
        CT beam geometry of a retrospective case (fan: equiangular detector, 2π scan).
    views : int
        CT: equally spaced views (parallel on [0, π), fan on [0, 2π)).
    angles_deg : tuple of float or None
        CT: explicit view angles in degrees (wins over ``views``).
    limited_angle_deg : float or None
        CT: measure only the views of a full set within [0, this) degrees.
    source_to_isocenter_mm, source_to_detector_mm : float
        Fan-beam distances.
    acceleration, center_fraction, mask : MRI undersampling of a retrospective case.
    method : str
        A method of :func:`medrecon.reconstruct` (classical or diffusion).
    prior : str or None
        Score prior name for diffusion methods (passed to ``reconstruct`` as ``prior``).
    samples : int or None
        Posterior samples (passed as ``n_samples``); their std is the uncertainty map.
    steps : int or None
        Sampler steps (passed as ``steps``).
    iters : int or None
        Iterations of iterative classical methods.
    noise : float
        Gaussian measurement noise of a retrospective case, fraction of the measurement's RMS.
    seed : int
        Run seed; the case's seed is ``case_seed(seed, case_id)``.
    device : str
        Torch device of the solver (``cpu``, ``cuda``, ``cuda:1``, or ``auto``).
    output_format : {"nifti", "dicom"}
    case_id : str or None
    series_uid : str or None
        The DICOM series to load from a folder holding several.
    slices : str or None
        ``"start:stop"`` or an index: reconstruct only these slices.
    downsample : int
        In-plane block averaging of a retrospective image (speed; 1 = none).
    image_size : int or None
        Prospective CT: reconstruction grid (default from the geometry).
    reference : str or None
        Prospective: reference image for metrics.
    thumbnails : bool
        Also write small PNGs of the reconstruction and the uncertainty (batch reports).
    overwrite : bool
    progress : bool
        Progress bars for long methods.
    """

    modality: str = "ct"
    input: str | None = None
    out: str = "medrecon-out"
    mode: str = "auto"
    geometry: str = "parallel"
    views: int = 23
    angles_deg: tuple[float, ...] | None = None
    limited_angle_deg: float | None = None
    source_to_isocenter_mm: float = 541.0
    source_to_detector_mm: float = 949.0
    acceleration: float = 4.0
    center_fraction: float = 0.08
    mask: str = "equispaced"
    method: str = "tv"
    prior: str | None = None
    samples: int | None = None
    steps: int | None = None
    iters: int | None = None
    noise: float = 0.0
    seed: int = 0
    device: str = "cpu"
    output_format: str = "nifti"
    case_id: str | None = None
    series_uid: str | None = None
    slices: str | None = None
    downsample: int = 1
    image_size: int | None = None
    reference: str | None = None
    thumbnails: bool = False
    overwrite: bool = False
    progress: bool = False


def case_id_for(path: str | None, series_uid: str | None = None) -> str:
    """A case ID that does not reveal the input's name: ``case-`` + 10 hex digits of its path hash."""
    if path is None:
        return "bundled-ct"
    key = str(Path(path).resolve()) + (f"#{series_uid}" if series_uid else "")
    return f"case-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def case_seed(run_seed: int, case_id: str) -> int:
    """Per-case seed from the run seed and the case ID (STYLE.md §8), in [0, 2³¹)."""
    digest = hashlib.sha256(f"{int(run_seed)}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def output_stem(cfg: ReconstructConfig) -> str:
    """``<case>_<method>``: the stem of every file a case writes."""
    return f"{cfg.case_id or case_id_for(cfg.input, cfg.series_uid)}_{cfg.method}"


def _write_json(path: Path, record: dict[str, Any], overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise InputError(path, "exists; pass --overwrite to replace it")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise SettingsError(f"--device: unknown torch device {name!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"--device {name}: CUDA is not available on this machine (use cpu)")
    return dev


def _method_settings(cfg: ReconstructConfig) -> dict[str, Any]:
    """Settings passed through to :func:`medrecon.reconstruct` (only those given)."""
    given = {"iters": cfg.iters, "prior": cfg.prior, "n_samples": cfg.samples, "steps": cfg.steps}
    return {k: v for k, v in given.items() if v is not None}


def _validate(cfg: ReconstructConfig) -> None:
    choices = {"modality": ("ct", "mri"), "output_format": ("nifti", "dicom"),
               "mode": ("auto", "retrospective", "prospective"), "geometry": ("parallel", "fan")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)}; got {getattr(cfg, name)!r}")
    for name in ("samples", "steps", "iters"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise SettingsError(f"{name} must be ≥ 1; got {v}")


def _real(t: torch.Tensor) -> torch.Tensor:
    return t.abs() if t.is_complex() else t


def _metrics(prob, mean: torch.Tensor, initial: torch.Tensor, std: torch.Tensor | None, modality: str) -> dict[str, float]:
    from medrecon.metrics import SOFT_TISSUE_HU, calibration, psnr, ssim, window

    ref = prob.reference
    if ref is None:
        return {}
    if tuple(ref.shape[-2:]) != tuple(mean.shape[-2:]):  # e.g. fastMRI's cropped reference
        h, w = ref.shape[-2:]
        top, left = (mean.shape[-2] - h) // 2, (mean.shape[-1] - w) // 2
        if top < 0 or left < 0:
            return {}
        mean, initial = (t[..., top : top + h, left : left + w] for t in (mean, initial))
        std = None if std is None else std[..., top : top + h, left : left + w]
    if modality == "ct":
        low, width = -1024.0, 4096.0
        m = {
            "psnr": psnr((mean - low) / width, (ref - low) / width),
            "ssim": ssim(((mean - low) / width).clamp(0, 1), ((ref - low) / width).clamp(0, 1)),
            "psnr_soft_tissue": psnr(window(mean, *SOFT_TISSUE_HU), window(ref, *SOFT_TISSUE_HU)),
            "ssim_soft_tissue": ssim(window(mean, *SOFT_TISSUE_HU), window(ref, *SOFT_TISSUE_HU)),
            "psnr_initial": psnr((initial - low) / width, (ref - low) / width),
        }
    else:
        s = prob.scale
        m = {"psnr": psnr(mean / s, ref / s), "ssim": ssim(mean / s, ref / s),
             "psnr_initial": psnr(initial / s, ref / s)}
    if std is not None:
        m.update(calibration(mean, std, ref))
    return m


def run_case(cfg: ReconstructConfig) -> dict[str, Any]:
    """Run one case and return its JSON record (also written to ``<out>/<case>_<method>.json``).

    Writes ``<case>_<method>.nii.gz`` (or a ``_dicom`` series folder), the uncertainty map
    ``<case>_<method>_std.nii.gz`` when the method returns one, the figure ``.png`` and the record
    ``.json``; every file is written atomically.

    Raises
    ------
    MedreconError
        Bad input files (:class:`InputError`) or settings (:class:`SettingsError`).
    """
    from medrecon.api import reconstruct
    from medrecon.datasets import Volume, save_dicom_series, save_nifti
    from medrecon.pipeline.problems import build_problem
    from medrecon.report import case_figure, thumbnail

    _validate(cfg)
    device = _device(cfg.device)
    case = cfg.case_id or case_id_for(cfg.input, cfg.series_uid)
    seed = case_seed(cfg.seed, case)
    stem = f"{case}_{cfg.method}"
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / f"{stem}.json"
    if record_path.exists() and not cfg.overwrite:  # fail before the work, not after it
        raise InputError(record_path, "exists; pass --overwrite to replace it")
    prob = build_problem(cfg, seed)
    y = prob.y.to(device)
    rec = reconstruct(y, prob.A, method=cfg.method, seed=seed, progress=cfg.progress, **_method_settings(cfg))
    mean = _real(rec.mean).detach().cpu()
    std = None if rec.std is None else rec.std.detach().cpu()
    initial = _real(reconstruct(y, prob.A, method=prob.initial_method).mean).detach().cpu()

    tpl = prob.template
    files: list[Path] = []
    result = Volume(mean[:, 0].numpy().astype(np.float32), tpl.affine, tpl.modality, dict(tpl.meta))
    std_vol = None if std is None else Volume(std[:, 0].numpy().astype(np.float32), tpl.affine, tpl.modality,
                                              dict(tpl.meta))
    if cfg.output_format == "nifti":
        files += save_nifti(result, out / f"{stem}.nii.gz", overwrite=cfg.overwrite)
        if std_vol is not None:
            files += save_nifti(std_vol, out / f"{stem}_std.nii.gz", overwrite=cfg.overwrite)
    else:
        files += save_dicom_series(result, out / f"{stem}_dicom", method=cfg.method, overwrite=cfg.overwrite)
        if std_vol is not None:
            files += save_dicom_series(std_vol, out / f"{stem}_std_dicom", method=cfg.method,
                                       kind="uncertainty", overwrite=cfg.overwrite)
    metrics = _metrics(prob, mean, initial, std, cfg.modality)

    mid = mean.shape[0] // 2
    panels = [(f"initial estimate ({prob.initial_method})", initial[mid, 0].numpy(), prob.unit),
              (f"reconstruction ({cfg.method})", mean[mid, 0].numpy(), prob.unit)]
    if std is not None:
        panels.append(("uncertainty (posterior std)", std[mid, 0].numpy(), prob.unit))
    if prob.reference is not None and prob.reference.shape == mean.shape:
        panels.append(("|error| vs reference", (mean - prob.reference)[mid, 0].abs().numpy(), prob.unit))
    fig = case_figure(out / f"{stem}.png", panels, display=prob.display, title=f"{case}: {prob.title}")
    files.append(fig)
    if cfg.thumbnails:
        files.append(thumbnail(out / f"{stem}_thumb.png", mean[mid, 0].numpy(), prob.display))
        if std is not None:
            files.append(thumbnail(out / f"{stem}_std_thumb.png", std[mid, 0].numpy(), None))
    record = {
        "case_id": case,
        "seed": seed,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("input", "reference", "out")},
        "input_kind": "bundled" if cfg.input is None else "file",
        "problem": prob.title,
        "notes": prob.notes,
        "shape": list(mean.shape[:1]) + list(mean.shape[2:]),
        "device": str(device),
        "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "info": rec.info,
        "outputs": [str(p) for p in files],
    }
    _write_json(record_path, record, cfg.overwrite)
    return record
