"""Retrospective thinning of measured data (the full data becomes the reference).

Physicists evaluate sparse-view CT and accelerated MRI on real scans by thinning fully
measured data and reconstructing the full data as the reference.  These functions do the
thinning and nothing else, so that every measured-data path shares them:

* :func:`thin_view_indices`: which views of a measured sinogram to keep (``views`` equally
  spaced, every ``view_step``-th, those within ``limited_angle_deg`` of the first);
* :func:`thin_sinogram`: those views, each with its own angle (the rest of the geometry kept);
* :func:`thin_measured_kspace`: the phase-encode lines of an ``mri_mask`` drawn over fully
  sampled k-space (raw scanner files, fastMRI, BART, MATLAB).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from medrecon.datasets.sinogram import select_views
from medrecon.datasets.types import KSpace, Sinogram
from medrecon.errors import SettingsError

__all__ = ["thin_view_indices", "thin_sinogram", "thin_measured_kspace"]


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


def thin_measured_kspace(
    kspace: KSpace,
    acceleration: float,
    mask: str = "equispaced",
    center_fraction: float = 0.08,
    seed: int = 0,
) -> KSpace:
    """Keep only the phase-encode lines of an ``mri_mask`` drawn over a fully sampled k-space.

    Parameters
    ----------
    kspace : KSpace
        Measured k-space whose every phase-encode line was measured (a partial-Fourier side that
        was not measured stays unmeasured).  The phase-encode axis is the one that is not the
        readout (:func:`medrecon.datasets.raw_steps.readout_axis`).
    acceleration, mask, center_fraction, seed
        As :func:`medrecon.operators.mri_mask` (``mask`` names the pattern).

    Returns
    -------
    KSpace
        The same data with the dropped lines zeroed, ``mask`` the kept samples (one pattern for
        every slice), no calibration lines (the kept centre is the calibration), and
        ``header["thinning"]`` = ``{"acceleration", "mask", "center_fraction", "seed", "lines_kept",
        "lines", "how": "retrospective on measured data"}``.

    Raises
    ------
    SettingsError
        The k-space is already undersampled along the phase-encode axis.
    """
    from medrecon.datasets.raw_steps import readout_axis
    from medrecon.operators import mri_mask

    read = readout_axis(kspace)
    phase = -1 if read == -2 else -2
    m = np.broadcast_to(kspace.mask, kspace.data.shape[1:])
    lines = m.any(axis=read)  # (Z, phase lines)
    if not lines.all():
        raise SettingsError(
            f"--acceleration: retrospective thinning needs a fully sampled scan; this one has "
            f"{int(lines[0].sum())} of {lines.shape[1]} phase-encode lines measured"
        )
    n_read, n_phase = kspace.data.shape[read], kspace.data.shape[phase]
    keep = (
        mri_mask(mask, (n_read, n_phase), acceleration, center_fraction, seed=seed)
        .numpy()
        .astype(bool)
    )
    keep = keep.any(axis=0)  # fastMRI-style masks select columns: one flag per phase-encode line
    shape = [1, 1, 1]
    shape[phase] = n_phase
    new_mask = m[:1] & keep.reshape(shape)
    data = np.where(new_mask[None], kspace.data, 0).astype(kspace.data.dtype)
    header = {
        **kspace.header,
        "thinning": {
            "acceleration": float(acceleration),
            "mask": mask,
            "center_fraction": float(center_fraction),
            "seed": int(seed),
            "lines_kept": int(keep.sum()),
            "lines": int(n_phase),
            "how": "retrospective on measured data",
        },
    }
    return replace(
        kspace, data=data, mask=new_mask, calibration=None, coil_maps=None, header=header
    )
