"""Classical reconstructions: TV beats FBP, CG-SENSE and L1-wavelet beat zero-filling, ADMM descends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medrecon.errors import SettingsError
from medrecon.operators import FanBeamCT, MaskedFourier, MultiCoilMRI, ParallelBeamCT, mri_mask
from medrecon.solvers.classical import ADMMTV, cg, fbp, l1_wavelet, operator_norm, tv, zero_filled
from medrecon.solvers.wavelet import Wavelet2D


def _phantom(n: int) -> torch.Tensor:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    return torch.from_numpy(resize(shepp_logan_phantom(), (n, n), anti_aliasing=True)).float()[None, None]


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.max() ** 2 / ((x - ref) ** 2).mean()))


def test_tv_beats_fbp_by_5db_on_23_views():
    img = _phantom(96)
    A = ParallelBeamCT.sparse_view(96, 23)
    y = A(img)
    p_fbp = _psnr(fbp(y, A), img)
    p_tv = _psnr(tv(y, A, lam=1e-4, iters=60, nonneg=True), img)
    assert p_tv >= p_fbp + 5, (p_tv, p_fbp)


def test_tv_on_fan_beam_and_volume_axes():
    img = _phantom(48)
    A = FanBeamCT(48, np.arange(40) * 2 * math.pi / 40, source_to_isocenter=100, source_to_detector=200)
    y = A(img)
    assert _psnr(tv(y, A, lam=1e-4, iters=30, nonneg=True), img) > _psnr(fbp(y, A), img) + 3
    vol = img.repeat(4, 1, 1, 1)  # slices on the batch axis
    B = ParallelBeamCT.sparse_view(48, 12)
    rec = tv(B(vol), B, lam=1e-4, iters=20, axes=("z", "y", "x"))
    assert rec.shape == vol.shape


def test_admm_objective_decreases():
    img = _phantom(48)
    A = ParallelBeamCT.sparse_view(48, 10)
    y = A(img)
    solver = ADMMTV(A, y, lam=1e-3, rho=1e-2)
    x = A.fbp(y)
    values = [solver.objective(x)]
    for _ in range(15):
        x = solver.step(x)
        values.append(solver.objective(x))
    assert values[-1] < 0.5 * values[0]
    assert values[-1] <= min(values[:5])


def test_cg_sense_beats_zero_filled():
    n = 64
    img = _phantom(n).to(torch.complex64)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    maps = torch.stack([torch.exp(-((xx - a) ** 2 + (yy - b) ** 2)) for a, b in [(-1, -1), (1, -1), (-1, 1), (1, 1)]])
    maps = (maps / torch.sqrt((maps**2).sum(0, keepdim=True))).to(torch.complex64)
    A = MultiCoilMRI(maps, mri_mask("equispaced", (n, n), 2, 0.1, seed=0))
    y = A(img)
    zf = zero_filled(y, A)
    rec = cg(y, A, iters=40)
    assert _psnr(rec.abs(), img.real) > _psnr(zf.abs(), img.real) + 8


def test_l1_wavelet_and_tv_beat_zero_filled_mri():
    n = 96
    img = _phantom(n)
    # L1-wavelet needs incoherent (2-D variable-density) sampling; 1-D masks alias coherently
    A = MaskedFourier(mri_mask("poisson", (n, n), 4, 0.08, seed=1))
    y = A(img)
    p_zf = _psnr(zero_filled(y, A).abs(), img)
    assert _psnr(l1_wavelet(y, A, lam=3e-3, iters=60).abs(), img) > p_zf + 5
    B = MaskedFourier(mri_mask("random", (n, n), 3, 0.1, seed=1))
    z = B(img)
    assert _psnr(tv(z, B, lam=1e-4, iters=40).abs(), img) > _psnr(zero_filled(z, B).abs(), img) + 5


def test_operator_norm_of_unitary_is_one():
    A = MaskedFourier(torch.ones(16, 16))
    assert operator_norm(A, torch.zeros(1, 1, 16, 16, dtype=torch.complex64)) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("wavelet", ["haar", "db4"])
def test_wavelet_is_orthonormal(wavelet):
    W = Wavelet2D((32, 64), wavelet, 3)
    x = torch.randn(2, 1, 32, 64, dtype=torch.float64)
    c = W(x)
    torch.testing.assert_close(torch.linalg.norm(c), torch.linalg.norm(x))
    torch.testing.assert_close(W.adjoint(c), x)
    z = torch.randn(1, 1, 32, 64, dtype=torch.complex128)
    torch.testing.assert_close(W.adjoint(W(z)), z)


def test_bad_settings():
    with pytest.raises(SettingsError, match="divisible"):
        Wavelet2D((30, 32), "db4", 3)
    with pytest.raises(SettingsError, match="unknown wavelet"):
        Wavelet2D((32, 32), "nope", 1)
    with pytest.raises(SettingsError, match="not a CT projector"):
        fbp(torch.zeros(1, 1, 8, 8, dtype=torch.complex64), MaskedFourier(torch.ones(8, 8)))
    A = MaskedFourier(torch.ones(8, 8))
    with pytest.raises(SettingsError, match="nonneg"):
        tv(A(torch.rand(1, 1, 8, 8)), A, nonneg=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
def test_cg_stops_at_rounding_level_on_a_singular_system(dtype):
    """A projection (eigenvalues 0 and 1) is solved in one step; afterwards the residual is
    rounding noise partly in the null space, where a naive CG divides by a zero curvature and
    blows up.  The solver must stay at the solution for any number of iterations."""
    from medrecon.linalg import conjugate_gradient

    g = torch.Generator().manual_seed(0)
    keep = (torch.rand(1, 1, 16, 16, generator=g) > 0.5).to(dtype)

    def normal(v):  # masked orthonormal FFT: Fᴴ M F, a projection
        return torch.fft.ifft2(keep * torch.fft.fft2(v, norm="ortho"), norm="ortho").to(dtype)

    rhs = normal(torch.randn(1, 1, 16, 16, generator=g).to(dtype))
    x = conjugate_gradient(normal, rhs, iters=50, tol=0.0)
    assert torch.isfinite(x).all()
    assert float((normal(x) - rhs).abs().max()) < 1e3 * torch.finfo(rhs.real.dtype).eps * float(rhs.abs().max())
    assert float(x.abs().max()) < 10 * float(rhs.abs().max())
