"""Retrospective subsampling of measured data: fewer views of a sinogram, a mask on k-space.

Physicists evaluate sparse-view CT and accelerated MRI on real scans by thinning fully
measured data and reconstructing the full data as the reference.  These functions do the
thinning and nothing else, so readers of other formats (Siemens twix, MRD) can use them:

* :func:`thin_view_indices`: which views of a measured sinogram to keep (``views`` equally
  spaced, every ``view_step``-th, those within ``limited_angle_deg`` of the first);
* :func:`thin_sinogram`: those views, each with its own angle (the rest of the geometry kept);
* :func:`undersample_kspace`: zero the samples a mask leaves out of fully sampled k-space.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from medrecon.datasets.sinogram import select_views
from medrecon.datasets.types import KSpace, Sinogram
from medrecon.errors import SettingsError

__all__ = ["thin_view_indices", "thin_sinogram", "undersample_kspace", "is_fully_sampled"]


def thin_view_indices(
    angles_rad: Any,
    *,
    views: int | None = None,
    view_step: int | None = None,
    limited_angle_deg: float | None = None,
) -> np.ndarray:
    """Indices of the measured views to keep, in acquisition order.

    Parameters
    ----------
    angles_rad : array-like, shape (n,)
        The measured views' angles, in acquisition order.
    views : int, optional
        Keep this many, equally spaced in acquisition order: view ``⌊k·n/views⌋`` for
        ``k = 0 … views−1`` (for an evenly spaced scan, equally spaced in angle).
    view_step : int, optional
        Keep every ``view_step``-th view, starting with the first.
    limited_angle_deg : float, optional
        Keep only the views within this many degrees of the first, in the direction the scan
        turns (applied first; ``views`` / ``view_step`` then thin what is left).

    Returns
    -------
    ndarray of int

    Raises
    ------
    SettingsError
        Both ``views`` and ``view_step``, values out of range, or a selection with no view.

    Examples
    --------
    >>> angles = np.radians(np.arange(0, 360, 0.5))          # 720 views over 360°
    >>> thin_view_indices(angles, views=4).tolist()
    [0, 180, 360, 540]
    >>> thin_view_indices(angles, limited_angle_deg=90, view_step=45).tolist()
    [0, 45, 90, 135]
    """
    a = np.asarray(angles_rad, dtype=np.float64).reshape(-1)
    n = a.size
    if views is not None and view_step is not None:
        raise SettingsError("thinning: give --views or --view-step, not both")
    keep = np.arange(n)
    if limited_angle_deg is not None:
        if not 0 < limited_angle_deg <= 360:
            raise SettingsError(f"--limited-angle must be in (0, 360] degrees; got {limited_angle_deg:g}")
        turn = np.unwrap(a) - a[0]
        if n > 1 and turn[-1] < 0:  # the scan turns towards smaller angles
            turn = -turn
        keep = keep[turn < math.radians(limited_angle_deg) - 1e-9]
    m = keep.size
    if views is not None:
        if not 1 <= views <= m:
            raise SettingsError(f"--views {views}: the data have {m} views" +
                                (" within the limited angle" if limited_angle_deg is not None else "") +
                                f"; choose 1 to {m}")
        keep = keep[(np.arange(views) * m) // views]
    if view_step is not None:
        if not 1 <= view_step <= max(1, m):
            raise SettingsError(f"--view-step {view_step}: must be between 1 and the {m} views there are")
        keep = keep[::view_step]
    if keep.size == 0:
        raise SettingsError("thinning selects no view")
    return keep


def thin_sinogram(sinogram: Sinogram, **selection: Any) -> tuple[Sinogram, np.ndarray]:
    """The views :func:`thin_view_indices` selects, each with its own geometry.

    Returns
    -------
    (Sinogram, ndarray)
        The thinned sinogram and the indices of the kept views.
    """
    idx = thin_view_indices(sinogram.geometry["angles_rad"], **selection)
    return select_views(sinogram, idx), idx


def is_fully_sampled(kspace: KSpace, min_fraction: float = 0.95) -> bool:
    """Whether at least ``min_fraction`` of the k-space grid was measured (its mask)."""
    return float(np.asarray(kspace.mask).mean()) >= min_fraction


def undersample_kspace(kspace: KSpace, mask: Any) -> KSpace:
    """Keep only the samples ``mask`` selects of fully sampled k-space (retrospective undersampling).

    Parameters
    ----------
    kspace : KSpace
        Measured k-space, ``data`` (coils, Z, ky, kx), fully sampled (:func:`is_fully_sampled`).
    mask : array-like of bool, shape (ky, kx) or (Z, ky, kx)
        The sampling pattern (e.g. :func:`medrecon.operators.mri_mask`; a torch tensor is fine).

    Returns
    -------
    KSpace
        The same k-space with zeros where ``mask`` is False, ``mask`` as its mask, and
        ``header["retrospective_mask"]`` saying what was done.

    Raises
    ------
    SettingsError
        The data are not fully sampled, or the mask's shape does not fit.

    Examples
    --------
    >>> k = KSpace(np.ones((2, 1, 4, 4), np.complex64))
    >>> m = np.zeros((4, 4), bool); m[:, ::2] = True
    >>> undersample_kspace(k, m).data[0, 0].real.tolist()[0]
    [1.0, 0.0, 1.0, 0.0]
    """
    m = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask).astype(bool)
    grid = kspace.data.shape[2:]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1:] != grid or m.shape[0] not in (1, kspace.data.shape[1]):
        raise SettingsError(f"undersample_kspace(): the mask must be (ky, kx) = {grid} or (Z, ky, kx); got "
                            f"shape {np.asarray(mask).shape}")
    if not is_fully_sampled(kspace):
        raise SettingsError(f"undersample_kspace(): the k-space is not fully sampled ({float(kspace.mask.mean()):.0%} "
                            "of the grid measured); retrospective undersampling needs fully sampled data")
    data = kspace.data * m[None]
    header = {**kspace.header, "retrospective_mask": {"sampled_fraction": round(float(m.mean()), 4),
                                                       "of_measured_fraction": round(float(kspace.mask.mean()), 4)}}
    return replace(kspace, data=data, mask=m & np.asarray(kspace.mask), header=header)
