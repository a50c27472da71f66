"""Filtered back-projection weights: the ramp filters, the angular quadrature, Parker weights.

Pure functions on NumPy arrays; :class:`medrecon.operators.ct.CTProjector` applies them.

* :func:`fbp_filter`: frequency responses of the ramp and its windowed variants.
* :func:`view_weights`: each view's share of the angular range (its quadrature weight).
* :func:`angular_weights`: the weights FBP uses for a set of views, in the right units for a
  full scan, a sparse scan, a limited-angle scan (normalised to the range covered) and a
  fan-beam short scan (Parker weights).
* :func:`parker_weights`: Parker's (1982) smooth redundancy weights of a fan-beam short scan,
  in the overscan form of Wesarg et al. (2002) for scans longer than π + fan angle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medrecon.errors import SettingsError

__all__ = ["FBP_FILTERS", "fbp_filter", "view_weights", "scan_arc", "parker_weights", "angular_weights",
           "AngularWeights"]

FBP_FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")

#: a scan whose views cover at least this fraction of the period is a full scan
_FULL = 1.0 - 1e-6


def fbp_filter(n_bins: int, name: str = "ramp", kernel: np.ndarray | None = None) -> np.ndarray:
    """Frequency response of an FBP filter, zero-padded length ``max(64, 2^⌈log2(2·n_bins)⌉)``.

    The ramp is the Fourier transform of the band-limited spatial ramp sampled at unit
    spacing (h(0) = 1/4, h(n) = −1/(π n)² for odd n, 0 for even n; Kak & Slaney §3.3), which
    avoids the DC bias of a sampled |ω|.  The other filters multiply it by a window:
    Shepp–Logan sinc(ω/2π), cosine, Hamming and Hann.

    Parameters
    ----------
    n_bins : int
        Detector bins per view.
    name : {"ramp", "shepp-logan", "cosine", "hamming", "hann"}
    kernel : ndarray, optional
        A spatial kernel of the padded length to use instead of the ramp (fan-beam FBP).

    Returns
    -------
    ndarray, shape (n_pad,), float64

    Examples
    --------
    >>> fbp_filter(20).shape
    (64,)
    """
    if name not in FBP_FILTERS:
        raise SettingsError(f"fbp_filter(): unknown filter {name!r}; known: {', '.join(FBP_FILTERS)}")
    n_pad = max(64, int(2 ** math.ceil(math.log2(2 * n_bins))))
    if kernel is None:
        k = np.fft.fftfreq(n_pad) * n_pad  # signed integer offsets
        kernel = np.zeros(n_pad)
        kernel[0] = 0.25
        odd = (np.abs(k) % 2) == 1
        kernel[odd] = -1.0 / (np.pi * k[odd]) ** 2
    resp = np.real(np.fft.fft(kernel))
    omega = 2 * np.pi * np.fft.fftfreq(n_pad)  # [-π, π)
    if name == "shepp-logan":
        with np.errstate(invalid="ignore", divide="ignore"):
            win = np.where(omega == 0, 1.0, np.sin(omega / 2) / (omega / 2))
    elif name == "cosine":
        win = np.cos(omega / 2)
    elif name == "hamming":
        win = 0.54 + 0.46 * np.cos(omega)
    elif name == "hann":
        win = 0.5 + 0.5 * np.cos(omega)
    else:
        win = np.ones(n_pad)
    return resp * win


def view_weights(angles_rad: np.ndarray, period: float) -> np.ndarray:
    """Angular quadrature weight of each view for back-projection.

    Each view gets half the gap to each angular neighbour on a circle of ``period``; gaps wider
    than the median gap (the missing wedge of a limited-angle scan) are capped at the median so
    that no view stands in for angles that were never measured.  Equally spaced views over the
    full period all get ``period / n``.

    Examples
    --------
    >>> view_weights(np.array([0.0, 0.5, 1.0, 1.5]), 2.0)
    array([0.5, 0.5, 0.5, 0.5])
    """
    a = np.mod(np.asarray(angles_rad, dtype=np.float64), period)
    if a.size == 1:
        return np.array([period / 2])
    order = np.argsort(a)
    s = a[order]
    gaps = np.diff(np.concatenate([s, s[:1] + period]))
    cap = np.median(gaps)
    gaps = np.minimum(gaps, cap)
    w_sorted = 0.5 * (gaps + np.roll(gaps, 1))
    w = np.empty_like(w_sorted)
    w[order] = w_sorted
    return w


def scan_arc(angles_rad: np.ndarray) -> tuple[float, float]:
    """The arc of source positions a scan covers: ``(start, extent)`` in radians.

    The arc is the circle less its largest gap between neighbouring views, from the view after
    that gap counter-clockwise (increasing angle) to the view before it, whatever order the
    views were taken in.  ``extent`` is the angle between the first and the last view.

    Examples
    --------
    >>> start, extent = scan_arc(np.radians([350.0, 0.0, 10.0, 20.0]))
    >>> round(float(np.degrees(start))), round(float(np.degrees(extent)))
    (350, 30)
    """
    a = np.sort(np.mod(np.asarray(angles_rad, dtype=np.float64), 2 * math.pi))
    if a.size == 1:
        return float(a[0]), 0.0
    gaps = np.diff(np.concatenate([a, a[:1] + 2 * math.pi]))
    k = int(np.argmax(gaps))
    start = float(a[(k + 1) % a.size])
    return start, float(2 * math.pi - gaps[k])


def parker_weights(beta_rad: np.ndarray, gamma_rad: np.ndarray, delta_rad: float) -> np.ndarray:
    """Parker weights of a fan-beam short scan over source angles ``[0, π + 2δ]``.

    For a ray at fan angle γ from the source at β (the ray's direction is β + γ, so (β, γ) and
    (β + π + 2γ, −γ) are the same line), the weights of a line's two measurements sum to one:

    * ``sin²(π/4 · β / (δ − γ))`` for 0 ≤ β < 2δ − 2γ;
    * 1 for 2δ − 2γ ≤ β ≤ π − 2γ;
    * ``sin²(π/4 · (π + 2δ − β) / (δ + γ))`` for π − 2γ < β ≤ π + 2δ;
    * 0 outside the scan (Parker, Med. Phys. 9(2), 1982).  With δ larger than the half fan
      angle this is the overscan generalisation of Wesarg et al., Med. Phys. 29(8), 2002.

    Parameters
    ----------
    beta_rad : ndarray, shape (V,)
        Source angles from the start of the scan, in ``[0, π + 2δ]``.
    gamma_rad : ndarray, shape (n_bins,)
        Fan angle of each detector element (signed, in the direction of increasing β).
    delta_rad : float
        Half the scan's excess over π; at least the largest ``|γ|``.

    Returns
    -------
    ndarray, shape (V, n_bins), float64

    Examples
    --------
    >>> w = parker_weights(np.array([0.0, 1.0, np.pi + 0.2]), np.array([-0.05, 0.0, 0.05]), 0.1)
    >>> w[0].tolist(), w[1].tolist(), w[2].tolist()
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    """
    b = np.asarray(beta_rad, dtype=np.float64)[:, None]
    g = np.asarray(gamma_rad, dtype=np.float64)[None, :]
    d = float(delta_rad)
    w = np.zeros(np.broadcast_shapes(b.shape, g.shape))
    with np.errstate(divide="ignore", invalid="ignore"):
        rise = np.sin(0.25 * np.pi * b / (d - g)) ** 2
        fall = np.sin(0.25 * np.pi * (np.pi + 2 * d - b) / (d + g)) ** 2
    first = (b >= 0) & (b < 2 * d - 2 * g)
    middle = (b >= 2 * d - 2 * g) & (b <= np.pi - 2 * g)
    last = (b > np.pi - 2 * g) & (b <= np.pi + 2 * d)
    w = np.where(first, rise, w)
    w = np.where(middle, 1.0, w)
    w = np.where(last, fall, w)
    return np.nan_to_num(w)


@dataclass(frozen=True)
class AngularWeights:
    """How FBP weights a set of views (:func:`angular_weights`).

    Attributes
    ----------
    views : ndarray, shape (V,)
        Quadrature weight of each view (radians).
    bins : ndarray (V, n_bins) or None
        Per-ray factor applied before filtering (Parker weights × 2 for a short scan), or None.
    scan : {"full", "limited", "short"}
        What the views cover: the whole period (however many views), part of it, or a fan-beam
        short scan of at least π + the fan angle.
    covered_rad : float
        The angular range the views stand for (the sum of their quadrature weights).
    """

    views: np.ndarray
    bins: np.ndarray | None
    scan: str
    covered_rad: float


def angular_weights(angles_rad: np.ndarray, period: float, fan_angles_rad: np.ndarray | None = None
                    ) -> AngularWeights:
    """The angular weights of filtered back-projection over these views, in the right units.

    * A full scan (the views' quadrature weights, :func:`view_weights`, cover the period):
      the quadrature weights as they are.
    * Parallel beam, or fan beam short of π + the fan angle: a *limited-angle* scan.  Each view
      keeps its share of the range and the weights are scaled by ``period / covered``, so that
      FBP of a uniform object has the right mean (without this, FBP of a 90° parallel scan
      comes out at half the value; of a 90° fan-beam scan at a quarter).
    * Fan beam over at least π + the fan angle (``fan_angles_rad``) but short of 2π: a *short
      scan*; rays are weighted by ``2 × parker_weights`` (the fan-beam filter holds the ½ of
      the doubly measured full scan) and the views by their quadrature weights.

    Parameters
    ----------
    angles_rad : ndarray, shape (V,)
    period : float
        π (parallel) or 2π (fan).
    fan_angles_rad : ndarray, shape (n_bins,), optional
        Fan angle of each detector element (fan beam only).

    Returns
    -------
    AngularWeights

    Examples
    --------
    >>> w = angular_weights(np.radians(np.arange(0, 90, 2.0)), np.pi)
    >>> w.scan, round(float(w.views.sum()), 6) == round(np.pi, 6)
    ('limited', True)
    """
    a = np.asarray(angles_rad, dtype=np.float64)
    w = view_weights(a, period)
    covered = float(w.sum())
    if covered >= _FULL * period:
        return AngularWeights(w, None, "full", covered)
    if fan_angles_rad is not None:
        start, extent = scan_arc(a)
        gamma = np.asarray(fan_angles_rad, dtype=np.float64)
        half_fan = float(np.max(np.abs(gamma)))
        if extent >= math.pi + 2 * half_fan - 1e-9:
            beta = np.mod(a - start, 2 * math.pi)
            beta = np.where(beta > extent + 1e-9, beta - 2 * math.pi, beta)  # rounding at the start
            delta = 0.5 * (extent - math.pi)
            return AngularWeights(w, 2.0 * parker_weights(beta, gamma, delta), "short", covered)
    return AngularWeights(w * (period / covered), None, "limited", covered)
