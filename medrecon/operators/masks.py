"""Sampling patterns: CT view sets and MRI k-space masks.

Every random pattern takes ``seed`` (an int or a ``torch.Generator``) and is reproducible;
nothing touches global RNG state.  MRI masks are boolean tensors of shape ``(H, W)``; 1-D
(Cartesian) masks select phase-encode lines, i.e. whole columns (the last axis), as in fastMRI.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from medrecon.errors import SettingsError

__all__ = [
    "sparse_view_angles",
    "limited_angle_angles",
    "random_mask",
    "equispaced_mask",
    "gaussian1d_mask",
    "poisson_disc_mask",
    "mri_mask",
    "MRI_MASKS",
]


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


# ----------------------------------------------------------------------------------- CT views
def sparse_view_angles(n_views: int, n_full: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n_views`` equally spaced views on ``[0, π)`` as a subset of a full set.

    Parameters
    ----------
    n_views : int
        Measured views.
    n_full : int, optional
        Size of the full angle set T projects over; it must be a multiple of ``n_views`` so that
        the measured views are exactly equally spaced.  Default: the smallest multiple ≥ 180.

    Returns
    -------
    angles_rad : ndarray, shape (n_full,)
    view_mask : ndarray of bool, shape (n_full,)
    """
    if not isinstance(n_views, int | np.integer) or n_views < 1:
        raise SettingsError(f"sparse_view_angles(): n_views must be a positive int, got {n_views!r}")
    if n_full is None:
        n_full = n_views * math.ceil(180 / n_views)
    if n_full % n_views:
        raise SettingsError(
            f"sparse_view_angles(): n_full ({n_full}) must be a multiple of n_views ({n_views})"
        )
    angles = np.arange(n_full) * (math.pi / n_full)
    mask = np.zeros(n_full, dtype=bool)
    mask[:: n_full // n_views] = True
    return angles, mask


def limited_angle_angles(
    range_rad: float, n_full: int = 180, start_rad: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The views of an ``n_full``-view set on ``[0, π)`` inside ``[start, start + range)`` (mod π).

    Returns
    -------
    angles_rad : ndarray, shape (n_full,)
    view_mask : ndarray of bool, shape (n_full,)
    """
    if not 0 < range_rad <= math.pi:
        raise SettingsError(f"limited_angle_angles(): range_rad must be in (0, π], got {range_rad}")
    angles = np.arange(n_full) * (math.pi / n_full)
    rel = np.mod(angles - start_rad, math.pi)
    mask = rel < range_rad - 1e-12
    if not mask.any():
        raise SettingsError("limited_angle_angles(): the range contains no view of the full set")
    return angles, mask


# ---------------------------------------------------------------------------------- MRI masks
def _check_mri(shape, acceleration: float, center_fraction: float, who: str) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 2:
        raise SettingsError(f"{who}: shape must be (H, W) with H, W ≥ 2, got {tuple(shape)}")
    if not acceleration >= 1:
        raise SettingsError(f"{who}: acceleration must be ≥ 1, got {acceleration}")
    if not 0 <= center_fraction < 1:
        raise SettingsError(f"{who}: center_fraction must be in [0, 1), got {center_fraction}")
    if center_fraction > 1 / acceleration:
        raise SettingsError(
            f"{who}: center_fraction ({center_fraction}) exceeds the sampled fraction 1/acceleration "
            f"({1 / acceleration:.4g})"
        )
    return int(shape[0]), int(shape[1])


def _center_block(w: int, center_fraction: float) -> tuple[int, int]:
    n_low = int(round(w * center_fraction))
    start = (w - n_low + 1) // 2
    return start, n_low


def _columns(h: int, cols: Tensor) -> Tensor:
    return cols[None, :].expand(h, -1).clone()


def random_mask(
    shape: tuple[int, int], acceleration: float, center_fraction: float = 0.08,
    seed: int | torch.Generator = 0,
) -> Tensor:
    """fastMRI-style random 1-D mask: a fully sampled centre block plus random columns.

    Outside the centre each column is kept with the probability that makes the expected
    sampled fraction ``1 / acceleration``.
    """
    h, w = _check_mri(shape, acceleration, center_fraction, "random_mask()")
    start, n_low = _center_block(w, center_fraction)
    prob = (w / acceleration - n_low) / max(1, w - n_low)
    cols = torch.rand(w, generator=_generator(seed)) < prob
    cols[start : start + n_low] = True
    return _columns(h, cols)


def equispaced_mask(
    shape: tuple[int, int], acceleration: float, center_fraction: float = 0.08,
    seed: int | torch.Generator = 0,
) -> Tensor:
    """Equispaced 1-D mask: a centre block plus columns every ``a`` lines from a random offset.

    The spacing ``a`` is adjusted for the centre block so that the sampled fraction is
    ``1 / acceleration`` (fastMRI's "equispaced fraction" rule).
    """
    h, w = _check_mri(shape, acceleration, center_fraction, "equispaced_mask()")
    start, n_low = _center_block(w, center_fraction)
    if n_low * acceleration >= w:
        spacing = float(acceleration)
    else:
        spacing = acceleration * (n_low - w) / (n_low * acceleration - w)
    offset = int(torch.randint(0, max(1, round(spacing)), (1,), generator=_generator(seed)))
    idx = np.round(np.arange(offset, w - 1, spacing)).astype(int)
    cols = torch.zeros(w, dtype=torch.bool)
    cols[torch.from_numpy(idx[idx < w])] = True
    cols[start : start + n_low] = True
    return _columns(h, cols)


def gaussian1d_mask(
    shape: tuple[int, int], acceleration: float, center_fraction: float = 0.08,
    seed: int | torch.Generator = 0, std_fraction: float = 0.25,
) -> Tensor:
    """Gaussian 1-D mask: a centre block plus columns drawn without replacement with a
    probability that falls off as a Gaussian of standard deviation ``std_fraction · W`` around
    the centre; exactly ``round(W / acceleration)`` columns in all."""
    h, w = _check_mri(shape, acceleration, center_fraction, "gaussian1d_mask()")
    start, n_low = _center_block(w, center_fraction)
    n_total = max(n_low, int(round(w / acceleration)))
    pos = torch.arange(w, dtype=torch.float64) - w / 2
    weight = torch.exp(-0.5 * (pos / (std_fraction * w)) ** 2)
    weight[start : start + n_low] = 0
    cols = torch.zeros(w, dtype=torch.bool)
    cols[start : start + n_low] = True
    n_extra = n_total - n_low
    if n_extra > 0:
        pick = torch.multinomial(weight, n_extra, replacement=False, generator=_generator(seed))
        cols[pick] = True
    return _columns(h, cols)


def poisson_disc_mask(
    shape: tuple[int, int], acceleration: float, calib_size: int = 24,
    seed: int | torch.Generator = 0,
) -> Tensor:
    """2-D variable-density Poisson-disc mask (SigPy ``mri.poisson``) with a square calibration
    region of ``calib_size`` × ``calib_size``."""
    h, w = _check_mri(shape, acceleration, 0.0, "poisson_disc_mask()")
    import sigpy.mri

    s = int(torch.randint(0, 2**31 - 1, (1,), generator=_generator(seed)))
    m = sigpy.mri.poisson((h, w), acceleration, calib=(calib_size, calib_size), seed=s, dtype=np.float32)
    return torch.from_numpy(np.abs(m) > 0)


MRI_MASKS = {
    "random": random_mask,
    "equispaced": equispaced_mask,
    "gaussian1d": gaussian1d_mask,
    "poisson": poisson_disc_mask,
}


def mri_mask(
    kind: str, shape: tuple[int, int], acceleration: float, center_fraction: float = 0.08,
    seed: int | torch.Generator = 0,
) -> Tensor:
    """Build a mask by name (``random``, ``equispaced``, ``gaussian1d``, ``poisson``).

    For ``poisson`` the calibration square is ``round(center_fraction · min(H, W))`` wide.
    """
    if kind not in MRI_MASKS:
        import difflib

        near = difflib.get_close_matches(kind, list(MRI_MASKS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise SettingsError(f"unknown mask {kind!r}{hint} Known: {', '.join(sorted(MRI_MASKS))}")
    if kind == "poisson":
        return poisson_disc_mask(shape, acceleration, max(2, round(center_fraction * min(shape))), seed)
    return MRI_MASKS[kind](shape, acceleration, center_fraction, seed)
