"""Cartesian MRI: centred orthonormal FFT, single-coil masked Fourier and multi-coil SENSE.

Conventions
-----------
* The FFT is centred and orthonormal on the last two axes:
  ``fft2c(x) = fftshift(fft2(ifftshift(x), norm="ortho"))``; ``ifft2c`` is its inverse and adjoint.
* Images are complex ``(B, C, H, W)`` (real input is promoted); k-space keeps the measured
  samples on the full grid with zeros elsewhere (the fastMRI convention), so the reduction ``P``
  of ``A = P·Λ·T`` is the restriction to the mask's support, stored zero-filled.
* Masks are boolean ``(H, W)`` (one pattern for the batch) or ``(B, H, W)`` (one per slice).
* Coil maps are complex ``(coils, H, W)``, or ``(B, coils, H, W)`` per slice; coil axis first.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from medrecon.errors import ShapeError
from medrecon.operators.base import LinearOperator, SamplingOperator, match_tensor

__all__ = ["fft2c", "ifft2c", "FFT2c", "CoilExpand", "MaskedFourier", "MultiCoilMRI", "estimate_coil_maps"]

_DIMS = (-2, -1)


def fft2c(x: Tensor) -> Tensor:
    """Centred orthonormal 2-D FFT over the last two axes."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_DIMS), norm="ortho"), dim=_DIMS)


