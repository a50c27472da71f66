"""DiffusionMBIR (2-D prior + ADMM-TV along z) on small volumes with the analytic Gaussian prior."""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------ issue 34: 3-D TV start, weights, speed
@pytest.mark.parametrize("method", ["dds3d", "mbir3d"])
def test_volume_methods_start_from_3d_tv_and_return_it_at_t0_zero(problem, method):
    """The start of a volume method is the 3-D TV volume of ``reconstruct(method="tv",
    axes=("z", "y", "x"))``, and with t₀ = 0 the method returns it exactly, with no network
    evaluation and no spread; any t₀ > 0 refines it."""
    from medrecon import reconstruct

    prior, A, vol, _ = problem
    hu = vol * 4096 - 1024
    y = A(hu)
    tv3d = reconstruct(y, A, method="tv", axes=("z", "y", "x"))
    rec = reconstruct(y, A, method=method, prior=prior, n_samples=2, t0=0.0)
    assert rec.info["settings"]["init"] == "tv3d" and rec.info["nfe"] == 0
    assert torch.equal(rec.mean, tv3d.mean) and float(rec.std.abs().max()) == 0
    moved = reconstruct(y, A, method=method, prior=prior, n_samples=2, t0=0.3, steps=20)
    assert moved.info["nfe"] > 0 and not torch.equal(moved.mean, tv3d.mean)


def test_the_3d_start_differs_from_the_slicewise_start(problem):
    """"tv3d" couples the slices (TV along z too); "tv" reconstructs each slice alone."""
    from medrecon.solvers import classical
    from medrecon.solvers.presets import initial_estimate

    _, A, _, y = problem
    x3 = initial_estimate(y, A, "tv3d")
    torch.testing.assert_close(x3, classical.tv(y, A, nonneg=True, axes=("z", "y", "x")), rtol=0, atol=0)
    x2 = initial_estimate(y, A, "tv")
    torch.testing.assert_close(x2[2:3], initial_estimate(y[2:3], A, "tv"))  # slice by slice
    assert not torch.allclose(x3, x2)


def test_inplane_tv_weight_falls_to_zero_as_t_decreases(problem):
    """The consistency step's TV weights: lam_tv along z at every t, lam_tv_xy in-plane at the
    first time of the run, falling with σ(t) to 0 at the grid's last time."""
    from medrecon.solvers.presets import _settings, _tv_weights

    prior, *_ = problem
    s = _settings("dds3d", {"lam_tv": 2e-4, "lam_tv_xy": 1e-4, "tv_axes": ("z", "y", "x")})
    t = torch.tensor([0.3, 0.2, 0.1, prior.sde.eps], dtype=torch.float64)
    lam, weights = _tv_weights(s, prior.sde, t[:1])
    w = [weights(ti.reshape(1)) for ti in t]
    assert lam == pytest.approx(2e-4)
    assert all(wi[0] == pytest.approx(1.0) for wi in w)  # z: lam_tv
    assert w[0][1] == pytest.approx(0.5) and w[0][1] == w[0][2]  # in-plane at t0: lam_tv_xy
    inplane = [wi[1] for wi in w]
    assert inplane == sorted(inplane, reverse=True) and inplane[1] < inplane[0] and inplane[-1] == 0


def test_zero_weights_remove_axes_from_the_tv():
    """ADMM with axes z, y, x and in-plane weights 0 is ADMM with TV along z alone; weights
    rescale the splitting variables, so a later change goes on from where it was."""
    from medrecon.solvers.classical import ADMMTV

    A = ParallelBeamCT(N, torch.arange(3).double().numpy() * math.pi / 3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(Z, 1, N, N, generator=g, dtype=torch.float64)
    y = A(x0)
    a = ADMMTV(A, y, 1e-2, 1e-1, axes=("z", "y", "x"), weights=(1.0, 0.0, 0.0), cg_iters=3)
    b = ADMMTV(A, y, 1e-2, 1e-1, axes=("z",), cg_iters=3)
    xa = xb = x0 + 0.1
    for _ in range(3):
        xa, xb = a.step(xa), b.step(xb)
    torch.testing.assert_close(xa, xb)
    a.set_weights((1.0, 0.5, 0.5))  # the in-plane parts restart from 0, z goes on
    assert torch.equal(a.w[..., 0], b.w[..., 0]) and float(a.w[..., 1:].abs().max()) == 0
    with pytest.raises(Exception, match="one weight"):
        a.set_weights((1.0, 0.5))


def test_joint_cg_solves_a_system_that_couples_the_batch():
    """TV along z couples the slices on the batch axis: CG over the whole batch solves it (n
    steps for n unknowns), while independent per-item step sizes need not."""
    from medrecon.linalg import conjugate_gradient
    from medrecon.operators.diff import FiniteDifference

    g = torch.Generator().manual_seed(0)
    D = FiniteDifference((3, 3), ("z", "y", "x"))  # noqa: N806
    scale = torch.linspace(0.5, 4.0, 5, dtype=torch.float64).reshape(5, 1, 1, 1)

    def normal(v):
        return scale * v + 3.0 * D.adjoint(D(v))

    x_true = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)
    rhs = normal(x_true)
    x = conjugate_gradient(normal, rhs, iters=45, tol=1e-14, joint=True)
    torch.testing.assert_close(x, x_true)


