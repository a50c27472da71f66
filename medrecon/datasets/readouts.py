"""Raw scanner readouts → :class:`~medrecon.datasets.types.KSpace`: the part the twix and MRD readers share.

A reader (:mod:`medrecon.datasets.twix`, :mod:`medrecon.datasets.mrd`) turns each acquisition of its
file into a :class:`Readout` (samples of every coil plus the counters and flags that say where it
belongs), and :func:`assemble_kspace` puts them on the Cartesian grid:

* rows are phase encoding (the line counter), columns readout (``header["readout_axis"] = -1``);
  the grid is centred on the k-space centre the header gives (``centre_line``, the readout's
  centre sample), so a centred FFT makes the image;
* a readout with fewer samples before its centre than after it (an asymmetric echo) is placed
  with its centre at column ``nx // 2``; the columns it did not measure are False in the mask;
* lines are averaged over the average counter; several echoes, repetitions, cardiac phases,
  sets or 3-D partitions are refused with a line that names them;
* calibration (parallel-imaging reference) lines go to ``KSpace.calibration``, noise-scan
  samples to ``KSpace.noise``.

``header["raw"]`` holds what the file said, in names common to both formats: ``format``,
``vendor``, ``model``, ``field_T``, ``software``, ``sequence``, ``protocol``, ``trajectory``,
``encoded_matrix`` / ``recon_matrix`` ``(x readout, y phase, z)``, ``encoded_fov_mm`` /
``recon_fov_mm``, ``readout_oversampling``, ``acceleration`` ``(R phase, R partition)`` from the
header, ``patient_position``, ``slices`` (per slice: ``position_lps_mm``, ``read_dir``,
``phase_dir``, ``slice_dir``), ``slice_thickness_mm``, and what the assembly found:
``lines_measured``, ``calibration_lines``, ``averages``, ``centre_line`` and how it was chosen,
``readout`` (samples, centre sample, first column, grid columns), ``noise_samples``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medrecon.datasets.types import LPS_TO_RAS, KSpace
from medrecon.errors import InputError

__all__ = ["Readout", "assemble_kspace", "image_affine", "raw_summary"]

#: counters that must hold one value: several of them are refused (name, what it counts)
_ONE_VALUE = (
    ("partition", "3-D partitions (kz encoding)"),
    ("contrast", "echoes / contrasts"),
    ("repetition", "repetitions"),
    ("phase", "cardiac phases"),
    ("set", "sets"),
)


@dataclass
class Readout:
    """One line of k-space as a scanner file stores it.

    Parameters
    ----------
    data : ndarray, shape (coils, samples), complex
        The samples of every receive coil.
    line : int
        Phase-encode counter (k-space line).
    slice : int
        Slice counter.
    centre_sample : int
        Index of the k-space centre (k_x = 0) within ``samples``.
    calibration : bool
        A parallel-imaging reference line.
    imaging : bool
        Part of the image (False for reference-only lines).
    partition, contrast, repetition, phase, set, average : int
        The other counters.
    geometry : dict, optional
        ``position_lps_mm``, ``read_dir``, ``phase_dir``, ``slice_dir`` of the slice (LPS).
    """

    data: np.ndarray
    line: int
    slice: int = 0
    centre_sample: int = 0
    calibration: bool = False
    imaging: bool = True
    partition: int = 0
    contrast: int = 0
    repetition: int = 0
    phase: int = 0
    set: int = 0
    average: int = 0
    geometry: dict[str, Any] | None = None


def _grid_columns(readouts: Sequence[Readout]) -> int:
    """Readout grid size: twice the longer side of the echo, so the centre sits at ``nx // 2``."""
    nx = 0
    for r in readouts:
        n = r.data.shape[1]
        nx = max(nx, 2 * max(r.centre_sample, n - r.centre_sample))
    return nx


def _centre_line(lines: np.ndarray, header_centre: int | None) -> tuple[int, str]:
    """The k-space centre line: the header's when it lies inside the measured lines, else the middle."""
    lo, hi = int(lines.min()), int(lines.max())
    if header_centre is not None and lo < int(header_centre) <= hi:
        return int(header_centre), "header"
    middle = (lo + hi + 1) // 2
    said = "none" if header_centre is None else str(header_centre)
    return (
        middle,
        f"middle of the measured lines (the header's centre line, {said}, is not inside {lo}..{hi})",
    )


