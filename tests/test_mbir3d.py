"""DiffusionMBIR (2-D prior + ADMM-TV along z) on small volumes with the analytic Gaussian prior."""

from __future__ import annotations

import math

import pytest
import torch

from medrecon.operators import ParallelBeamCT
from medrecon.priors.sde import VESDE
from medrecon.solvers import pieces
from medrecon.solvers.analytic import GaussianPrior, periodic_rbf_covariance
from medrecon.solvers.presets import chunk_for_budget, run_diffusion

N, Z = 8, 6


@pytest.fixture(scope="module")
def problem():
    prior = GaussianPrior(0.5 * torch.ones(N, N, dtype=torch.float64), periodic_rbf_covariance(N), VESDE(0.01, 5.0))
    base = prior.sample(1, torch.Generator().manual_seed(0))
    drift = prior.sample(1, torch.Generator().manual_seed(1)) - 0.5
    w = torch.linspace(0, 1, Z, dtype=torch.float64).reshape(Z, 1, 1, 1)
    vol = base + 0.3 * w * drift  # slowly varying along z
    A = ParallelBeamCT(N, torch.arange(3).double().numpy() * math.pi / 3)
    return prior, A, vol, A(vol)


def test_admm_step_lowers_its_objective(problem):
    _, A, vol, y = problem
    step = pieces.admm_tv(A, y, lam=1e-2, rho=1e-1, cg_iters=3)
    g = torch.Generator().manual_seed(0)
    x = vol + 0.3 * torch.randn(vol.shape, generator=g, dtype=vol.dtype)
    values = [step.solver.objective(x)]
    for _ in range(4):
        x = step(x, torch.zeros(Z), g)
        values.append(step.solver.objective(x))
    assert values[1] < values[0] and values[-1] < 0.5 * values[0], values


@pytest.mark.parametrize("method", ["mbir3d", "dds3d"])
def test_chunked_and_unchunked_agree(problem, method):
    prior, A, _, y = problem
    kw = dict(n_samples=1, seed=3, steps=30)
    a, _ = run_diffusion(y, A, prior, method, **kw)
    b, _ = run_diffusion(y, A, prior, method, chunk=2, **kw)
    torch.testing.assert_close(a, b)


def test_dds3d_data_step_lowers_its_objective_from_each_estimate(problem):
    """The DDS-3D data consistency solves its own problem around each new x̂₀: from any start
    its ADMM iterations lower ½‖Ax − y‖²/‖A‖² + lam·TV_z, and it does not carry state between
    calls (the same input gives the same output twice)."""
    _, A, vol, y = problem
    step = pieces.admm_tv_consistency(A, y, lam=1e-2, rho=1e-1, iters=4, cg_iters=3)
    g = torch.Generator().manual_seed(0)
    x0 = vol + 0.3 * torch.randn(vol.shape, generator=g, dtype=vol.dtype)
    x = step(x0, torch.zeros(Z), g)
    assert step.solver.objective(x) < 0.5 * step.solver.objective(x0)
    torch.testing.assert_close(step(x0, torch.zeros(Z), g), x)


def test_volume_larger_than_budget_still_runs(problem):
    prior, A, vol, y = problem
    assert chunk_for_budget(1.0, vol) == 1
    smp, info = run_diffusion(y, A, prior, "mbir3d", n_samples=2, seed=0, steps=20, max_memory=1.0)
    assert smp.shape == (2, *vol.shape) and info["n_samples"] == 2
    assert not torch.allclose(smp[0], smp[1])  # independent posterior samples


#: each volume method and the slice-wise method it extends
PAIRS = [("mbir3d", "ccdf"), ("dds3d", "dds")]


@pytest.mark.parametrize("method3d,method2d", PAIRS)
def test_volume_method_is_more_coherent_along_z_than_slicewise(problem, method3d, method2d):
    """The TV along z makes neighbouring slices agree: the inter-slice error
    mean|D_z(x − x_true)| must fall below that of the same prior and steps run slice by slice."""
    prior, A, vol, y = problem
    kw = dict(n_samples=4, seed=0, steps=60, t0=0.5)
    m3d, _ = run_diffusion(y, A, prior, method3d, lam_tv=5e-2, rho_tv=1e-1, admm_cg_iters=2, **kw)
    m2d, _ = run_diffusion(y, A, prior, method2d, **kw)

    def z_err(x):
        e = x.mean(0) - vol
        return float((e[1:] - e[:-1]).abs().mean())

    assert z_err(m3d) < z_err(m2d)


def test_reconstruct_api_mbir3d(problem):
    from medrecon import reconstruct

    prior, A, vol, _ = problem
    hu = vol * 4096 - 1024
    rec = reconstruct(A(hu), A, method="mbir3d", prior=prior, n_samples=2, steps=20, tv_axes=("z", "y", "x"))
    assert rec.mean.shape == vol.shape and rec.std.shape == vol.shape


def _operators():
    """Every operator kind the 3-D method supports, on an N×N slice; MRI masks differ per slice."""
    from medrecon.datasets.simulate import birdcage_coil_maps
    from medrecon.operators import FanBeamCT, MaskedFourier, MultiCoilMRI, mri_mask

    masks = torch.stack([mri_mask("random", (N, N), 2, 0.25, seed=z) for z in range(Z)])
    maps = torch.from_numpy(birdcage_coil_maps(4, (N, N))).to(torch.complex128)
    return {
        "parallel-limited-angle": ParallelBeamCT.limited_angle(N, math.pi / 2, n_full=8),
        "fan-sparse-view": FanBeamCT(N, torch.arange(6).double().numpy() * math.pi / 3,
                                     source_to_isocenter=3 * N, source_to_detector=5 * N),
        "single-coil-per-slice-masks": MaskedFourier(masks),
        "multi-coil-per-slice-masks": MultiCoilMRI(maps, masks),
    }


@pytest.mark.parametrize("method3d,method2d", PAIRS)
@pytest.mark.parametrize("kind", ["parallel-limited-angle", "fan-sparse-view", "single-coil-per-slice-masks",
                                  "multi-coil-per-slice-masks"])
def test_volume_method_on_every_operator_kind(problem, kind, method3d, method2d):
    """The same volume through each operator: mbir3d and dds3d return finite samples that fit the data
    and use it (closer to the truth than the prior mean), and its TV along z makes the
    inter-slice error smaller than the same prior and steps run slice by slice."""
    prior, _, vol, _ = problem
    A = _operators()[kind]
    x = vol.to(torch.complex128) if A.in_complex else vol
    y = A(x)
    kw = dict(n_samples=4, seed=0, steps=60, t0=0.5)
    m3d, info = run_diffusion(y, A, prior, method3d, lam_tv=5e-2, rho_tv=1e-1, admm_cg_iters=2, chunk=4, **kw)
    m2d, _ = run_diffusion(y, A, prior, method2d, **kw)
    assert m3d.shape == (4, *x.shape) and torch.isfinite(m3d).all() and info["steps_run"] > 0
    mean = m3d.mean(0)
    assert float((mean - x).abs().mean()) < float((prior.mean.reshape(1, 1, N, N) - x).abs().mean())
    assert float(torch.linalg.norm(A(mean) - y) / torch.linalg.norm(y)) < 0.1

    def z_err(s):
        e = s.mean(0) - x
        return float((e[1:] - e[:-1]).abs().mean())

    assert z_err(m3d) < z_err(m2d), (z_err(m3d), z_err(m2d))
