"""Find a measured sinogram's detector direction, rotation direction and centre of rotation.

A geometry that does not match the data (bins reversed, the gantry turning the other way, the
rotation axis a few bins off the detector's middle) still gives an image, with ghosts and
blur, and nothing says so.  :func:`check_geometry` reconstructs one slice with each candidate
geometry and measures how well the reconstruction explains the data:

* **data residual** ``‖A·FBP(y) − y‖ / ‖y‖`` over the inner bins: only the right geometry
  makes the views agree with each other, so its filtered back-projection re-projects onto the
  data best;
* **sharpness** of the image, as the entropy of its histogram (lower is sharper): a wrong
  geometry doubles and blurs edges and adds streaks, which spread the values.

Candidates: the detector as stated or flipped (fan beam), and the centre-of-rotation offset
in whole bins over ``±max_offset_bins`` (by shifting the data, which is exact for whole bins),
then refined to a quarter bin around the best with operators built for each offset.  The
check runs on a coarse grid (at most ``grid`` pixels across, the same field of view) and at
most ``max_views`` views, so it takes seconds.

What the data cannot tell: a parallel-beam sinogram reconstructs equally well with the bins
reversed (the image turns by 180°) or the angles reversed (it is mirrored); a fan-beam one
with both reversed (mirrored).  Those only change the image's orientation, which a known
marker must settle; the check keeps them as stated and says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from medrecon.errors import SettingsError

__all__ = ["GeometryCandidate", "GeometryCheck", "check_geometry", "check_geometry_file", "geometry_warning"]

#: a residual this much lower than the stated geometry's (relative) is reported as a better fit
BETTER = 0.05


@dataclass(frozen=True)
class GeometryCandidate:
    """One geometry tried: the JSON keys it stands for and how well it fits the data."""

    detector_flipped: bool
    rotation_direction: str
    detector_offset_bins: float
    residual: float
    entropy: float

    def keys(self) -> dict[str, Any]:
        """The geometry keys of this candidate, as they go into the sinogram's JSON."""
        return {"detector_flipped": self.detector_flipped, "rotation_direction": self.rotation_direction,
                "detector_offset_bins": round(self.detector_offset_bins, 3)}


@dataclass
class GeometryCheck:
    """The result of :func:`check_geometry`.

    Attributes
    ----------
    stated, best : GeometryCandidate
        The file's geometry and the one that fits the data best.
    mirror : GeometryCandidate or None
        Keys that fit the data as well as ``best`` but give its mirror image (fan beam).
    ranked : list of GeometryCandidate
        Every geometry tried, by residual.
    confidence : {"high", "moderate", "low"}
    margin : float
        How much worse the other detector direction fits: its residual over the best's, minus 1
        (None for parallel beam, where it cannot be told).
    offset_rise : float
        How much worse the best geometry fits one bin off its offset (residual ratio − 1): how
        sharply the data fix the centre of rotation.
    changed : bool
        The best fit differs from the stated geometry.
    notes : list of str
    """

    stated: GeometryCandidate
    best: GeometryCandidate
    mirror: GeometryCandidate | None
    ranked: list[GeometryCandidate]
    confidence: str
    margin: float | None
    offset_rise: float
    changed: bool
    notes: list[str] = field(default_factory=list)
    convention: str = "medrecon"

    def keys(self) -> dict[str, Any]:
        """The keys to put in the sinogram's JSON (all three, in the file's convention)."""
        return self.best.keys()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for records)."""
        out = asdict(self)
        out["keys"] = self.keys()
        return out

    def lines(self) -> list[str]:
        """A human-readable report, one line per item."""
        s, b = self.stated, self.best

        def fit(c: GeometryCandidate) -> str:
            return f"data residual {c.residual:.4g}, image entropy {c.entropy:.3f}"

        out = [f"as given ({_describe(s)}): {fit(s)}"]
        if self.changed:
            ratio = s.residual / b.residual if b.residual > 0 else math.inf
            out.append(f"best fit ({_describe(b)}): {fit(b)}; {ratio:.2f}× lower residual than as given")
        else:
            out.append("best fit: the geometry as given")
        out.append(f"confidence: {self.confidence} ({_why(self)})")
        out.append(f"keys to use in the JSON (convention {self.convention!r}): {_json(self.keys())}")
        if self.mirror is not None:
            out.append(f"the data cannot tell a mirror image apart: if the image comes out mirrored, use "
                       f"{_json(self.mirror.keys())}")
        out += self.notes
        return out


def _json(keys: dict[str, Any]) -> str:
    import json

    return json.dumps(keys)


def _describe(c: GeometryCandidate) -> str:
    return (f"detector {'flipped' if c.detector_flipped else 'as stated'}, {c.rotation_direction}, "
            f"centre-of-rotation offset {c.detector_offset_bins:+.2f} bins")


def _why(c: GeometryCheck) -> str:
    parts = []
    if c.margin is not None:
        parts.append(f"the other detector direction fits {1 + c.margin:.2f}× worse")
    parts.append(f"one bin off the offset fits {1 + c.offset_rise:.3f}× worse")
    return "; ".join(parts)


def _shift_bins(y: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """``(len(shifts), views, bins)``: ``y[:, k + s]`` for each shift ``s`` (zero outside)."""
    v, n = y.shape
    out = y.new_zeros(len(shifts), v, n)
    for i, s in enumerate(shifts):
        if s >= 0:
            out[i, :, : n - s] = y[:, s:]
        else:
            out[i, :, -s:] = y[:, : n + s]
    return out


def _entropy(x: torch.Tensor, low: float, high: float) -> np.ndarray:
    """Entropy (nats) of each image's histogram of ``(B, 1, H, W)`` over 256 bins of ``[low, high]``:
    lower is sharper (ghosts and blur spread the values; Donath et al., JOSA A 23(5), 2006)."""
    out = []
    for im in x:
        h = torch.histc(im.float(), bins=256, min=low, max=high)
        p = h[h > 0] / h.sum().clamp_min(1)
        out.append(float(-(p * p.log()).sum()))
    return np.asarray(out)


def _fits(A: Any, ys: torch.Tensor, edge: int, window: tuple[float, float] | None = None  # noqa: N803
          ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Residual and image entropy of FBP of each sinogram of ``ys`` (B, views, bins) with ``A``;
    the entropy's histogram window (default: the range of these images)."""
    with torch.no_grad():
        x = A.fbp(ys[:, None])
        r = A(x)[:, 0] - ys
    inner = slice(edge, ys.shape[-1] - edge)
    res = r[..., inner].flatten(1).norm(dim=1) / ys[..., inner].flatten(1).norm(dim=1).clamp_min(1e-30)
    if window is None:
        window = (float(x.min()), float(x.max()) + 1e-12)
    return res.numpy(), _entropy(x, *window), window


