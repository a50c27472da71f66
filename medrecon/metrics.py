"""Image-quality metrics: PSNR, SSIM (also inside a CT display window) and uncertainty calibration.

PSNR and SSIM need the images' value range (``data_range``).  It defaults to 1.0 only for a
reference inside [0, 1] (normalised images); a reference in other units (HU, raw MRI magnitudes)
raises a :class:`~medrecon.errors.SettingsError` asking for ``data_range`` instead of returning a
meaningless number.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from medrecon.errors import SettingsError

__all__ = ["psnr", "ssim", "window", "SOFT_TISSUE_HU", "calibration"]

#: soft-tissue display window W400 / L40, as (low, high) in HU
SOFT_TISSUE_HU = (-160.0, 240.0)


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return np.abs(a) if np.iscomplexobj(a) else a.astype(np.float64)


def window(x: Tensor | np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to ``[low, high]`` and map to ``[0, 1]`` (a display window)."""
    return (np.clip(_np(x), low, high) - low) / (high - low)


def _data_range(ref: np.ndarray, data_range: float | None, who: str) -> float:
    """The explicit ``data_range``, or 1.0 for a reference inside [0, 1]; otherwise an error."""
    if data_range is not None:
        if not np.isfinite(data_range) or data_range <= 0:
            raise SettingsError(f"{who}(): data_range must be a positive number; got {data_range!r}")
        return float(data_range)
    lo, hi = float(np.min(ref)), float(np.max(ref))
    if lo < 0.0 or hi > 1.0:
        raise SettingsError(
            f"{who}(): the reference spans [{lo:.4g}, {hi:.4g}], not [0, 1]; pass data_range "
            f"(e.g. 4096 for CT in HU, or the reference's max − min = {hi - lo:.4g}), or normalise both images"
        )
    return 1.0


def psnr(x: Tensor | np.ndarray, ref: Tensor | np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range² / MSE)``.

    Parameters
    ----------
    x, ref : Tensor or ndarray, same shape
        Image and reference (complex values: their magnitude).
    data_range : float, optional
        The peak: the span of values the images can take, in their units (4096 for CT in HU
        over the window [−1024, 3072), 1.0 for images normalised to [0, 1]).  Default: 1.0 when
        the reference lies inside [0, 1]; any other reference needs it given explicitly.

    Returns
    -------
    float
        PSNR in dB (``inf`` for identical images).

    Raises
    ------
    SettingsError
        ``data_range`` omitted for a reference outside [0, 1] (e.g. HU images, which would
        otherwise score about −37 dB), or not a positive number.

    Examples
    --------
    >>> import numpy as np
    >>> ref = np.array([[-1000.0, 40.0], [40.0, 700.0]])
    >>> round(psnr(ref + 10.0, ref, data_range=4096), 2)
    52.25
    """
    a, b = _np(x), _np(ref)
    peak = _data_range(b, data_range, "psnr")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def ssim(x: Tensor | np.ndarray, ref: Tensor | np.ndarray, data_range: float | None = None) -> float:
    """Mean structural similarity (scikit-image, 7×7 window) over the last two axes, averaged over slices.

    ``data_range`` works as in :func:`psnr`: default 1.0 for a reference inside [0, 1], otherwise
    it must be given.
    """
    from skimage.metrics import structural_similarity

    a, b = _np(x), _np(ref)
    peak = _data_range(b, data_range, "ssim")
    a2 = a.reshape(-1, *a.shape[-2:])
    b2 = b.reshape(-1, *b.shape[-2:])
    return float(np.mean([structural_similarity(p, q, data_range=peak) for p, q in zip(a2, b2, strict=True)]))


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
