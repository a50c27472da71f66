"""Slice ordering and geometry checks for DICOM series (used by :mod:`medrecon.datasets.dicom`).

All coordinates here are DICOM LPS millimetres.  Column index ``i`` runs along the first
ImageOrientationPatient vector with spacing ``PixelSpacing[1]``; row index ``j`` along the
second with spacing ``PixelSpacing[0]``; slice index ``k`` along the measured step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medrecon.errors import InputError

__all__ = ["sort_slices", "dicom_affine_lps", "POSITION_TOL_MM"]

#: Two slices closer than this along the normal are at the same position.
POSITION_TOL_MM = 1e-3


def dicom_affine_lps(
    orientation: np.ndarray, spacing: tuple[float, float], position: np.ndarray, step: np.ndarray
) -> np.ndarray:
    """Affine mapping voxel ``(i, j, k)`` = (column, row, slice) to LPS mm.

    Parameters
    ----------
    orientation : ndarray, shape (6,)
        ImageOrientationPatient (row direction, column direction).
    spacing : (float, float)
        PixelSpacing (between rows, between columns) in mm.
    position : ndarray, shape (3,)
        ImagePositionPatient of the first slice (centre of its first voxel).
    step : ndarray, shape (3,)
        Vector from one slice to the next, mm.
    """
    a = np.eye(4)
    a[:3, 0] = orientation[:3] * spacing[1]
    a[:3, 1] = orientation[3:] * spacing[0]
    a[:3, 2] = step
    a[:3, 3] = position
    return a


def sort_slices(
    folder: Path, slices: list[Any], shape: tuple[int, int], min_slices: int, spacing_rtol: float
) -> tuple[list[Any], dict[str, Any]]:
    """Check one orientation and spacing, sort along the normal, measure tilt and gaps.

    Returns the sorted slices (duplicates still in, adjacent) and a geometry report with
    ``affine_lps``, ``tilt_deg``, ``gaps_mm``, ``uneven``, ``step_mm``.

    Raises
    ------
    InputError
        Missing or mixed orientations, mixed pixel spacings, slices at one depth but shifted
        in-plane, positions off one line, or fewer than ``min_slices`` distinct positions.
    """
    missing = [
        s
        for s in slices
        if not (np.all(np.isfinite(s.position)) and np.all(np.isfinite(s.orientation)))
    ]
    if missing and len(slices) > 1:
        raise InputError(
            missing[0].path,
            "ImagePositionPatient or ImageOrientationPatient missing; "
            "cannot order the slices of a multi-slice series",
        )
    if missing:
        s = slices[0]
        s.position, s.orientation = np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0])
    ori = slices[0].orientation
    distinct = {tuple(np.round(s.orientation, 3)) for s in slices}
    if any(np.max(np.abs(s.orientation - ori)) > 1e-3 for s in slices):
        raise InputError(
            folder,
            f"slices have {len(distinct)} different orientations "
            "(ImageOrientationPatient); not one volume",
        )
    sp = np.asarray(slices[0].spacing)
    for s in slices:
        if np.max(np.abs(np.asarray(s.spacing) - sp) / sp) > 1e-3:
            raise InputError(
                s.path, f"PixelSpacing {list(s.spacing)} differs from the series' {sp.tolist()}"
            )
    normal = np.cross(ori[:3], ori[3:])
    depth = np.array([s.position @ normal for s in slices])
    order = np.argsort(depth, kind="stable")
    slices = [slices[k] for k in order]
    depth = depth[order]
    uniq = [0]
    for k in range(1, len(slices)):
        if depth[k] - depth[uniq[-1]] < POSITION_TOL_MM:
            if np.linalg.norm(slices[k].position - slices[uniq[-1]].position) > 0.01:
                raise InputError(
                    slices[k].path,
                    "slice at the same depth as another but shifted in-plane; not one volume",
                )
        else:
            uniq.append(k)
    if len(uniq) < min_slices:
        raise InputError(
            folder, f"{len(uniq)} distinct slice position(s); at least {min_slices} needed"
        )
    pos = np.stack([slices[k].position for k in uniq])
    report: dict[str, Any] = {
        "tilt_deg": 0.0,
        "gaps_mm": [],
        "uneven": False,
        "missing_geometry": bool(missing),
    }
    if len(uniq) == 1:
        thick = slices[0].thickness if slices[0].thickness and slices[0].thickness > 0 else 1.0
        step = normal * thick
    else:
        step = (pos[-1] - pos[0]) / (len(uniq) - 1)
        along = depth[uniq] - depth[uniq[0]]
        pred = pos[0] + np.outer(along / (step @ normal), step)
        off = float(np.max(np.linalg.norm(pos - pred, axis=1)))
        if off > 0.1 + 0.01 * np.linalg.norm(step):
            raise InputError(
                folder,
                f"slice positions do not lie on one line (off by up to {off:.2f} mm); "
                "not one volume",
            )
        cos = abs(step @ normal) / np.linalg.norm(step)
        report["tilt_deg"] = float(np.degrees(np.arccos(min(1.0, cos))))
        gaps = np.diff(depth[uniq])
        report["gaps_mm"] = [round(float(g), 4) for g in gaps]
        med = float(np.median(gaps))
        report["uneven"] = bool(
            len(gaps) > 1 and np.max(np.abs(gaps - med)) > spacing_rtol * med + 1e-3
        )
    report["step_mm"] = float(np.linalg.norm(step))
    report["affine_lps"] = dicom_affine_lps(ori, tuple(sp), pos[0], step)
    return slices, report