def check_geometry(
    sinogram: Any,
    *,
    image_size: int | None = None,
    slice_index: int | None = None,
    max_offset_bins: float | None = None,
    grid: int = 128,
    max_views: int = 180,
    refine: bool = True,
) -> GeometryCheck:
    """Find the detector direction and the centre of rotation that fit a measured sinogram.

    Parameters
    ----------
    sinogram : Sinogram
        Measured data and its geometry (:func:`medrecon.datasets.load_sinogram`).
    image_size : int, optional
        The reconstruction grid (as ``--image-size``); default from the geometry
        (:func:`medrecon.pipeline.geometry.sinogram_grid`).  The check itself runs on a grid of
        at most ``grid`` pixels over the same field of view.
    slice_index : int, optional
        The slice to check (default: the middle one).
    max_offset_bins : float, optional
        Offsets searched, in bins either side of the stated one (default: 5 % of the bins, at
        least 4).
    grid, max_views : int
        Size of the coarse grid and the most views used (every k-th view beyond that).
    refine : bool
        Refine the best offset to a quarter bin.

    Returns
    -------
    GeometryCheck

    Raises
    ------
    SettingsError
        A slice index out of range, fewer than 8 bins.
    """
    from medrecon.datasets.simulate import ct_operator
    from medrecon.pipeline.geometry import sinogram_grid

    g = dict(sinogram.geometry)
    data = np.asarray(sinogram.data)
    z = data.shape[0] // 2 if slice_index is None else int(slice_index)
    if not 0 <= z < data.shape[0]:
        raise SettingsError(f"check_geometry(): slice {z} is out of range (the sinogram has {data.shape[0]})")
    n_views, n_bins = data.shape[1:]
    if n_bins < 8:
        raise SettingsError(f"check_geometry(): needs at least 8 detector bins, got {n_bins}")
    step = max(1, math.ceil(n_views / max_views))
    views = np.arange(0, n_views, step)
    size, pixel = sinogram_grid(g, image_size)
    n = max(16, min(size, grid))
    y = torch.from_numpy(data[z][views].astype(np.float64))
    k = int(round(max_offset_bins)) if max_offset_bins is not None else max(4, int(round(0.05 * n_bins)))
    k = max(1, min(k, n_bins // 4))
    edge = k + 2
    fan = g["type"] == "fan"
    stated_flip = bool(g.get("detector_flipped", False))
    rotation = g.get("rotation_direction", "counterclockwise")
    offset0 = float(g.get("detector_offset_bins", 0.0))
    base = {**g, "angles_rad": np.asarray(g["angles_rad"], dtype=np.float64)[views].tolist(),
            "pixel_size_mm": pixel * size / n}

    def operator(flipped: bool, offset: float) -> Any:
        return ct_operator({**base, "detector_flipped": flipped, "detector_offset_bins": offset}, (n, n),
                           matrix_budget=0)

    shifts = list(range(-k, k + 1))
    ys = _shift_bins(y, shifts)  # the data shifted by s bins fits the geometry with offset + s
    window = None
    fine: dict[tuple[bool, float], tuple[float, float]] = {}  # (flipped, offset) -> (residual, entropy)
    best_of: dict[bool, GeometryCandidate] = {}
    for flipped in ((stated_flip, not stated_flip) if fan else (stated_flip,)):
        res, ent, window = _fits(operator(flipped, offset0), ys, edge, window)
        for sh, r, e in zip(shifts, res, ent, strict=True):
            fine[(flipped, offset0 + sh)] = (float(r), float(e))
        i = int(np.argmin(res))
        best_of[flipped] = GeometryCandidate(flipped, rotation, offset0 + shifts[i], float(res[i]), float(ent[i]))
    best = min(best_of.values(), key=lambda c: c.residual)
    flip = best.detector_flipped
    notes: list[str] = []
    if abs(best.detector_offset_bins - offset0) >= k:
        notes.append(f"the best offset is at the edge of the search (±{k} bins): search further with --max-offset")

    def fit(off: float) -> tuple[float, float]:
        if (flip, off) not in fine:
            r, e, _ = _fits(operator(flip, off), y[None], edge, window)
            fine[(flip, off)] = (float(r[0]), float(e[0]))
        return fine[(flip, off)]

    if refine:
        centre = best.detector_offset_bins
        for d in (-0.75, -0.5, -0.25, 0.25, 0.5, 0.75):
            fit(centre + d)
        off = min((o for f, o in fine if f == flip and abs(o - centre) <= 1), key=lambda o: fine[(flip, o)][0])
        best = GeometryCandidate(flip, rotation, off, *fine[(flip, off)])
    b = best.detector_offset_bins
    neighbours = [fit(b + d)[0] for d in (-1.0, 1.0) if refine or (flip, b + d) in fine]
    rise = float(min(neighbours) / best.residual - 1) if neighbours and best.residual > 0 else 0.0
    ranked = sorted((GeometryCandidate(f, rotation, o, r, e) for (f, o), (r, e) in fine.items()),
                    key=lambda c: c.residual)
    stated = GeometryCandidate(stated_flip, rotation, offset0, *fine[(stated_flip, offset0)])
    margin = None
    if fan:
        other = best_of[not flip]
        margin = float(other.residual / best.residual - 1) if best.residual > 0 else 0.0
    near = [c for c in ranked if c.detector_flipped == flip and abs(c.detector_offset_bins - b) <= k]
    sharpest = min(near, key=lambda c: c.entropy)
    sharp_agrees = abs(sharpest.detector_offset_bins - b) <= 1
    if (margin is None or margin >= 0.10) and rise >= 0.02 and sharp_agrees:
        confidence = "high"
    elif (margin is None or margin >= 0.02) and rise >= 0.005:
        confidence = "moderate"
    else:
        confidence = "low"
    if not sharp_agrees:
        notes.append(f"the image is sharpest at offset {sharpest.detector_offset_bins:+.2f} bins, not at the data "
                     "residual's best")
    mirror = None
    if fan:
        mirror = GeometryCandidate(not flip, "clockwise" if rotation == "counterclockwise" else "counterclockwise",
                                   best.detector_offset_bins, best.residual, best.entropy)
    else:
        notes.append("parallel beam: reversed bins only turn the image by 180° and reversed angles only mirror "
                     "it; the data cannot tell, so both stay as given")
    changed = (flip != stated_flip
               or (abs(b - offset0) >= 0.5 and stated.residual > (1 + BETTER) * best.residual))
    if not changed:
        best = stated
    return GeometryCheck(stated, best, mirror, ranked, confidence, margin, rise, changed, notes,
                         convention=g.get("convention", "medrecon"))


def check_geometry_file(path: str, **kwargs: Any) -> GeometryCheck:
    """:func:`check_geometry` of a sinogram file (``.npy``/``.npz``/``.mat`` with its ``.json``).

    Raises
    ------
    InputError
        Unreadable files or an invalid geometry (names the file).
    """
    from pathlib import Path

    from medrecon.datasets import load_sinogram
    from medrecon.errors import InputError

    sino = load_sinogram(path)
    try:
        return check_geometry(sino, **kwargs)
    except SettingsError as err:
        raise InputError(Path(path), str(err)) from err


#: a reconstruction warns when another geometry's data residual is this many times lower
WARN_RATIO = 1.25


def geometry_warning(check: GeometryCheck, source: str) -> str | None:
    """The warning a reconstruction gives when its data fit another geometry clearly better
    (a data residual :data:`WARN_RATIO` times lower); None otherwise."""
    s, b = check.stated, check.best
    if not check.changed or s.residual < WARN_RATIO * b.residual:
        return None
    return (f"the data fit another geometry {s.residual / b.residual:.1f}× better (data residual "
            f"{b.residual:.3g} vs {s.residual:.3g} as given): {_json(check.keys())}; the image may hold ghosts or "
            f"blur: run medrecon check-geometry {source}")
