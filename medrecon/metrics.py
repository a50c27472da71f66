"""Image-quality metrics: PSNR, SSIM (also inside a CT display window) and uncertainty calibration."""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["psnr", "ssim", "window", "SOFT_TISSUE_HU", "calibration"]

#: soft-tissue display window W400 / L40, as (low, high) in HU
SOFT_TISSUE_HU = (-160.0, 240.0)


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return np.abs(a) if np.iscomplexobj(a) else a.astype(np.float64)


def window(x: Tensor | np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to ``[low, high]`` and map to ``[0, 1]`` (a display window)."""
    return (np.clip(_np(x), low, high) - low) / (high - low)


def psnr(x: Tensor | np.ndarray, ref: Tensor | np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range² / MSE)``."""
    a, b = _np(x), _np(ref)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(x: Tensor | np.ndarray, ref: Tensor | np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity (scikit-image, 7×7 window) over the last two axes, averaged over slices."""
    from skimage.metrics import structural_similarity

    a, b = _np(x), _np(ref)
    a2 = a.reshape(-1, *a.shape[-2:])
    b2 = b.reshape(-1, *b.shape[-2:])
    return float(np.mean([structural_similarity(p, q, data_range=data_range) for p, q in zip(a2, b2, strict=True)]))


def calibration(mean: Tensor | np.ndarray, std: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> dict[str, float]:
    """How well a pixel-wise std predicts the error.

    Returns
    -------
    dict
        ``coverage_2sigma``: share of pixels with ``|error| ≤ 2·std``; ``spearman``: rank
        correlation of std with ``|error|``.
    """
    from scipy.stats import spearmanr

    err = np.abs(_np(mean) - _np(ref)).ravel()
    s = _np(std).ravel()
    rho = spearmanr(s, err).statistic if s.std() > 0 and err.std() > 0 else float("nan")
    return {"coverage_2sigma": float(np.mean(err <= 2 * s)), "spearman": float(rho)}
