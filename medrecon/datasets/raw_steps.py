"""The steps that make raw scanner k-space ready to reconstruct, each a function ``KSpace → KSpace``.

:func:`prepare_raw` runs them in this order, and each appends what it did to
``header["raw_steps"]`` (a list of ``{"step": ..., "note": ...}``):

1. :func:`prewhiten` – coil noise prewhitening with the noise covariance of the noise scan, or,
   when the file has none, of the samples at the corners of k-space (where the signal is
   weakest), saying which;
2. :func:`remove_readout_oversampling` – inverse FFT along the readout, keep the central
   ``1 / factor`` of the field of view, FFT back;
3. :func:`medrecon.datasets.partial_fourier.fill_partial_fourier` – an asymmetric echo (or
   phase partial Fourier): zero-filled (default), homodyne or POCS;
4. :func:`compress_coils` – optional SVD coil compression to fewer virtual coils.

Conventions: the k-space of a raw reader, rows phase encoding and columns readout
(``header["readout_axis"] = -1``; a fastMRI-layout k-space has its readout along the rows, -2),
centred orthonormal FFT (:mod:`medrecon.datasets.types`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from medrecon.datasets.types import KSpace
from medrecon.errors import SettingsError, ShapeError

__all__ = [
    "noise_covariance",
    "whitening_matrix",
    "edge_noise_samples",
    "prewhiten",
    "remove_readout_oversampling",
    "compress_coils",
    "calibration_kspace",
    "calibration_width",
    "prepare_raw",
    "readout_axis",
]

#: share of each axis, from either edge, whose corner samples estimate the noise when there is no noise scan
EDGE_FRACTION = 0.1


def readout_axis(kspace: KSpace) -> int:
    """The readout axis of ``kspace.data``: -1 for raw readers and BART, -2 for fastMRI files."""
    if "readout_axis" in kspace.header:
        return int(kspace.header["readout_axis"])
    return -2 if kspace.header.get("layout") in ("multicoil", "singlecoil") else -1


def _log(kspace: KSpace, step: str, note: str, **extra: Any) -> dict[str, Any]:
    header = dict(kspace.header)
    header["raw_steps"] = [*header.get("raw_steps", []), {"step": step, "note": note, **extra}]
    return header


def noise_covariance(samples: np.ndarray) -> np.ndarray:
    """Coil noise covariance ``Ψ = n nᴴ / N`` of noise samples.

    Parameters
    ----------
    samples : ndarray, shape (coils, N), complex
        Noise samples (zero mean).

    Returns
    -------
    ndarray, shape (coils, coils), complex128, Hermitian

    Examples
    --------
    >>> import numpy as np
    >>> n = np.random.default_rng(0).standard_normal((2, 100000)) + 0j
    >>> np.round(noise_covariance(n).real, 1)
    array([[1., 0.],
           [0., 1.]])
    """
    n = np.asarray(samples)
    if n.ndim != 2 or n.shape[1] < 2:
        raise ShapeError(
            f"noise_covariance(): samples must be (coils, N) with N ≥ 2; got shape {n.shape}"
        )
    n = n.astype(np.complex128)
    return (n @ n.conj().T) / n.shape[1]


def whitening_matrix(covariance: np.ndarray) -> np.ndarray:
    """``W = L⁻¹`` with ``Ψ = L Lᴴ`` (Cholesky), so that ``W Ψ Wᴴ = I``.

    A covariance that is not positive definite (a dead coil) gets ``1e-6 · trace / coils`` added
    to its diagonal first.

    Returns
    -------
    ndarray, shape (coils, coils), complex128, lower triangular
    """
    psi = np.asarray(covariance, np.complex128)
    if psi.ndim != 2 or psi.shape[0] != psi.shape[1]:
        raise ShapeError(f"whitening_matrix(): covariance must be square; got shape {psi.shape}")
    psi = 0.5 * (psi + psi.conj().T)
    try:
        low = np.linalg.cholesky(psi)
    except np.linalg.LinAlgError:
        eps = 1e-6 * max(float(np.trace(psi).real) / psi.shape[0], 1e-30)
        low = np.linalg.cholesky(psi + eps * np.eye(psi.shape[0]))
    return np.linalg.inv(low)


def edge_noise_samples(kspace: KSpace, fraction: float = EDGE_FRACTION) -> np.ndarray:
    """Measured samples in the four corners of k-space, the outer ``fraction`` of both axes.

    Returns
    -------
    ndarray, shape (coils, N), complex
    """
    c, nz, ny, nx = kspace.data.shape
    fy, fx = max(1, int(round(fraction * ny))), max(1, int(round(fraction * nx)))
    corner = np.zeros((ny, nx), bool)
    for rows in (slice(0, fy), slice(ny - fy, ny)):
        for cols in (slice(0, fx), slice(nx - fx, nx)):
            corner[rows, cols] = True
    mask = np.broadcast_to(kspace.mask, (nz, ny, nx)) & corner
    return kspace.data[:, mask]


def _apply_coils(matrix: np.ndarray, array: np.ndarray | None) -> np.ndarray | None:
    if array is None:
        return None
    flat = array.reshape(array.shape[0], -1)
    return (matrix @ flat).astype(np.complex64).reshape((matrix.shape[0], *array.shape[1:]))


def prewhiten(kspace: KSpace, *, source: str = "auto") -> KSpace:
    """Decorrelate the coils and give each unit noise variance: ``y ← W y`` (:func:`whitening_matrix`).

    Parameters
    ----------
    kspace : KSpace
    source : {"auto", "noise", "edge"}
        ``noise``: the noise scan (``kspace.noise``, refused when absent); ``edge``: the samples
        at the corners of k-space (:func:`edge_noise_samples`); ``auto``: the noise scan when
        there is one, else the edge.  A noise scan of another dwell time than the data is scaled
        by the ratio (noise variance ∝ bandwidth) when the header gives both.

    Returns
    -------
    KSpace
        Data, calibration lines and noise prewhitened; ``header["raw_steps"]`` says which
        estimate was used, from how many samples, and the covariance's condition number.

    Raises
    ------
    SettingsError
        ``source="noise"`` without a noise scan; too few samples to estimate the covariance.
    """
    if source not in ("auto", "noise", "edge"):
        raise SettingsError(
            f"prewhiten(): source must be 'auto', 'noise' or 'edge'; got {source!r}"
        )
    coils = kspace.n_coils
    raw = kspace.header.get("raw", {})
    if source == "noise" and kspace.noise is None:
        raise SettingsError("prewhiten(source='noise'): this k-space has no noise scan")
    if kspace.noise is not None and source != "edge":
        samples, what = kspace.noise, f"noise scan ({kspace.noise.shape[1]} samples per coil)"
        scale = 1.0
        if raw.get("noise_dwell_time_us") and raw.get("dwell_time_us"):
            scale = float(raw["noise_dwell_time_us"]) / float(raw["dwell_time_us"])
            what += f", scaled by the dwell-time ratio {scale:.3g}"
    else:
        samples = edge_noise_samples(kspace)
        what = f"k-space edge: {samples.shape[1]} samples per coil in the corners (outer {EDGE_FRACTION:.0%} of both axes)"
        scale = 1.0
        if kspace.noise is None:
            what += "; no noise scan in the file"
    if samples.shape[1] < max(2 * coils, 16):
        raise SettingsError(
            f"prewhiten(): {samples.shape[1]} noise samples cannot estimate a {coils}×{coils} "
            "covariance (need at least twice as many as coils)"
        )
    psi = noise_covariance(samples) * scale
    w = whitening_matrix(psi)
    eig = np.linalg.eigvalsh(0.5 * (psi + psi.conj().T))
    cond = float(eig.max() / max(eig.min(), 1e-30))
    header = _log(kspace, "prewhiten", what, condition_number=round(cond, 3))
    return replace(
        kspace,
        data=_apply_coils(w, kspace.data),
        header=header,
        noise=_apply_coils(w, kspace.noise),
        calibration=_apply_coils(w, kspace.calibration),
        coil_maps=None,
    )


def _ifft1c(x: np.ndarray, axis: int) -> np.ndarray:
    return np.fft.fftshift(
        np.fft.ifft(np.fft.ifftshift(x, axes=axis), axis=axis, norm="ortho"), axes=axis
    )


def _fft1c(x: np.ndarray, axis: int) -> np.ndarray:
    return np.fft.fftshift(
        np.fft.fft(np.fft.ifftshift(x, axes=axis), axis=axis, norm="ortho"), axes=axis
    )


def remove_readout_oversampling(kspace: KSpace, factor: float | None = None) -> KSpace:
    """Keep the central ``1 / factor`` of the readout field of view.

    Inverse FFT along the readout, crop the image to ``round(n / factor)`` (even) samples about
    its centre, FFT back (centred, orthonormal: the image keeps its pixel values, white noise its
    variance).  The k-space sample spacing grows by ``factor``: a
    measured readout range ``[a, b]`` (relative to the centre) becomes ``[⌈a / f⌉, ⌊b / f⌋]``,
    and the unmeasured columns (an asymmetric echo) stay zero and unmeasured.

    Parameters
    ----------
    kspace : KSpace
    factor : float, optional
        Oversampling factor; default ``header["raw"]["readout_oversampling"]`` (1: nothing done).
    """
    f = float(
        factor
        if factor is not None
        else kspace.header.get("raw", {}).get("readout_oversampling", 1.0)
    )
    if f < 1:
        raise SettingsError(f"remove_readout_oversampling(): factor must be ≥ 1; got {f:g}")
    axis = readout_axis(kspace)
    n = kspace.data.shape[axis]
    n_new = int(round(n / f))
    n_new += n_new % 2
    if f == 1 or n_new >= n:
        return replace(kspace, header=_log(kspace, "readout oversampling", "none (factor 1)"))
    lo = n // 2 - n_new // 2

    def last(a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a, axis, -1)

    def crop(a: np.ndarray) -> np.ndarray:
        return _fft1c(_ifft1c(last(a), -1)[..., lo : lo + n_new], -1).astype(np.complex64)

    mask = last(kspace.mask)
    cols = np.flatnonzero(mask.any(axis=(0, 1))) - n // 2
    first, final = int(np.ceil(cols.min() / f)), int(np.floor(cols.max() / f))
    profile = np.zeros(n_new, bool)
    profile[max(0, first + n_new // 2) : min(n_new, final + n_new // 2 + 1)] = True
    new_mask = (
        mask.any(axis=-1, keepdims=True) & profile
    )  # the measured lines, on the new readout range
    data = crop(kspace.data) * new_mask[None]
    calib = None
    if kspace.calibration is not None:
        lines = np.any(last(kspace.calibration) != 0, axis=(0, -1))[..., None]
        calib = np.moveaxis(crop(kspace.calibration) * (lines & profile)[None], -1, axis)
    header = _log(
        kspace, "readout oversampling", f"removed: factor {f:g}, {n} → {n_new} readout samples"
    )
    if "raw" in header:
        header["raw"] = {**header["raw"], "readout_oversampling": 1.0}
    return replace(
        kspace,
        data=np.moveaxis(data, -1, axis),
        mask=np.moveaxis(new_mask, -1, axis),
        calibration=calib,
        header=header,
        coil_maps=None,
    )


def compress_coils(kspace: KSpace, n_virtual: int) -> KSpace:
    """SVD coil compression: project the coils onto the ``n_virtual`` strongest singular vectors.

    The singular vectors come from all measured samples (after prewhitening, so every coil has
    the same noise); data, calibration lines and noise are projected alike.  The step's note
    gives the share of the signal energy kept.

    Raises
    ------
    SettingsError
        ``n_virtual`` < 1 or more than the coils.
    """
    c = kspace.n_coils
    if not 1 <= int(n_virtual) <= c:
        raise SettingsError(
            f"compress_coils(): n_virtual must be 1..{c} (the coils); got {n_virtual}"
        )
    if int(n_virtual) == c:
        return replace(kspace, header=_log(kspace, "coil compression", f"none ({c} coils kept)"))
    samples = kspace.data[:, np.broadcast_to(kspace.mask, kspace.data.shape[1:])]
    u, s, _ = np.linalg.svd(samples.astype(np.complex128), full_matrices=False)
    p = u[:, : int(n_virtual)].conj().T
    kept = float((s[: int(n_virtual)] ** 2).sum() / max((s**2).sum(), 1e-30))
    header = _log(
        kspace,
        "coil compression",
        f"{c} → {int(n_virtual)} virtual coils (SVD), {kept:.2%} of the energy kept",
    )
    return replace(
        kspace,
        data=_apply_coils(p, kspace.data),
        noise=_apply_coils(p, kspace.noise),
        calibration=_apply_coils(p, kspace.calibration),
        header=header,
        coil_maps=None,
    )


def calibration_kspace(kspace: KSpace) -> np.ndarray:
    """The k-space to estimate coil maps from: the data, with the reference lines filled in where not measured.

    Returns
    -------
    ndarray, shape (coils, Z, ky, kx), complex
    """
    if kspace.calibration is None:
        return kspace.data
    return np.where(
        np.broadcast_to(kspace.mask, kspace.data.shape[1:])[None], kspace.data, kspace.calibration
    )


def calibration_width(kspace: KSpace, limit: int = 24) -> int:
    """Side of the largest fully measured centred square (data + reference lines), at most ``limit``.

    ESPIRiT (:func:`medrecon.operators.estimate_coil_maps`) takes a square calibration region.
    """
    k = calibration_kspace(kspace)
    measured = (
        np.all(np.any(k != 0, axis=0), axis=0) if k.shape[1] > 0 else np.zeros(k.shape[2:], bool)
    )
    ny, nx = measured.shape
    width = 0
    for w in range(2, min(ny, nx, limit) + 1, 2):
        if measured[ny // 2 - w // 2 : ny // 2 + w // 2, nx // 2 - w // 2 : nx // 2 + w // 2].all():
            width = w
        else:
            break
    return width


def prepare_raw(
    kspace: KSpace,
    *,
    prewhitening: str = "auto",
    oversampling: bool = True,
    partial_fourier: str = "zero-fill",
    coils: int | None = None,
) -> KSpace:
    """Run the raw-data steps in order (module docstring); ``header["raw_steps"]`` says what each did.

    Parameters
    ----------
    kspace : KSpace
        From :func:`~medrecon.datasets.twix.load_twix` or :func:`~medrecon.datasets.mrd.load_mrd`.
    prewhitening : {"auto", "noise", "edge", "off"}
        See :func:`prewhiten`; ``off`` skips it.
    oversampling : bool
        Remove the readout oversampling the header states.
    partial_fourier : {"zero-fill", "homodyne", "pocs"}
        See :func:`~medrecon.datasets.partial_fourier.fill_partial_fourier`.
    coils : int, optional
        Compress to this many virtual coils.
    """
    from medrecon.datasets.partial_fourier import fill_partial_fourier

    k = kspace
    if prewhitening != "off":
        k = prewhiten(k, source=prewhitening)
    else:
        k = replace(k, header=_log(k, "prewhiten", "off"))
    if oversampling:
        k = remove_readout_oversampling(k)
    k = fill_partial_fourier(k, partial_fourier)
    if coils is not None:
        k = compress_coils(k, coils)
    return k
