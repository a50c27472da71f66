"""Orthonormal 2-D discrete wavelet transform (periodic boundary) in torch.

The filters come from PyWavelets' tables (a SigPy dependency); the transform is written here
on ``torch.nn.functional.conv1d`` so that it runs batched, on the input's device and under
autograd.  With periodic extension and an even length ≥ the filter length the transform is
orthogonal, so its adjoint is its inverse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from medrecon.errors import SettingsError
from medrecon.operators.base import LinearOperator

__all__ = ["Wavelet2D"]


def _filters(name: str) -> tuple[list[float], list[float]]:
    import pywt

    try:
        w = pywt.Wavelet(name)
    except ValueError as err:
        raise SettingsError(f"Wavelet2D: unknown wavelet {name!r} (try 'haar', 'db2', 'db4')") from err
    if not w.orthogonal:
        raise SettingsError(f"Wavelet2D: wavelet {name!r} is not orthogonal")
    return list(w.dec_lo), list(w.dec_hi)


def _analysis_1d(x: Tensor, lo: Tensor, hi: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """One level along ``dim``: periodic correlation with the filters, downsampled by 2."""
    x = x.movedim(dim, -1)
    shape = x.shape
    n = shape[-1]
    taps = lo.shape[-1]
    flat = x.reshape(-1, 1, n)
    # a[k] = Σ_j h[j] x[(2k + j) mod n]
    idx = torch.arange(n + taps - 1, device=x.device) % n
    ext = flat[..., idx]
    kern = torch.stack([lo, hi])[:, None, :]  # conv1d correlates: out[k] = Σ_j h[j]·ext[2k + j]
    out = F.conv1d(ext, kern, stride=2)[..., : n // 2]
    a = out[:, 0].reshape(*shape[:-1], n // 2).movedim(-1, dim)
    d = out[:, 1].reshape(*shape[:-1], n // 2).movedim(-1, dim)
    return a, d


def _synthesis_1d(a: Tensor, d: Tensor, lo: Tensor, hi: Tensor, dim: int) -> Tensor:
    """Adjoint (= inverse) of :func:`_analysis_1d`."""
    a = a.movedim(dim, -1)
    d = d.movedim(dim, -1)
    shape = a.shape
    half = shape[-1]
    n = 2 * half
    both = torch.stack([a.reshape(-1, half), d.reshape(-1, half)], 1)  # (M, 2, n/2)
    kern = torch.stack([lo, hi])[:, None, :]  # (2, 1, taps)
    ext = F.conv_transpose1d(both, kern, stride=2)  # (M, 1, n + taps - 2)
    ext = ext[:, 0]
    out = ext[..., :n].clone()
    tail = ext[..., n:]
    idx = torch.arange(tail.shape[-1], device=a.device) % n
    out.index_add_(-1, idx, tail)
    return out.reshape(*shape[:-1], n).movedim(-1, dim)


class Wavelet2D(LinearOperator):
    """Multi-level orthonormal 2-D DWT of ``(B, C, H, W)`` images, coefficients in place.

    The output has the input's shape (Mallat layout: the coarsest approximation in the top-left
    corner).  H and W must be divisible by ``2**levels``; pad the image first otherwise.

    Parameters
    ----------
    shape : (H, W)
    wavelet : str
        An orthogonal PyWavelets name ("haar", "db2", "db4", "sym4", ...).
    levels : int
    """

    def __init__(self, shape: tuple[int, int], wavelet: str = "db4", levels: int = 3):
        h, w = shape
        if levels < 1 or h % (2**levels) or w % (2**levels):
            raise SettingsError(
                f"Wavelet2D: image size {shape} must be divisible by 2**levels = {2**levels}"
            )
        lo, hi = _filters(wavelet)
        if min(h, w) // 2 ** (levels - 1) < len(lo):
            raise SettingsError(f"Wavelet2D: {levels} levels of {wavelet!r} need a larger image than {shape}")
        self._lo, self._hi = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
        self.levels = levels
        super().__init__((None, h, w), (None, h, w))
        self.complex_ok = True

    def _f(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dt = x.real.dtype if x.is_complex() else x.dtype
        return self._lo.to(x.device, dt), self._hi.to(x.device, dt)

    def _forward(self, x: Tensor) -> Tensor:
        if x.is_complex():
            return torch.complex(self._forward(x.real), self._forward(x.imag))
        lo, hi = self._f(x)
        out = x.clone()
        h, w = x.shape[-2:]
        for _ in range(self.levels):
            block = out[..., :h, :w]
            a, d = _analysis_1d(block, lo, hi, -1)
            aa, ad = _analysis_1d(a, lo, hi, -2)
            da, dd = _analysis_1d(d, lo, hi, -2)
            out[..., :h, :w] = torch.cat([torch.cat([aa, da], -1), torch.cat([ad, dd], -1)], -2)
            h, w = h // 2, w // 2
        return out

    def _adjoint(self, y: Tensor) -> Tensor:
        if y.is_complex():
            return torch.complex(self._adjoint(y.real), self._adjoint(y.imag))
        lo, hi = self._f(y)
        out = y.clone()
        sizes = [(y.shape[-2] >> k, y.shape[-1] >> k) for k in range(self.levels)]
        for h, w in reversed(sizes):
            block = out[..., :h, :w]
            aa, da = block[..., : h // 2, : w // 2], block[..., : h // 2, w // 2 :]
            ad, dd = block[..., h // 2 :, : w // 2], block[..., h // 2 :, w // 2 :]
            a = _synthesis_1d(aa, ad, lo, hi, -2)
            d = _synthesis_1d(da, dd, lo, hi, -2)
            out[..., :h, :w] = _synthesis_1d(a, d, lo, hi, -1)
        return out
