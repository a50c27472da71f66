"""How a slice of a volume is shown: the usual viewer layout from the volume's affine.

One rule for every picture of a volume (:mod:`medrecon.report`'s figures) and for the axial
training slices taken from volumes (:func:`medrecon.datasets.training.axial_display_slices`):
axial slices with anterior up and the patient's right on the viewer's left (radiological),
coronal ones with superior up, sagittal ones with superior up and anterior on the left.
"""

from __future__ import annotations

import numpy as np

__all__ = ["display_orientation", "orient_for_display"]


#: screen directions (right, down) in RAS+ world coordinates for the three slice planes, by the
#: world axis closest to the slice normal: radiological convention (patient's right on the
#: viewer's left), anterior up on axial slices, superior up on coronal and sagittal ones
#: (anterior on the left of sagittal slices)
_SCREEN = {2: ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),  # axial
           1: ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),  # coronal
           0: ((0.0, -1.0, 0.0), (0.0, 0.0, -1.0))}  # sagittal


def display_orientation(affine: np.ndarray) -> tuple[bool, bool, bool, float]:
    """How to show a slice ``array[z][y, x]`` of a volume with ``affine`` in the usual viewer layout.

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        RAS+ voxel-to-world affine of the volume, columns for the x, y and z array axes
        (:class:`~medrecon.datasets.Volume`).

    Returns
    -------
    transpose, flip_rows, flip_cols : bool
        Apply in this order (:func:`orient_for_display`).  Axial slices are shown with anterior
        up and the patient's right on the left (radiological), coronal ones with superior up,
        sagittal ones with superior up and anterior on the left.
    aspect : float
        Height / width of a displayed pixel (its spacing along screen rows over columns).

    Examples
    --------
    >>> import numpy as np
    >>> display_orientation(np.diag([1.0, 1.0, 1.0, 1.0]))  # RAS-stored axial: flip both axes
    (False, True, True, 1.0)
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    col, row = a[:, 0], a[:, 1]
    col_mm, row_mm = float(np.linalg.norm(col)) or 1.0, float(np.linalg.norm(row)) or 1.0
    col, row = col / col_mm, row / row_mm
    normal = int(np.argmax(np.abs(np.cross(col, row))))
    right, down = (np.asarray(v) for v in _SCREEN[normal])
    transpose = abs(float(row @ right)) > abs(float(col @ right))
    across, along = (row, col) if transpose else (col, row)  # array axes shown as screen x, y
    aspect = (col_mm / row_mm) if transpose else (row_mm / col_mm)
    return transpose, float(along @ down) < 0, float(across @ right) < 0, aspect


def orient_for_display(image: np.ndarray, affine: np.ndarray | None) -> tuple[np.ndarray, float]:
    """``image`` (H, W) turned as :func:`display_orientation` says, and its pixel aspect.

    ``affine=None`` (images without patient geometry: image folders, k-space, raw sinograms):
    the image as stored, aspect 1.
    """
    img = np.asarray(image)
    if affine is None:
        return img, 1.0
    transpose, flip_rows, flip_cols, aspect = display_orientation(affine)
    if transpose:
        img = img.T
    if flip_rows:
        img = img[::-1]
    if flip_cols:
        img = img[:, ::-1]
    return img, aspect