def ifft2c(k: Tensor) -> Tensor:
    """Centred orthonormal inverse 2-D FFT over the last two axes (the adjoint of :func:`fft2c`)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=_DIMS), norm="ortho"), dim=_DIMS)


class FFT2c(LinearOperator):
    """The centred orthonormal 2-D FFT as a unitary operator on ``(B, C, H, W)``."""

    def __init__(self, shape: tuple[int, int]):
        super().__init__((None, *shape), (None, *shape), in_complex=True, out_complex=True)

    def _forward(self, x: Tensor) -> Tensor:
        return fft2c(x)

    def _adjoint(self, y: Tensor) -> Tensor:
        return ifft2c(y)

    def _normal(self, x: Tensor) -> Tensor:
        return x


def _mask_tensor(mask: Tensor | np.ndarray, who: str) -> Tensor:
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask)
    if m.is_complex() or m.ndim not in (2, 3):
        raise ShapeError(f"{who}: mask must be real (H, W) or (B, H, W), got shape {tuple(m.shape)} {m.dtype}")
    return (m != 0).reshape(m.shape if m.ndim == 2 else (m.shape[0], 1, *m.shape[1:]))


def per_slice(w: Tensor, batch: int, what: str) -> Tensor:
    """Per-slice weights ``w`` (Z, ...) for a batch of ``batch`` items.

    A batch of ``k·Z`` items is ``k`` volumes of ``Z`` slices one after the other (posterior
    samples, as ``y.repeat(k, ...)`` stacks them): ``w`` repeats ``k`` times.  A single set
    (``Z = 1``) broadcasts.
    """
    z = w.shape[0]
    if z in (1, batch):
        return w
    if batch % z:
        raise ShapeError(f"{what} is per slice for {z} slices; the input's batch {batch} is not a multiple of it")
    return w.repeat(batch // z, *([1] * (w.ndim - 1)))


class CoilExpand(LinearOperator):
    """Multiply an image by each coil sensitivity: ``(B, 1, H, W) -> (B, coils, H, W)``.

    The adjoint combines coil images with the conjugate maps.
    """

    def __init__(self, maps: Tensor):
        if not isinstance(maps, Tensor):
            maps = torch.as_tensor(np.asarray(maps))
        if maps.ndim not in (3, 4):
            raise ShapeError(
                f"CoilExpand: maps must be (coils, H, W) or (B, coils, H, W) complex, got shape {tuple(maps.shape)}"
            )
        self.maps = maps if maps.ndim == 4 else maps[None]
        coils, h, w = self.maps.shape[1:]
        super().__init__((1, h, w), (coils, h, w), in_complex=True, out_complex=True)

    def _check_batch(self, x: Tensor) -> Tensor:
        return per_slice(match_tensor(self.maps, x), x.shape[0], "CoilExpand: maps")

    def _forward(self, x: Tensor) -> Tensor:
        return self._check_batch(x) * x

    def _adjoint(self, y: Tensor) -> Tensor:
        return (self._check_batch(y).conj() * y).sum(1, keepdim=True)


class _Cartesian(SamplingOperator):
    """Shared pieces of the Cartesian MRI operators: ``A = Λ·T`` on the k-space grid."""

    def __init__(self, T: LinearOperator, mask: Tensor, who: str):  # noqa: N803
        self.T = T
        self.mask = mask
        super().__init__(T.in_shape, T.out_shape, in_complex=True, out_complex=True, name=who)

    def _m(self, z: Tensor) -> Tensor:
        m = match_tensor(self.mask, z)
        return per_slice(m, z.shape[0], f"{self.name}: mask") if m.ndim == 4 else m

    def _forward(self, x: Tensor) -> Tensor:
        return self.reduce(self.T._forward(x))

    def _adjoint(self, y: Tensor) -> Tensor:
        return self.T._adjoint(self.reduce(y))

    def reduce(self, z: Tensor) -> Tensor:
        return self._m(z) * z

    def expand(self, y: Tensor) -> Tensor:
        return self._m(y) * y

    def T_inverse(self, z: Tensor) -> Tensor:  # noqa: N802
        """Tᴴ (exact inverse for single coil; for SENSE exact where Σ|S|² = 1)."""
        return self.T._adjoint(z)

    def zero_filled(self, y: Tensor) -> Tensor:
        """The zero-filled reconstruction ``Aᴴ y``."""
        return self.adjoint(y)


class MaskedFourier(_Cartesian):
    """Single-coil Cartesian MRI ``y = Λ · fft2c(x)``: ``(B, C, H, W) -> (B, C, H, W)`` complex.

    Parameters
    ----------
    mask : Tensor or ndarray, shape (H, W) or (B, H, W)
        Non-zero where k-space is measured.

    Examples
    --------
    >>> import torch
    >>> from medrecon.operators import MaskedFourier, mri_mask
    >>> A = MaskedFourier(mri_mask("equispaced", (32, 32), acceleration=4))
    >>> A(torch.rand(2, 1, 32, 32)).dtype
    torch.complex64
    """

    def __init__(self, mask: Tensor | np.ndarray):
        m = _mask_tensor(mask, "MaskedFourier")
        super().__init__(FFT2c(tuple(m.shape[-2:])), m, "MaskedFourier")


class MultiCoilMRI(_Cartesian):
    """Multi-coil SENSE ``y_c = Λ · fft2c(S_c · x)``: ``(B, 1, H, W) -> (B, coils, H, W)`` complex.

    Parameters
    ----------
    maps : Tensor, shape (coils, H, W) or (B, coils, H, W), complex
        Coil sensitivities (e.g. from :func:`estimate_coil_maps`).
    mask : Tensor or ndarray, shape (H, W) or (B, H, W)
    """

    def __init__(self, maps: Tensor, mask: Tensor | np.ndarray):
        expand = CoilExpand(maps)
        m = _mask_tensor(mask, "MultiCoilMRI")
        if tuple(m.shape[-2:]) != tuple(expand.out_shape[1:]):
            raise ShapeError(
                f"MultiCoilMRI: mask must match the maps' image size {tuple(expand.out_shape[1:])}, got {tuple(m.shape)}"
            )
        self.maps = expand.maps
        super().__init__(FFT2c(tuple(m.shape[-2:])) @ expand, m, "MultiCoilMRI")

    @classmethod
    def from_kspace(cls, kspace: Tensor, mask: Tensor | np.ndarray, calib_width: int = 24, **kw) -> MultiCoilMRI:
        """Build the operator with ESPIRiT maps estimated from the k-space's calibration region.

        Parameters
        ----------
        kspace : Tensor, shape (coils, H, W), complex
        """
        return cls(estimate_coil_maps(kspace, calib_width, **kw), mask)


def estimate_coil_maps(
    kspace: Tensor | np.ndarray, calib_width: int = 24, threshold: float = 0.02, crop: float = 0.95
) -> Tensor:
    """ESPIRiT coil sensitivities (SigPy ``EspiritCalib``) from the centre of k-space.

    Parameters
    ----------
    kspace : Tensor or ndarray, shape (coils, H, W), complex
        Centred k-space (undersampled is fine as long as the calibration region is full).
    calib_width : int
        Width of the square calibration region.
    threshold, crop : float
        ESPIRiT singular-value threshold and eigenvalue crop.

    Returns
    -------
    Tensor, shape (coils, H, W), complex64 (complex128 for complex128 input)
    """
    import sigpy.mri

    k = kspace.detach().cpu().numpy() if isinstance(kspace, Tensor) else np.asarray(kspace)
    if k.ndim != 3 or not np.iscomplexobj(k):
        raise ShapeError(f"estimate_coil_maps(): kspace must be (coils, H, W) complex, got shape {k.shape} {k.dtype}")
    if calib_width > min(k.shape[1:]):
        raise ShapeError(f"estimate_coil_maps(): calib_width {calib_width} exceeds k-space size {k.shape[1:]}")
    maps = sigpy.mri.app.EspiritCalib(
        k, calib_width=calib_width, thresh=threshold, crop=crop, show_pbar=False
    ).run()
    out = torch.from_numpy(np.asarray(maps).astype(np.complex128 if k.dtype == np.complex128 else np.complex64))
    return out.to(kspace.device) if isinstance(kspace, Tensor) else out
