"""CT geometry conventions: build medrecon's projectors from geometries stated the ASTRA way.

medrecon's own convention is in :mod:`medrecon.operators.ct` (and drawn in docs/geometry.md).
ASTRA's 2D ``parallel`` and ``fanflat`` geometries, as its documentation states them
(https://astra-toolbox.com/docs/geom2d.html, "2D Geometries", the ``parallel_vec`` and
``fanflat_vec`` conversions there), in ASTRA's world coordinates ``(x, y)``:

* the volume is centred on the origin, columns along +x, rows along y with **row 0 at the
  largest y** (checked numerically against astra-toolbox 2.5: a pixel in row 2 of 16 projects
  to ``y = +5.5``); so the rotation centre is pixel ``((H − 1) / 2, (W − 1) / 2)``;
* parallel, angle a: rays along ``(sin a, −cos a)``, the detector's pixel 0 → 1 vector
  ``u = (cos a, sin a)·det_spacing``, detector centre on the origin;
* fanflat, angle a: source at ``(sin a, −cos a)·source_origin``, detector centre at
  ``(−sin a, cos a)·origin_det``, ``u = (cos a, sin a)·det_spacing``;
* pixel ``k`` of ``n`` sits at ``centre + (k − (n − 1)/2)·u``.

In medrecon's frame (``y`` = row, down on screen) the same geometry is: parallel — the same
angle and the same bin direction, with the middle bin at ``(n − 1)/2`` instead of ``n // 2``;
fanflat — source angle ``a + π`` with the bins reversed (medrecon's fan detector axis runs
opposite to ASTRA's).  Both turn counter-clockwise on screen.  :func:`ct_projector` applies
this, and the keys every convention shares: the detector's direction (``flip_detector``), the
rotation direction (``clockwise``: each angle is used as its negative) and the
centre-of-rotation offset (``detector_offset_bins``: the bin, from the detector's middle in the
file's own convention, that the ray through the rotation centre meets).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medrecon.errors import SettingsError
from medrecon.operators.ct import CTProjector, FanBeamCT, ParallelBeamCT

__all__ = ["CONVENTIONS", "ct_projector"]

CONVENTIONS = ("medrecon", "astra")


def ct_projector(
    kind: str,
    image_shape: tuple[int, int],
    angles_rad: Any,
    n_bins: int,
    detector_spacing: float,
    *,
    convention: str = "medrecon",
    detector: str = "flat",
    source_to_isocenter: float | None = None,
    source_to_detector: float | None = None,
    pixel_size: float = 1.0,
    detector_offset_bins: float = 0.0,
    flip_detector: bool = False,
    clockwise: bool = False,
    view_mask: Any = None,
    matrix_budget: int | None = None,
) -> CTProjector:
    """The medrecon projector of a CT geometry stated in ``convention``.

    Parameters
    ----------
    kind : {"parallel", "fan"}
    image_shape : (H, W)
        Reconstruction grid in pixels of ``pixel_size``.
    angles_rad : array-like, shape (n,)
        View (source) angles as the convention states them, radians (any real values).
    n_bins : int
    detector_spacing : float
        Bin width in the unit of ``pixel_size`` (parallel, flat fan), or radians (equiangular fan).
    convention : {"medrecon", "astra"}
        How the angles, the bins and the rotation centre are to be read (module docstring).
        ``"astra"`` has no equiangular fan: ASTRA's ``fanflat`` is flat.
    detector : {"flat", "equiangular"}
        Fan beam only.
    source_to_isocenter, source_to_detector : float
        Fan beam distances, in the unit of ``pixel_size``.
    detector_offset_bins : float
        The bin, counted from the middle of the detector in this convention (``n // 2``
        medrecon parallel, ``(n − 1)/2`` otherwise), that the ray through the rotation centre
        meets.
    flip_detector : bool
        The bins run the other way than the convention says.
    clockwise : bool
        The angles turn clockwise on screen (row 0 at the top): each angle is used as its
        negative.
    view_mask, matrix_budget
        Passed to the projector.

    Returns
    -------
    ParallelBeamCT or FanBeamCT

    Examples
    --------
    >>> A = ct_projector("fan", (32, 32), [0.0, 1.0], 50, 1.0, convention="astra",
    ...                  source_to_isocenter=100.0, source_to_detector=150.0)
    >>> A.flip_detector, round(float(A.full_angles[0]), 6) == round(math.pi, 6), A.center
    (True, True, (15.5, 15.5))
    """
    if convention not in CONVENTIONS:
        raise SettingsError(f"convention must be one of {', '.join(CONVENTIONS)}; got {convention!r}")
    if kind not in ("parallel", "fan"):
        raise SettingsError(f"geometry type must be 'parallel' or 'fan'; got {kind!r}")
    h, w = (int(v) for v in image_shape)
    a = np.asarray(angles_rad, dtype=np.float64).reshape(-1)
    if clockwise:
        a = -a
    flip = bool(flip_detector)
    center = None
    middle = n_bins // 2 if kind == "parallel" else (n_bins - 1) / 2
    if convention == "astra":
        if kind == "fan" and detector != "flat":
            raise SettingsError("convention 'astra': ASTRA's fan beam (fanflat) has a flat detector; "
                                f"got detector {detector!r}")
        center = ((h - 1) / 2, (w - 1) / 2)
        given_middle = (n_bins - 1) / 2
        if kind == "fan":
            a = a + math.pi
            flip = not flip
    else:
        given_middle = middle
    offset = float(detector_offset_bins) + given_middle - middle
    a = np.mod(a, 2 * math.pi)
    a = np.where(a >= 2 * math.pi, 0.0, a)  # -1e-17 mod 2π rounds up to 2π
    if kind == "parallel":
        return ParallelBeamCT((h, w), a, view_mask=view_mask, n_bins=n_bins,
                              detector_spacing=detector_spacing / pixel_size, detector_offset=offset,
                              flip_detector=flip, center=center, matrix_budget=matrix_budget)
    if source_to_isocenter is None or source_to_detector is None:
        raise SettingsError("fan beam needs source_to_isocenter and source_to_detector")
    return FanBeamCT((h, w), a, source_to_isocenter=source_to_isocenter, source_to_detector=source_to_detector,
                     n_bins=n_bins, detector_spacing=detector_spacing, detector=detector, view_mask=view_mask,
                     pixel_size=pixel_size, detector_offset=offset, flip_detector=flip, center=center,
                     matrix_budget=matrix_budget)