def assemble_kspace(
    path: str | Path,
    readouts: Sequence[Readout],
    noise: Sequence[np.ndarray] = (),
    *,
    header: dict[str, Any],
    centre_line: int | None = None,
    encoded_lines: int | None = None,
) -> KSpace:
    """Put readouts on the Cartesian grid (see the module docstring).

    Parameters
    ----------
    path : str or Path
        The file, named in errors.
    readouts : sequence of Readout
        Imaging and calibration readouts (noise and navigator readouts left out by the reader).
    noise : sequence of ndarray, each (coils, samples)
        Noise-scan readouts.
    header : dict
        ``header["raw"]`` of the result (the reader's part; this function adds its own keys).
    centre_line : int, optional
        The header's k-space centre line (ignored when outside the measured lines).
    encoded_lines : int, optional
        The header's number of phase-encode lines; the grid is at least this tall.

    Returns
    -------
    KSpace
        ``data`` (coils, Z, ky, kx) complex64, ``mask`` (1 or Z, ky, kx), ``noise``,
        ``calibration``, ``header`` with ``raw`` and ``readout_axis = -1``.

    Raises
    ------
    InputError
        No imaging readouts, coil counts that differ, several values of a counter that must
        hold one (echoes, repetitions, partitions, ...), NaN / Inf samples.
    """
    p = Path(path)
    image = [r for r in readouts if r.imaging]
    if not image:
        raise InputError(p, "holds no imaging readouts (only noise, navigator or reference lines)")
    coils = {r.data.shape[0] for r in readouts} | {n.shape[0] for n in noise}
    if len(coils) != 1:
        raise InputError(p, f"readouts have different numbers of coils {sorted(coils)}")
    (n_coils,) = coils
    for name, what in _ONE_VALUE:
        values = sorted({getattr(r, name) for r in image})
        if len(values) > 1:
            raise InputError(
                p,
                f"holds {len(values)} {what} ({name} counter {values[0]}..{values[-1]}); medrecon "
                "reconstructs one 2-D image per slice: split the scan or select one before converting",
            )
    nx = _grid_columns(readouts)
    lines = np.array([r.line for r in readouts])
    centre, how = _centre_line(np.array([r.line for r in image]), centre_line)
    ny = 2 * max(centre - int(lines.min()), int(lines.max()) + 1 - centre)
    ny = max(ny, int(encoded_lines or 0))
    ny += ny % 2
    slices = sorted({r.slice for r in readouts})
    z_of = {s: i for i, s in enumerate(slices)}
    data = np.zeros((n_coils, len(slices), ny, nx), np.complex64)
    count = np.zeros((len(slices), ny, nx), np.int32)
    calib = np.zeros_like(data) if any(r.calibration for r in readouts) else None
    geometry: dict[int, dict[str, Any]] = {}
    for r in readouts:
        z, row = z_of[r.slice], ny // 2 - centre + r.line
        first = nx // 2 - r.centre_sample
        cols = slice(first, first + r.data.shape[1])
        if r.imaging:
            data[:, z, row, cols] += r.data
            count[z, row, cols] += 1
        if calib is not None and r.calibration:
            calib[:, z, row, cols] = r.data
        if r.geometry is not None and r.slice not in geometry:
            geometry[r.slice] = r.geometry
    measured = count > 0
    data[:, measured] /= count[measured]
    if not np.all(np.isfinite(data.view(np.float32))) or any(
        not np.all(np.isfinite(n)) for n in noise
    ):
        raise InputError(p, "samples contain NaN or Inf values")
    mask = measured[:1] if all(np.array_equal(measured[0], m) for m in measured[1:]) else measured
    row_measured = measured.any(axis=(0, 2))
    widths = {r.data.shape[1] for r in image}
    raw = dict(header)
    raw.update(
        {
            "grid": [ny, nx],
            "lines_measured": int(row_measured.sum()),
            "calibration_lines": 0
            if calib is None
            else int(np.any(calib != 0, axis=(0, 1, 3)).sum()),
            "averages": int(count.max()),
            "centre_line": {"line": int(centre), "how": how},
            "readout": {
                "samples": sorted(widths),
                "centre_sample": sorted({r.centre_sample for r in image}),
                "grid_columns": nx,
                "measured_columns": int(measured.any(axis=(0, 1)).sum()),
            },
            "noise_samples": int(sum(n.shape[1] for n in noise)),
            "slice_counters": slices,
        }
    )
    if geometry:
        raw["slices"] = [geometry.get(s) for s in slices]
    noise_arr = (
        np.concatenate([np.asarray(n, np.complex64) for n in noise], axis=1) if noise else None
    )
    return KSpace(
        data,
        mask=mask,
        header={"raw": raw, "readout_axis": -1, "source": str(p)},
        noise=noise_arr,
        calibration=calib,
    )


