"""The three data types that cross medrecon's I/O boundary: Volume, KSpace and Sinogram.

Conventions
-----------
* ``Volume.array`` is ``(Z, Y, X)`` = (slice, row, column).  ``Volume.affine`` is a 4×4 matrix in
  the NIfTI RAS+ convention, in millimetres: it maps the voxel index ``(i, j, k, 1)`` with
  ``i`` = column (X), ``j`` = row (Y), ``k`` = slice (Z) -- the element ``array[k, j, i]`` -- to
  patient coordinates where +x points to the patient's Right, +y to Anterior and +z to
  Superior.  DICOM uses LPS (+x Left, +y Posterior, +z Superior); readers convert with
  ``LPS_TO_RAS @ affine_lps`` (``LPS_TO_RAS = diag(-1, -1, 1, 1)``) and writers convert back.
  For NIfTI files this is the file's own affine with the array transposed to ``(X, Y, Z)``.
* CT volumes are in Hounsfield units; MR volumes in the scanner's (arbitrary) magnitude scale.
* ``KSpace.data`` is ``(coils, Z, ky, kx)`` complex; ``KSpace.mask`` is boolean ``(1 or Z, ky,
  kx)`` (True = sampled); ``KSpace.coil_maps`` is ``(coils, Z, ky, kx)`` complex or None.
  Raw scanner data (twix, MRD) also carry ``KSpace.noise`` (``(coils, samples)``, the noise
  scan) and ``KSpace.calibration`` (``(coils, Z, ky, kx)``, the parallel-imaging reference lines,
  zeros elsewhere); their rows are phase encoding and their columns readout
  (``header["readout_axis"] = -1``), whereas fastMRI files keep readout along the rows.
* ``Sinogram.data`` is ``(Z, views, bins)``; ``Sinogram.geometry`` is the dict described in
  :mod:`medrecon.datasets.sinogram`.

``meta`` and ``header`` may hold patient identifiers (needed to write a derived DICOM series into
the same study); they are never shown by ``repr`` and must never be logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medrecon.errors import ShapeError

__all__ = ["Volume", "KSpace", "Sinogram", "LPS_TO_RAS", "GeometryWarning"]

#: Multiply a DICOM LPS affine from the left by this to get a NIfTI RAS+ affine (and back).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class GeometryWarning(UserWarning):
    """Geometry that a file format cannot hold exactly (values in the message)."""


def _check_affine(affine: Any, where: str) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ShapeError(f"{where}: affine must be a finite 4x4 matrix; got shape {a.shape}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ShapeError(f"{where}: affine is singular (zero voxel size or collinear axes)")
    return a


@dataclass(eq=False)
class Volume:
    """A 3-D image with its geometry.

    Parameters
    ----------
    array : ndarray, shape (Z, Y, X), real
        Voxel values (HU for CT).  A single slice is ``Z = 1``.
    affine : ndarray, shape (4, 4)
        Voxel index ``(x, y, z)`` → RAS+ millimetres (see the module docstring).
    modality : str
        ``"CT"``, ``"MR"`` or ``"OT"`` (other / unknown).
    meta : dict
        What a writer needs to produce a derived DICOM series (patient / study identifiers,
        frame of reference, slice positions, ...).  Never logged.
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    modality: str = "OT"
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or 0 in arr.shape:
            raise ShapeError(
                f"Volume: array must be (Z, Y, X) and non-empty; got shape {arr.shape}"
            )
        if np.iscomplexobj(arr):
            raise ShapeError(f"Volume: array must be real; got {arr.dtype}")
        self.array = arr
        self.affine = _check_affine(self.affine, "Volume")
        self.modality = str(self.modality).upper() or "OT"

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(Z, Y, X)``."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size ``(z, y, x)`` in mm: lengths of the affine's columns."""
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(n[2]), float(n[1]), float(n[0]))

    def voxel_to_ras(self, zyx: Any) -> np.ndarray:
        """Map array indices ``(z, y, x)`` (shape (..., 3)) to RAS+ mm (shape (..., 3))."""
        idx = np.asarray(zyx, dtype=np.float64)[..., ::-1]
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing_mm)
        return f"Volume(shape={self.shape}, dtype={self.array.dtype}, modality={self.modality!r}, spacing_mm=({sp}))"


