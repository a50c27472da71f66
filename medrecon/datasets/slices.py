"""Exact slice positions of a Volume, and slice subsets that keep them.

A :class:`~medrecon.datasets.types.Volume` holds one affine, which places slices at equal steps.
A DICOM series can be unevenly spaced; :func:`medrecon.datasets.load_dicom_series` then builds the
affine from the first and last slice (mean step) and keeps each slice's exact
ImagePositionPatient in ``meta["dicom"]["slice_positions_lps"]`` (DICOM LPS, mm, in array order).

* :func:`slice_positions_lps` gives the exact position of every slice (the recorded ones when
  they belong to this volume, else the affine's);
* :func:`subset_volume` selects slices (and block-averages in-plane) so that the subset carries
  its own exact positions: its affine runs from its own first to its own last slice, and the
  recorded positions, SOP Instance UIDs and spacing report are cut to the same slices.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from medrecon.datasets.types import LPS_TO_RAS, Volume
from medrecon.errors import SettingsError

__all__ = ["slice_positions_lps", "uneven_spacing", "subset_volume"]

#: Recorded positions belong to a volume when its affine puts the first and last slice within this.
_ENDS_TOL_MM = 1e-2
#: Gaps that differ from the median gap by more than this fraction are uneven (as the DICOM reader).
_SPACING_RTOL = 0.01


def slice_positions_lps(volume: Volume) -> tuple[np.ndarray, bool]:
    """The position of every slice's first voxel, DICOM LPS mm.

    Parameters
    ----------
    volume : Volume
        Any volume; ``meta["dicom"]["slice_positions_lps"]`` is used when it has one row per slice
        and its first and last rows agree with the affine (so it was not left over from another
        geometry).

    Returns
    -------
    positions : ndarray, shape (Z, 3)
        ImagePositionPatient of each slice, in array order.
    recorded : bool
        True when the positions are the recorded (exact) ones, False when they come from the
        affine.
    """
    aff = LPS_TO_RAS @ volume.affine
    nz = volume.shape[0]
    from_affine = aff[:3, 3] + np.outer(np.arange(nz), aff[:3, 2])
    rec = volume.meta.get("dicom", {}).get("slice_positions_lps")
    if rec is not None:
        rec = np.asarray(rec, dtype=np.float64)
        if (
            rec.shape == (nz, 3)
            and np.all(np.isfinite(rec))
            and np.allclose(rec[[0, -1]], from_affine[[0, -1]], atol=_ENDS_TOL_MM)
        ):
            return rec, True
    return from_affine, False


def uneven_spacing(volume: Volume) -> dict[str, float] | None:
    """How far one affine is from the exact slice positions; None when it describes them.

    Returns
    -------
    dict or None
        ``gap_min_mm``, ``gap_max_mm`` (distances between neighbouring slices),
        ``step_mm`` (the affine's step) and ``max_offset_mm`` (the largest distance between a
        slice's exact position and where the affine puts it); None when every slice is within
        0.01 mm of the affine (or there are fewer than three slices).
    """
    pos, recorded = slice_positions_lps(volume)
    if not recorded or len(pos) < 3:
        return None
    aff = LPS_TO_RAS @ volume.affine
    ideal = aff[:3, 3] + np.outer(np.arange(len(pos)), aff[:3, 2])
    offset = float(np.max(np.linalg.norm(pos - ideal, axis=1)))
    if offset <= _ENDS_TOL_MM:
        return None
    gaps = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    return {
        "gap_min_mm": float(gaps.min()),
        "gap_max_mm": float(gaps.max()),
        "step_mm": float(np.linalg.norm(aff[:3, 2])),
        "max_offset_mm": offset,
    }


def subset_volume(volume: Volume, slices: slice | None = None, downsample: int = 1) -> Volume:
    """Select slices and block-average in-plane, keeping every slice's exact position.

    Parameters
    ----------
    volume : Volume
        Input (Z, Y, X).
    slices : slice, optional
        Which slices to keep (any Python slice of ``range(Z)``, steps included); None keeps all.
    downsample : int
        In-plane block averaging factor (1 = none); the voxel centres move to the block centres.

    Returns
    -------
    Volume
        The subset.  Its affine maps its first slice to that slice's exact position and steps
        to its own last slice (so a subset of an unevenly spaced series is placed by its own
        slices, not by the whole series' mean step); ``meta["dicom"]`` keeps the exact position
        and SOP Instance UID of each kept slice and the new pixel spacing; ``meta["geometry"]``
        the subset's gaps and ``uneven`` flag.

    Raises
    ------
    SettingsError
        ``slices`` selects nothing, ``downsample`` < 1 or larger than the image.

    Examples
    --------
    >>> import numpy as np
    >>> vol = Volume(np.zeros((5, 4, 4)), np.diag([1.0, 1.0, 2.0, 1.0]))
    >>> sub = subset_volume(vol, slice(2, 4))
    >>> sub.shape, float(sub.affine[2, 3])
    ((2, 4, 4), 4.0)
    """
    s = slice(None) if slices is None else slices
    idx = np.arange(volume.shape[0])[s]
    if idx.size == 0:
        raise SettingsError(f"subset_volume(): slices {s} select nothing of {volume.shape[0]}")
    f = int(downsample)
    if f < 1:
        raise SettingsError(f"downsample must be ≥ 1; got {downsample}")
    arr = np.asarray(volume.array)[idx].astype(np.float32)
    if f > 1:
        z, h, w = arr.shape
        if h < f or w < f:
            raise SettingsError(f"downsample {f} is larger than the image ({h}×{w})")
        arr = arr[:, : h // f * f, : w // f * f].reshape(z, h // f, f, w // f, f).mean(axis=(2, 4))
    pos_all, recorded = slice_positions_lps(volume)
    aff_lps = LPS_TO_RAS @ volume.affine
    shift = (f - 1) / 2 * (aff_lps[:3, 0] + aff_lps[:3, 1])  # first voxel → first block's centre
    pos = pos_all[idx] + shift
    new = aff_lps.copy()
    new[:3, :2] *= f
    new[:3, 3] = pos[0]
    if len(idx) > 1:
        new[:3, 2] = (pos[-1] - pos[0]) / (len(idx) - 1)
    meta = copy.deepcopy(volume.meta)
    dic = meta.get("dicom")
    if isinstance(dic, dict):
        if recorded or "slice_positions_lps" in dic:
            dic["slice_positions_lps"] = pos.tolist()
        uids = dic.get("sop_instance_uids")
        if isinstance(uids, list) and len(uids) == volume.shape[0]:
            dic["sop_instance_uids"] = [uids[k] for k in idx]
        if f > 1 and dic.get("pixel_spacing_mm"):
            dic["pixel_spacing_mm"] = [float(v) * f for v in dic["pixel_spacing_mm"]]
    if isinstance(meta.get("geometry"), dict):
        meta["geometry"].update(_gap_report(pos, new))
    return Volume(arr, LPS_TO_RAS @ new, volume.modality, meta)


def _gap_report(pos: np.ndarray, aff_lps: np.ndarray) -> dict[str, Any]:
    """Gaps along the slice normal and the uneven flag, as :func:`load_dicom_series` reports them."""
    normal = np.cross(aff_lps[:3, 0], aff_lps[:3, 1])
    normal /= np.linalg.norm(normal)
    gaps = np.abs(np.diff(pos @ normal))
    med = float(np.median(gaps)) if gaps.size else 0.0
    uneven = bool(gaps.size > 1 and np.max(np.abs(gaps - med)) > _SPACING_RTOL * med + 1e-3)
    return {
        "gaps_mm": [round(float(g), 4) for g in gaps],
        "uneven": uneven,
        "step_mm": float(np.linalg.norm(aff_lps[:3, 2])),
        "slice_positions_lps": pos.tolist(),
    }
