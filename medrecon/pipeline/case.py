"""One reconstruction case: load, (simulate), reconstruct, write outputs and a JSON record.

The CLI's ``reconstruct`` command builds a :class:`ReconstructConfig` and calls
:func:`run_case`; batch pipelines call the same function per case.  Logs, file names and records
use the case ID (a hash of the input path unless given), never patient names.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon.errors import InputError, SettingsError

__all__ = ["ReconstructConfig", "run_case", "case_id_for"]


@dataclass(frozen=True)
class ReconstructConfig:
    """Settings of one retrospective reconstruction (the measurement is simulated from an image).

    Attributes
    ----------
    modality : {"ct", "mri"}
    input : str or None
        DICOM folder/file, NIfTI file or image folder; None = the bundled CT slice.
    out : str
        Output folder.
    views : int
        CT: equally spaced parallel-beam views on [0, π).
    limited_angle_deg : float or None
        CT: measure only the views in [0, this) of a 180-view set instead of ``views``.
    acceleration, center_fraction, mask : MRI undersampling.
    method : str
        A method of :func:`medrecon.reconstruct`.
    noise : float
        Gaussian measurement noise, as a fraction of the measurement's RMS.
    seed : int
    output_format : {"nifti", "dicom"}
    case_id : str or None
    overwrite : bool
    """

    modality: str = "ct"
    input: str | None = None
    out: str = "medrecon-out"
    views: int = 23
    limited_angle_deg: float | None = None
    acceleration: float = 4.0
    center_fraction: float = 0.08
    mask: str = "equispaced"
    method: str = "tv"
    iters: int | None = None
    noise: float = 0.0
    seed: int = 0
    output_format: str = "nifti"
    case_id: str | None = None
    overwrite: bool = False


def case_id_for(path: str | None) -> str:
    """A case ID that does not reveal the input's name: ``case-`` + 10 hex digits of its path hash."""
    if path is None:
        return "bundled-ct"
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:10]
    return f"case-{digest}"


def _write_json(path: Path, record: dict[str, Any], overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise InputError(path, "exists; pass --overwrite to replace it")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=2)
    os.replace(tmp, path)


def run_case(cfg: ReconstructConfig) -> dict[str, Any]:
    """Run one case and return its JSON record (also written to ``<out>/<case>.json``)."""
    from medrecon.api import reconstruct
    from medrecon.datasets import Volume, load_volume, save_dicom_series, save_nifti
    from medrecon.datasets.simulate import bundled_ct_slice
    from medrecon.metrics import SOFT_TISSUE_HU, psnr, ssim, window
    from medrecon.operators import MaskedFourier, ParallelBeamCT, mri_mask
    from medrecon.report import case_figure

    if cfg.modality not in ("ct", "mri"):
        raise SettingsError(f"modality must be 'ct' or 'mri', got {cfg.modality!r}")
    if cfg.output_format not in ("nifti", "dicom"):
        raise SettingsError(f"output format must be 'nifti' or 'dicom', got {cfg.output_format!r}")
    case = cfg.case_id or case_id_for(cfg.input)
    src = str(bundled_ct_slice()) if cfg.input is None else cfg.input
    vol = load_volume(src)
    x = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[:, None]  # (Z, 1, H, W)
    h, w = x.shape[-2:]
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.modality == "ct":
        if cfg.limited_angle_deg is not None:
            A = ParallelBeamCT.limited_angle((h, w), math.radians(cfg.limited_angle_deg))  # noqa: N806
        else:
            if cfg.views < 1:
                raise SettingsError(f"--views must be ≥ 1, got {cfg.views}")
            A = ParallelBeamCT.sparse_view((h, w), cfg.views)  # noqa: N806
        truth_n = (x + 1024) / 4096
        data_range, disp, unit = 1.0, SOFT_TISSUE_HU, "HU"
    else:
        A = MaskedFourier(mri_mask(cfg.mask, (h, w), cfg.acceleration, cfg.center_fraction, seed=cfg.seed))  # noqa: N806
        scale = float(np.percentile(np.abs(vol.array), 99.5)) or 1.0
        truth_n = x / scale
        data_range, disp, unit = 1.0, (0.0, scale), "a.u."
    y = A(x)
    if cfg.noise > 0:
        rms = y.abs().pow(2).mean().sqrt()
        noise = torch.randn(y.shape, generator=g, dtype=y.real.dtype)
        if y.is_complex():
            noise = torch.complex(noise, torch.randn(y.shape, generator=g, dtype=y.real.dtype)) / math.sqrt(2)
        y = y + cfg.noise * rms * noise
    settings = {} if cfg.iters is None else {"iters": cfg.iters}
    rec = reconstruct(y, A, method=cfg.method, seed=cfg.seed, **settings)
    mean = rec.mean.abs() if rec.mean.is_complex() else rec.mean
    first = reconstruct(y, A, method="fbp" if cfg.modality == "ct" else "zero-filled").mean
    initial = first.abs() if first.is_complex() else first

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = Volume(mean[:, 0].numpy().astype(np.float32), vol.affine, vol.modality, dict(vol.meta))
    if cfg.output_format == "nifti":
        files = save_nifti(result, out / f"{case}_{cfg.method}.nii.gz", overwrite=cfg.overwrite)
    else:
        files = save_dicom_series(result, out / f"{case}_{cfg.method}_dicom", method=cfg.method,
                                  overwrite=cfg.overwrite)
    if cfg.modality == "ct":
        rec_n = (mean + 1024) / 4096
        metrics = {
            "psnr": psnr(rec_n, truth_n, data_range), "ssim": ssim(rec_n, truth_n, data_range),
            "psnr_soft_tissue": psnr(window(mean, *SOFT_TISSUE_HU), window(x, *SOFT_TISSUE_HU)),
            "ssim_soft_tissue": ssim(window(mean, *SOFT_TISSUE_HU), window(x, *SOFT_TISSUE_HU)),
            "psnr_initial": psnr((initial + 1024) / 4096, truth_n, data_range),
        }
    else:
        rec_n = mean / scale
        metrics = {"psnr": psnr(rec_n, truth_n, data_range), "ssim": ssim(rec_n, truth_n, data_range),
                   "psnr_initial": psnr(initial / scale, truth_n, data_range)}
    mid = x.shape[0] // 2
    fig = case_figure(
        out / f"{case}_{cfg.method}.png",
        [
            ("initial estimate" + (" (FBP)" if cfg.modality == "ct" else " (zero-filled)"), initial[mid, 0].numpy(), unit),
            (f"reconstruction ({cfg.method})", mean[mid, 0].numpy(), unit),
            ("error vs reference", (mean - x)[mid, 0].abs().numpy(), unit),
        ],
        display=disp,
        title=f"{case}: {cfg.modality.upper()} " + (f"{cfg.views} views" if cfg.modality == "ct" else f"{cfg.acceleration:g}x {cfg.mask}"),
    )
    record = {
        "case_id": case,
        "config": {k: v for k, v in asdict(cfg).items() if k != "input"},
        "input_kind": "bundled" if cfg.input is None else "file",
        "shape": list(vol.array.shape),
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
        "info": rec.info,
        "outputs": [str(p) for p in [*files, fig]],
    }
    _write_json(out / f"{case}_{cfg.method}.json", record, cfg.overwrite)
    return record