def test_chunks_follow_the_fastest_batch_within_the_budget():
    from medrecon.solvers.presets import NET_FASTEST_PIXELS

    vol = torch.zeros(64, 1, 256, 256)
    assert chunk_for_budget(64 * 2**30, vol) == NET_FASTEST_PIXELS // (256 * 256)  # plenty: the fastest
    assert chunk_for_budget(1.0, vol) == 1  # none: one slice at a time
    small = torch.zeros(64, 1, 32, 32)
    assert chunk_for_budget(64 * 2**30, small) == NET_FASTEST_PIXELS // (32 * 32)


def test_chunked_network_evaluations_equal_one_batch():
    """A volume's slices through the network in chunks give the scores of one batch (float32:
    every slice is its own item; the network mixes nothing across the batch)."""
    from medrecon.priors import ScoreNet, ScorePrior, ct_normaliser, network_spec
    from medrecon.solvers.sampler import ScoreCounter

    torch.manual_seed(0)
    prior = ScorePrior(ScoreNet(network_spec("tiny"), VESDE(0.01, 10.0)), ct_normaliser()).eval()
    prior.precision = "float32"
    x = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.full((7,), 0.3)
    whole = ScoreCounter(prior)(x, t)
    for chunk in (1, 2, 3):
        torch.testing.assert_close(ScoreCounter(prior, chunk=chunk)(x, t), whole, rtol=1e-5, atol=1e-5)


def test_reuse_starts_computes_each_start_once(problem, monkeypatch):
    """Inside ``reuse_starts`` (tuning) a start is computed once per operator and measurement and
    reused; outside it every run computes its own (so that its time includes the start)."""
    from medrecon.solvers import classical
    from medrecon.solvers.presets import initial_estimate, reuse_starts

    _, A, _, y = problem
    calls = []
    real = classical.tv

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(classical, "tv", counted)
    with reuse_starts():
        first = initial_estimate(y, A, "tv3d")
        again = initial_estimate(y.clone(), A, "tv3d")
        first.add_(1.0)  # a caller's change does not reach the kept start
        assert torch.equal(initial_estimate(y, A, "tv3d"), again)
        initial_estimate(y + 1e-3, A, "tv3d")  # another measurement: a start of its own
    assert len(calls) == 2
    initial_estimate(y, A, "tv3d")
    assert len(calls) == 3


def test_estimate_counts_no_evaluation_at_t0_zero(problem):
    from medrecon.pipeline.case import estimate_diffusion_time

    prior, A, vol, _ = problem
    y = A(vol * 4096 - 1024)
    for method in ("dds3d", "mbir3d"):
        est = estimate_diffusion_time(prior, A, y, method, n_samples=2, steps=None)
        assert est["nfe"] > 0 and est["initial_estimate"] == "tv3d" and est["solver_seconds"] > 0
        assert est["seconds"] == pytest.approx(est["network_seconds"] + est["solver_seconds"], abs=0.11)


def test_tune_and_calibrate_volumes(problem, tmp_path):
    """The tuner and the calibration take volumes (n, Z, 1, H, W): every configuration it draws
    keeps to max_nfe, the result is no worse than the defaults, and the calibration of a volume
    method records its TV settings (tv_axes a list in JSON) and is applied to runs that share them."""
    from medrecon import reconstruct
    from medrecon.solvers.cards import std_scale
    from medrecon.tuning import calibrate, store_calibration, tune

    prior, A, vol, _ = problem
    vols = torch.stack([vol, vol.flip(0)]) * 4096 - 1024
    space = {"t0": (0.1, 0.6), "steps": [10, 20, 40], "lam_tv": [1e-3, 1e-2]}
    res = tune(prior, lambda i: A, vols, space, budget=6, method="dds3d", max_nfe=8)
    assert res["best_psnr"] >= res["defaults_psnr"] and res["n_images"] == 2
    drawn = [t for t in res["trials"] if t["settings"] != res["defaults"]]
    assert drawn and all(t["nfe"] <= 8 for t in drawn)
    cal = calibrate(prior, lambda i: A, vols, method="dds3d", n_samples=3, settings={"steps": 20})
    assert cal["n_slices"] == Z and cal["settings"]["tv_axes"] == ("z", "y", "x") and "lam_tv_xy" in cal["settings"]
    path = tmp_path / "card.json"
    path.write_text('{"name": "g"}')
    store_calibration(path, cal)
    card = json.loads(path.read_text())  # as a prior loads it: tv_axes is a list now
    assert card["calibration"]["parallel-3"]["dds3d"]["settings"]["tv_axes"] == ["z", "y", "x"]
    rec = reconstruct(A(vols[0]), A, method="dds3d", prior=prior, n_samples=3, steps=20, calibrated=False)
    c, how = std_scale(card, A, "dds3d", 3, rec.info["settings"])
    assert c == pytest.approx(cal["std_scale"]) and "fitted" in how
