"""``medrecon evaluate``: metrics of a reconstruction against a reference image.

CT (HU): PSNR and SSIM on ``(HU + 1024) / 4096`` and in the soft-tissue window; MRI: PSNR and SSIM
after dividing both by the reference's 99.5th percentile.  With an uncertainty map, the
calibration of the std against the error (:func:`medrecon.metrics.calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medrecon.errors import InputError, SettingsError

__all__ = ["EvaluateConfig", "evaluate_files"]


@dataclass(frozen=True)
class EvaluateConfig:
    """Files to compare.

    Attributes
    ----------
    reconstruction, reference : str
        Images readable by :func:`medrecon.datasets.load_volume` (NIfTI, DICOM series, …).
    modality : {"ct", "mri"}
    std : str or None
        Uncertainty map (posterior std) of the reconstruction, same shape.
    out : str or None
        Also write the metrics as JSON here.
    """

    reconstruction: str
    reference: str
    modality: str = "ct"
    std: str | None = None
    out: str | None = None


def evaluate_files(cfg: EvaluateConfig) -> dict[str, Any]:
    """Compute the metrics; returns ``{"metrics": {...}, "shape": [...]}``.

    Raises
    ------
    InputError
        Unreadable files, or shapes that differ (names the file).
    """
    from medrecon.datasets import load_volume
    from medrecon.metrics import SOFT_TISSUE_HU, calibration, psnr, ssim, window
    from medrecon.pipeline.records import atomic_json

    if cfg.modality not in ("ct", "mri"):
        raise SettingsError(f"modality must be 'ct' or 'mri'; got {cfg.modality!r}")
    rec = load_volume(cfg.reconstruction).array.astype(np.float32)
    ref = load_volume(cfg.reference).array.astype(np.float32)
    if rec.shape != ref.shape:
        raise InputError(cfg.reconstruction, f"shape {rec.shape} differs from the reference's {ref.shape}")
    if cfg.modality == "ct":
        a, b = (rec + 1024) / 4096, (ref + 1024) / 4096
        m = {"psnr": psnr(a, b, data_range=1.0), "ssim": ssim(np.clip(a, 0, 1), np.clip(b, 0, 1), data_range=1.0),
             "psnr_soft_tissue": psnr(window(rec, *SOFT_TISSUE_HU), window(ref, *SOFT_TISSUE_HU), data_range=1.0),
             "ssim_soft_tissue": ssim(window(rec, *SOFT_TISSUE_HU), window(ref, *SOFT_TISSUE_HU), data_range=1.0)}
    else:
        scale = float(np.percentile(np.abs(ref), 99.5)) or 1.0
        m = {"psnr": psnr(rec / scale, ref / scale, data_range=1.0),
             "ssim": ssim(rec / scale, ref / scale, data_range=1.0)}
    m["mae"] = float(np.mean(np.abs(rec - ref)))
    if cfg.std:
        std = load_volume(cfg.std).array.astype(np.float32)
        if std.shape != rec.shape:
            raise InputError(cfg.std, f"shape {std.shape} differs from the reconstruction's {rec.shape}")
        m.update(calibration(rec, std, ref))
    result = {"metrics": {k: round(float(v), 4) for k, v in m.items()}, "shape": list(rec.shape),
              "modality": cfg.modality, "units": "HU" if cfg.modality == "ct" else "a.u."}
    if cfg.out:
        atomic_json(Path(cfg.out), result)
    return result
