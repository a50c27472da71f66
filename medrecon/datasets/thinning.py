"""Retrospective thinning of measured, fully sampled k-space (the full scan becomes the reference).

One function, :func:`thin_measured_kspace`, so that the other measured-data paths can share it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from medrecon.datasets.types import KSpace
from medrecon.errors import SettingsError

__all__ = ["thin_measured_kspace"]


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