@dataclass(eq=False)
class KSpace:
    """Multi-coil Cartesian k-space.

    Parameters
    ----------
    data : ndarray, shape (coils, Z, ky, kx), complex
        Measured samples (zeros where not sampled).  Centred orthonormal FFT convention.
    mask : ndarray, shape (1 or Z, ky, kx), bool, optional
        Sampling pattern; None means "non-zero samples" (derived from ``data``).
    coil_maps : ndarray, shape (coils, Z, ky, kx), complex, optional
        Coil sensitivities in image space.
    header : dict
        Acquisition parameters (e.g. ``ismrmrd_header`` text, fastMRI attributes; raw scanner
        files: ``header["raw"]``, see :mod:`medrecon.datasets.readouts`).
    noise : ndarray, shape (coils, samples), complex, optional
        Samples of a noise scan (no RF), for coil noise prewhitening.
    calibration : ndarray, shape (coils, Z, ky, kx), complex, optional
        Parallel-imaging calibration (reference) lines on the same grid as ``data``, zeros
        elsewhere; lines measured both for calibration and imaging are in ``data`` too.
    """

    data: np.ndarray
    mask: np.ndarray | None = None
    coil_maps: np.ndarray | None = None
    header: dict[str, Any] = field(default_factory=dict, repr=False)
    noise: np.ndarray | None = field(default=None, repr=False)
    calibration: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        d = np.asarray(self.data)
        if d.ndim != 4 or 0 in d.shape:
            raise ShapeError(f"KSpace: data must be (coils, Z, ky, kx); got shape {d.shape}")
        if not np.iscomplexobj(d):
            d = d.astype(np.complex64)
        self.data = d
        if self.mask is None:
            self.mask = np.any(d != 0, axis=0)
        m = np.asarray(self.mask)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[1:] != d.shape[2:] or m.shape[0] not in (1, d.shape[1]):
            raise ShapeError(
                f"KSpace: mask must be (ky, kx) or (1 or Z, ky, kx) = {(d.shape[1],) + d.shape[2:]};"
                f" got shape {np.asarray(self.mask).shape}"
            )
        self.mask = m.astype(bool)
        if self.coil_maps is not None:
            c = np.asarray(self.coil_maps)
            if c.shape != d.shape:
                raise ShapeError(
                    f"KSpace: coil_maps must have the data shape {d.shape}; got {c.shape}"
                )
            self.coil_maps = c
        if self.noise is not None:
            n = np.asarray(self.noise)
            if n.ndim != 2 or n.shape[0] != d.shape[0] or n.shape[1] == 0:
                raise ShapeError(
                    f"KSpace: noise must be (coils={d.shape[0]}, samples); got shape {n.shape}"
                )
            self.noise = n if np.iscomplexobj(n) else n.astype(np.complex64)
        if self.calibration is not None:
            c = np.asarray(self.calibration)
            if c.shape != d.shape:
                raise ShapeError(
                    f"KSpace: calibration must have the data shape {d.shape}; got {c.shape}"
                )
            self.calibration = c

    @property
    def n_coils(self) -> int:
        """Number of receive coils."""
        return int(self.data.shape[0])

    def __repr__(self) -> str:
        frac = float(self.mask.mean()) if self.mask is not None else 1.0
        return f"KSpace(shape={self.data.shape}, dtype={self.data.dtype}, sampled={frac:.3f}, coil_maps={self.coil_maps is not None})"


@dataclass(eq=False)
class Sinogram:
    """Projection data with its acquisition geometry.

    Parameters
    ----------
    data : ndarray, shape (Z, views, bins), real
        Line integrals (units in ``geometry["units"]``).
    geometry : dict
        See :func:`medrecon.datasets.sinogram.validate_geometry`.
    """

    data: np.ndarray
    geometry: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from medrecon.datasets.sinogram import validate_geometry

        d = np.asarray(self.data)
        if d.ndim == 2:
            d = d[None]
        if d.ndim != 3 or 0 in d.shape or np.iscomplexobj(d):
            raise ShapeError(
                f"Sinogram: data must be real (Z, views, bins); got shape {d.shape} {d.dtype}"
            )
        self.data = d
        self.geometry = validate_geometry(self.geometry, n_views=d.shape[1], n_bins=d.shape[2])

    def __repr__(self) -> str:
        return f"Sinogram(shape={self.data.shape}, type={self.geometry.get('type')!r})"