def image_affine(raw: dict[str, Any], image_shape: tuple[int, int, int]) -> np.ndarray | None:
    """RAS+ affine of the reconstructed image ``(Z, rows = phase, columns = readout)`` from the scanner geometry.

    Column index ``i`` runs along the readout direction, row index ``j`` along the phase
    direction, slice ``k`` along the slice direction (the ISMRMRD convention; the image centre
    ``(nx // 2, ny // 2)`` sits at the slice position).  Pixel sizes are the recon FOV over the
    image matrix.

    Returns
    -------
    ndarray, shape (4, 4), or None
        None when the header has no slice geometry or FOV.
    """
    slices = raw.get("slices")
    fov = raw.get("recon_fov_mm") or raw.get("encoded_fov_mm")
    if not slices or not all(slices) or not fov:
        return None
    nz, ny, nx = image_shape
    try:
        pos = np.array([s["position_lps_mm"] for s in slices], float)
        read, phase, normal = (
            np.asarray(slices[0][k], float) for k in ("read_dir", "phase_dir", "slice_dir")
        )
    except (KeyError, TypeError, ValueError):
        return None
    if pos.shape[0] != nz or any(
        not np.isfinite(v).all() or abs(np.linalg.norm(v) - 1) > 1e-3 for v in (read, phase, normal)
    ):
        return None
    dx, dy = float(fov[0]) / nx, float(fov[1]) / ny
    if nz > 1:
        steps = np.diff(pos @ normal)
        dz = float(np.median(steps)) if np.all(steps > 0) or np.all(steps < 0) else 0.0
    else:
        dz = float(raw.get("slice_thickness_mm") or fov[2] or 1.0)
    if dz == 0.0 or dx <= 0 or dy <= 0:
        return None
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = read * dx, phase * dy, normal * dz
    lps[:3, 3] = pos[0] - read * dx * (nx // 2) - phase * dy * (ny // 2)
    if abs(np.linalg.det(lps[:3, :3])) < 1e-9:
        return None
    return LPS_TO_RAS @ lps


def raw_summary(raw: dict[str, Any], kspace: KSpace | None = None) -> str:
    """One line saying what a raw file held: scanner, sequence, matrix, coils, R, noise scan."""
    parts = []
    scanner = " ".join(str(v) for v in (raw.get("vendor"), raw.get("model")) if v)
    if raw.get("field_T"):
        scanner += f" {float(raw['field_T']):.1f} T"
    parts.append(scanner or "scanner unknown")
    seq = raw.get("sequence") or raw.get("protocol")
    parts.append(f"sequence {seq}" if seq else "sequence unknown")
    if kspace is not None:
        c, z, ny, nx = kspace.data.shape
        parts.append(
            f"{c} coil{'s' if c != 1 else ''}, {z} slice{'s' if z != 1 else ''}, {ny}×{nx} k-space "
            "(phase × readout)"
        )
    r = raw.get("acceleration") or [1, 1]
    parts.append(
        f"R = {r[0]:g} (header)"
        + (
            f", {raw['calibration_lines']} calibration lines"
            if raw.get("calibration_lines")
            else ""
        )
    )
    parts.append(
        f"noise scan: {raw['noise_samples']} samples"
        if raw.get("noise_samples")
        else "no noise scan"
    )
    return "; ".join(parts)
