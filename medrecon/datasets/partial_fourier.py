"""Partial Fourier (an asymmetric echo, or phase partial Fourier): zero-filling, homodyne or POCS.

A partial-Fourier axis is one whose measured samples form one contiguous range that reaches one
edge of the grid but stops short of the other, past the k-space centre (``n // 2``): an
asymmetric echo along the readout, or phase partial Fourier along the lines.  The symmetric part
``[c − h, c + h]`` about the centre ``c`` is measured on both sides; ``h`` is the shorter side.

* ``zero-fill`` (default): nothing is estimated; the missing samples stay zero and unmeasured
  in the mask (a solver treats them as unknown).
* ``homodyne`` (Noll, Nishimura & Macovski 1991): the measured samples weighted by a ramp that
  runs 0 → 2 across the symmetric part (2 on the one-sided part), transformed, and the real part
  taken after removing the phase of the symmetric part's low-resolution image (Hamming window);
  the image's phase is put back, so every coil keeps its own.
* ``pocs`` (Haacke et al. 1991): starting from zero-filling, the magnitude of the image with the
  low-resolution phase, transformed, and the measured samples put back; ``POCS_ITERATIONS``
  times.

Both estimate the missing samples, which are then marked measured.  They need the k-space to be
fully sampled apart from the partial-Fourier side: an undersampled mask is refused (use
``zero-fill``).  Centred orthonormal 2-D FFT over the last two axes (the
:class:`~medrecon.datasets.types.KSpace` convention).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from medrecon.datasets.types import KSpace
from medrecon.errors import SettingsError

__all__ = [
    "fill_partial_fourier",
    "partial_fourier_axes",
    "PARTIAL_FOURIER_METHODS",
    "POCS_ITERATIONS",
]

PARTIAL_FOURIER_METHODS = ("zero-fill", "homodyne", "pocs")
POCS_ITERATIONS = 15


def _fft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )


def _ifft2c(k: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )


def partial_fourier_axes(mask: np.ndarray) -> dict[int, tuple[int, int]]:
    """The partial-Fourier axes of a mask and their measured range.

    Parameters
    ----------
    mask : ndarray, shape (1 or Z, ky, kx), bool

    Returns
    -------
    dict
        ``{axis: (first, last)}`` for axis -2 (rows) and/or -1 (columns): the measured range
        when it is contiguous, touches one edge and misses more than one sample at the other.
    """
    out: dict[int, tuple[int, int]] = {}
    for axis in (-2, -1):
        profile = np.any(mask, axis=(0, -1 if axis == -2 else -2))
        idx = np.flatnonzero(profile)
        if idx.size == 0 or idx.size != idx[-1] - idx[0] + 1:
            continue
        n, (a, b) = profile.size, (int(idx[0]), int(idx[-1]))
        c = n // 2
        if not a <= c <= b:
            continue
        if (a > 1 and b == n - 1) or (a == 0 and b < n - 2):
            out[axis] = (a, b)
    return out


def _is_box(mask: np.ndarray) -> bool:
    """True when every slice's mask is (measured rows) × (measured columns) with no gaps."""
    for m in mask:
        rows, cols = m.any(axis=1), m.any(axis=0)
        if not np.array_equal(m, rows[:, None] & cols[None, :]):
            return False
        for profile in (rows, cols):
            idx = np.flatnonzero(profile)
            if idx.size and idx.size != idx[-1] - idx[0] + 1:
                return False
    return True


def _windows(n: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(homodyne weights, Hamming window of the symmetric part, half-width h) along one axis."""
    c = n // 2
    h = min(c - a, b - c)
    k = np.arange(n) - c
    side = 1.0 if b == n - 1 else -1.0  # +1: the high side is measured beyond the symmetric part
    weights = np.clip(1.0 + side * k / max(h, 1), 0.0, 2.0)
    sym = np.zeros(n)
    sym[c - h : c + h + 1] = np.hamming(2 * h + 1) if h > 0 else 1.0
    return weights, sym, h


def fill_partial_fourier(kspace: KSpace, method: str = "zero-fill") -> KSpace:
    """Handle partial Fourier along every axis that has it (module docstring).

    Parameters
    ----------
    kspace : KSpace
    method : {"zero-fill", "homodyne", "pocs"}

    Returns
    -------
    KSpace
        ``zero-fill``: unchanged data and mask; ``homodyne`` / ``pocs``: the missing samples
        estimated and marked measured.  ``header["raw_steps"]`` gains a ``partial Fourier`` entry.

    Raises
    ------
    SettingsError
        An unknown method; homodyne / POCS on an undersampled k-space.
    """
    if method not in PARTIAL_FOURIER_METHODS:
        raise SettingsError(
            f"partial Fourier: method must be one of {', '.join(PARTIAL_FOURIER_METHODS)}; "
            f"got {method!r}"
        )
    axes = partial_fourier_axes(kspace.mask)
    names = {-1: "columns", -2: "rows"}
    shape = kspace.data.shape[-2:]
    found = ", ".join(
        f"{names[ax]} {a}..{b} of {shape[ax]} measured" for ax, (a, b) in axes.items()
    )

    def log(note: str) -> dict:
        return {
            **kspace.header,
            "raw_steps": [
                *kspace.header.get("raw_steps", []),
                {"step": "partial Fourier", "note": note, "method": method},
            ],
        }

    if not axes:
        return replace(kspace, header=log("none (symmetric k-space)"))
    if method == "zero-fill":
        return replace(kspace, header=log(f"zero-filled ({found})"))
    if not _is_box(kspace.mask):
        raise SettingsError(
            f"partial Fourier {method}: needs k-space fully sampled apart from the partial-Fourier side; "
            "this one is undersampled (parallel imaging or a sampling mask): use zero-fill"
        )
    y = kspace.data.astype(np.complex64)
    mask = np.broadcast_to(kspace.mask, y.shape[1:])
    weights = np.ones(shape)
    sym = np.ones(shape)
    new_mask = mask.copy()
    for ax, (a, b) in axes.items():
        n = shape[ax]
        w, s, _ = _windows(n, a, b)
        if ax == -1:
            weights, sym = weights * w[None, :], sym * s[None, :]
            new_mask = new_mask | new_mask.any(axis=-1, keepdims=True)
        else:
            weights, sym = weights * w[:, None], sym * s[:, None]
            new_mask = new_mask | new_mask.any(axis=-2, keepdims=True)
    phase = np.exp(1j * np.angle(_ifft2c(y * sym)))
    if method == "homodyne":
        image = np.real(_ifft2c(y * weights) * phase.conj()) * phase
        filled = _fft2c(image)
        note = f"homodyne ({found})"
    else:
        filled = y.copy()
        for _ in range(POCS_ITERATIONS):
            filled = _fft2c(np.abs(_ifft2c(filled)) * phase)
            filled[:, mask] = y[:, mask]
        note = f"POCS, {POCS_ITERATIONS} iterations ({found})"
    filled = np.where(new_mask[None], filled, 0).astype(np.complex64)
    return replace(kspace, data=filled, mask=new_mask, header=log(note), coil_maps=None)
