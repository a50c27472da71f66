"""CT acquisition geometries for retrospective cases and simulations.

Builds the sinogram geometry dicts of :mod:`medrecon.datasets.sinogram` (angles in radians,
distances in mm) and the matching operators, so that ``medrecon reconstruct`` and
``medrecon simulate`` describe the same scanner the same way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medrecon.errors import SettingsError

__all__ = ["ct_geometry", "ct_case_operator", "fan_half_angle_rad", "sinogram_grid"]


def fan_half_angle_rad(image_shape: tuple[int, int], pixel_mm: float, source_to_isocenter_mm: float) -> float:
    """Half fan angle that just covers the image's circumscribed circle (plus one pixel)."""
    radius_mm = (0.5 * math.hypot(*image_shape) + 1) * pixel_mm
    if not source_to_isocenter_mm > radius_mm:
        raise SettingsError(
            f"fan beam: source_to_isocenter_mm must exceed the image's half-diagonal "
            f"({radius_mm:.4g} mm); got {source_to_isocenter_mm}"
        )
    return math.asin(radius_mm / source_to_isocenter_mm)


def ct_geometry(
    image_shape: tuple[int, int],
    pixel_mm: float,
    views: int,
    *,
    kind: str = "parallel",
    source_to_isocenter_mm: float = 541.0,
    source_to_detector_mm: float = 949.0,
) -> dict[str, Any]:
    """Sinogram geometry with ``views`` equally spaced views (parallel: [0, π); fan: [0, 2π)).

    Parameters
    ----------
    image_shape : (H, W)
    pixel_mm : float
        In-plane pixel size.
    views : int
    kind : {"parallel", "fan"}
        Fan beam uses an equiangular detector whose fan covers the image.

    Returns
    -------
    dict
        A geometry accepted by :func:`medrecon.datasets.sinogram.validate_geometry`.
    """
    if views < 1:
        raise SettingsError(f"ct_geometry(): views must be ≥ 1; got {views}")
    n_det = int(math.ceil(math.sqrt(2) * max(image_shape)))
    if kind == "parallel":
        return {
            "type": "parallel",
            "angles_rad": (np.arange(views) * math.pi / views).tolist(),
            "n_detectors": n_det,
            "detector_spacing_mm": pixel_mm,
        }
    if kind != "fan":
        raise SettingsError(f"ct_geometry(): kind must be 'parallel' or 'fan'; got {kind!r}")
    half_fan = fan_half_angle_rad(image_shape, pixel_mm, source_to_isocenter_mm)
    return {
        "type": "fan",
        "angles_rad": (np.arange(views) * 2 * math.pi / views).tolist(),
        "n_detectors": n_det,
        "detector": "equiangular",
        "detector_spacing_rad": 2 * half_fan / (n_det - 1),
        "source_to_isocenter_mm": source_to_isocenter_mm,
        "source_to_detector_mm": source_to_detector_mm,
    }


def ct_case_operator(
    image_shape: tuple[int, int],
    *,
    kind: str = "parallel",
    views: int = 23,
    angles_deg: tuple[float, ...] | None = None,
    limited_angle_deg: float | None = None,
    pixel_mm: float = 1.0,
    source_to_isocenter_mm: float = 541.0,
    source_to_detector_mm: float = 949.0,
) -> Any:
    """The sampling operator of a retrospective CT case.

    ``angles_deg`` (explicit view angles) wins over ``limited_angle_deg`` (the views of a full
    set within ``[0, range)``), which wins over ``views`` (equally spaced, a subset of a full set
    so that data consistency sees the full transform).  Parallel beam works in pixel units;
    fan beam takes distances in mm with ``pixel_mm``.
    """
    from medrecon.operators import FanBeamCT, ParallelBeamCT
    from medrecon.operators.masks import limited_angle_angles, sparse_view_angles

    if kind not in ("parallel", "fan"):
        raise SettingsError(f"geometry must be 'parallel' or 'fan'; got {kind!r}")
    period = math.pi if kind == "parallel" else 2 * math.pi
    if angles_deg is not None:
        if not angles_deg:
            raise SettingsError("angles: give at least one view angle")
        angles, mask = np.radians(np.asarray(angles_deg, dtype=np.float64)), None
    elif limited_angle_deg is not None:
        if not 0 < limited_angle_deg <= math.degrees(period):
            raise SettingsError(
                f"limited angle must be in (0, {math.degrees(period):g}] degrees; got {limited_angle_deg}"
            )
        n_full = 180 if kind == "parallel" else 360
        scale = period / math.pi  # the mask helpers work on [0, π)
        angles, mask = limited_angle_angles(math.radians(limited_angle_deg) / scale, n_full)
        angles = angles * scale
    else:
        if views < 1:
            raise SettingsError(f"views must be ≥ 1; got {views}")
        angles, mask = sparse_view_angles(int(views))
        angles = angles * (period / math.pi)
    if kind == "parallel":
        return ParallelBeamCT(image_shape, angles, view_mask=mask)
    return FanBeamCT(
        image_shape, angles, view_mask=mask, source_to_isocenter=source_to_isocenter_mm,
        source_to_detector=source_to_detector_mm, pixel_size=pixel_mm,
    )


def sinogram_grid(geometry: dict[str, Any], image_size: int | None = None) -> tuple[int, float]:
    """The reconstruction grid of a measured sinogram: ``(size, pixel_mm)`` of an N×N image.

    ``image_size`` (``--image-size``), else the geometry's ``image_size``, else the size whose
    diagonal the detector just covers (parallel: ⌊bins · bin width / pixel / √2⌋; fan:
    ⌊bins / √2⌋).  The pixel is the geometry's ``pixel_size_mm`` (default 1 mm).

    Examples
    --------
    >>> sinogram_grid({"type": "parallel", "n_detectors": 363})
    (256, 1.0)
    """
    pixel = float(geometry.get("pixel_size_mm") or 1.0)
    if image_size:
        return int(image_size), pixel
    if geometry.get("image_size"):
        return int(geometry["image_size"]), pixel
    n_det = int(geometry["n_detectors"])
    bin_px = float(geometry.get("detector_spacing_mm", 1.0)) / pixel
    return int(math.floor(n_det * (bin_px if geometry["type"] == "parallel" else 1.0) / math.sqrt(2))), pixel
