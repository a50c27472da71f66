"""Diffusion solvers against the closed-form posterior of a Gaussian prior (CT and MRI)."""

from __future__ import annotations

import math

import pytest
import torch

from medrecon.errors import SettingsError
from medrecon.operators import MaskedFourier, ParallelBeamCT, mri_mask
from medrecon.priors.sde import VESDE, VPSDE
from medrecon.solvers.analytic import GaussianPrior, gaussian_posterior, periodic_rbf_covariance
from medrecon.solvers.presets import run_diffusion
from medrecon.solvers.sampler import ScoreCounter

N = 8
N_SAMPLES = 64
STEPS = 150


@pytest.fixture(scope="module")
def prior():
    return GaussianPrior(0.5 * torch.ones(N, N, dtype=torch.float64), periodic_rbf_covariance(N), VESDE(0.01, 5.0))


def _problem(prior, kind):
    x = prior.sample(1, torch.Generator().manual_seed(1))
    if kind == "mri":
        A = MaskedFourier(mri_mask("random", (N, N), 2, 0.25, seed=0))
        x = x.to(torch.complex128)
    else:
        A = ParallelBeamCT(N, torch.arange(4).double().numpy() * math.pi / 4)
    y = A(x)
    return A, y, *gaussian_posterior(prior, A, y[0])


# DDS from noise: DDIM (η 0.85) with the measured coefficients put back into x̂₀ by CG
METHODS = [("song", {}), ("ccdf", {"t0": 0.5}), ("dps", {"zeta": 0.5}), ("dds", {"start": "noise"})]


@pytest.mark.parametrize("method,kw", METHODS, ids=[m for m, _ in METHODS])
def test_mri_matches_closed_form_posterior(prior, method, kw):
    """Single-coil MRI with a circulant prior: the Fourier coefficients are independent a
    priori, so hard replacement of the measured ones is the exact posterior; the sampler must
    reproduce it up to Monte-Carlo error.  With 64 samples the sample mean has a standard error
    of σ_post/8 per pixel (mean absolute ≈ 0.1 σ_post) and the sample std a relative error of
    ≈ 9 %; the discretisation with 150 steps adds a few per cent.  Tolerances: mean within
    0.25 σ_post (pixel average), std within a factor 1.25."""
    A, y, pm, ps = _problem(prior, "mri")
    smp, info = run_diffusion(y, A, prior, method, n_samples=N_SAMPLES, seed=0, steps=STEPS, **kw)
    mean, std = smp.mean(0)[0], smp.std(0)[0]
    assert float((mean - pm).abs().mean() / ps.mean()) < 0.25
    ratio = float(std.mean() / ps.mean())
    assert 1 / 1.25 < ratio < 1.25, ratio
    assert info["nfe"] > 0 and info["steps_run"] == (STEPS if method != "ccdf" else int(info["steps_run"]))
    # every DDS sample fits the data exactly (one CG step is the projection for one coil)
    if method == "dds":
        assert float((A(smp[:, 0]) - y).abs().max()) < 1e-10


@pytest.mark.parametrize("method,kw", METHODS, ids=[m for m, _ in METHODS])
def test_ct_approaches_closed_form_posterior(prior, method, kw):
    """Sparse-view CT (4 views of an 8×8 image): the projection of Song et al. is Euclidean
    (Aᵀ(AAᵀ)⁻¹), while the exact posterior conditions in the prior's metric (ΣAᵀ(AΣAᵀ)⁻¹), so
    the sampler is not exact here.  Measured with 128 samples and 300 steps: mean error
    0.45–0.48 σ_post, std ratio 1.03–1.08 for song, ccdf and dps (64 samples, 150 steps: dds
    0.35, std ratio 1.02).  Tolerances: mean within
    0.65 σ_post and at least 3× closer to the posterior mean than the prior mean is; average
    std within a factor 1.5 where the data leave uncertainty (σ_post > 0.1 σ_prior)."""
    A, y, pm, ps = _problem(prior, "ct")
    smp, _ = run_diffusion(y, A, prior, method, n_samples=N_SAMPLES, seed=0, steps=STEPS, **kw)
    mean, std = smp.mean(0)[0], smp.std(0)[0]
    err = (mean - pm).abs().mean()
    assert float(err / ps.mean()) < 0.65
    prior_err = (prior.mean.reshape(1, N, N) - pm).abs().mean()
    assert err < prior_err / 3
    free = ps > 0.1 * prior.cov.diagonal().sqrt().mean()
    ratio = float(std[free].mean() / ps[free].mean())
    assert 1 / 1.5 < ratio < 1.5, ratio


def test_samples_are_reproducible_and_batched(prior):
    A, y, _, _ = _problem(prior, "mri")
    a, _ = run_diffusion(y, A, prior, "ccdf", n_samples=3, seed=5, steps=40, t0=0.3)
    b, _ = run_diffusion(y, A, prior, "ccdf", n_samples=3, seed=5, steps=40, t0=0.3)
    c, _ = run_diffusion(y, A, prior, "ccdf", n_samples=3, seed=6, steps=40, t0=0.3)
    assert a.shape == (3, 1, 1, N, N)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    # CCDF runs only the last t0·N steps
    _, info = run_diffusion(y, A, prior, "ccdf", n_samples=1, seed=5, steps=40, t0=0.3)
    assert info["steps_run"] == 12


@pytest.mark.parametrize("predictor", ["reverse-diffusion", "euler-maruyama", "ddim"])
def test_predictors_sample_the_prior(prior, predictor):
    """Unconditional sampling (an operator that measures nothing) reproduces the prior's
    mean and std (within Monte-Carlo error of 64 samples, factor 1.25 on the std)."""
    A = MaskedFourier(torch.zeros(N, N))
    y = A(torch.zeros(1, 1, N, N, dtype=torch.complex128))
    smp, _ = run_diffusion(y, A, prior, "song", n_samples=N_SAMPLES, seed=1, steps=STEPS, predictor=predictor,
                           snr=0.0 if predictor == "ddim" else 0.16, eta=1.0)
    x = smp[:, 0].real
    prior_std = prior.cov.diagonal().sqrt().mean()
    assert float((x.mean(0) - 0.5).abs().mean()) < 0.3 * prior_std
    ratio = float(x.std(0).mean() / prior_std)
    assert 1 / 1.25 < ratio < 1.25, (predictor, ratio)


def test_vp_sde_works_too():
    p = GaussianPrior(0.5 * torch.ones(N, N, dtype=torch.float64), periodic_rbf_covariance(N), VPSDE())
    A, y, pm, ps = _problem(p, "mri")
    smp, _ = run_diffusion(y, A, p, "song", n_samples=N_SAMPLES, seed=0, steps=STEPS)
    assert float((smp.mean(0)[0] - pm).abs().mean() / ps.mean()) < 0.3


def test_score_counter_counts_and_caches():
    p = GaussianPrior(torch.zeros(4, 4, dtype=torch.float64), periodic_rbf_covariance(4), VESDE())
    c = ScoreCounter(p, track_grad=True)
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    c(x, torch.full((2,), 0.5))
    c(x.to(torch.complex128), torch.full((2,), 0.5))
    assert c.nfe == 3 and c.last is not None and c.last[2].requires_grad


def test_bad_settings(prior):
    A, y, _, _ = _problem(prior, "mri")
    with pytest.raises(SettingsError, match="does not take"):
        run_diffusion(y, A, prior, "song", steps=10, lamda=0.5)
    with pytest.raises(SettingsError, match="unknown diffusion method"):
        run_diffusion(y, A, prior, "sonng")
    with pytest.raises(SettingsError, match="lam must be in"):
        run_diffusion(y, A, prior, "song", lam=2.0)
    with pytest.raises(SettingsError, match="unknown predictor"):
        run_diffusion(y, A, prior, "song", steps=4, predictor="heun")


def test_reconstruct_api_with_a_prior_object(prior):
    """medrecon.reconstruct runs a diffusion method in the caller's units (HU for CT)."""
    from medrecon import reconstruct

    A = ParallelBeamCT(N, torch.arange(4).double().numpy() * math.pi / 4)
    x_n = prior.sample(1, torch.Generator().manual_seed(3))
    hu = x_n * 4096 - 1024
    rec = reconstruct(A(hu), A, method="ccdf", prior=prior, n_samples=8, steps=60, seed=1)
    assert rec.mean.shape == hu.shape and rec.std.shape == hu.shape and rec.samples.shape == (8, *hu.shape)
    assert float(rec.std.min()) >= 0
    for key in ("method", "settings", "seed", "nfe", "wall_time_s", "data_residual", "prior"):
        assert key in rec.info
    assert rec.info["data_residual"] < 0.05
    assert float((rec.mean - hu).abs().mean()) < float((prior.mean.reshape(1, 1, N, N) * 4096 - 1024 - hu).abs().mean())
    with pytest.raises(SettingsError, match="did you mean 'dps'"):
        reconstruct(A(hu), A, method="dsp", prior=prior)


@pytest.mark.parametrize("method", ["song", "ccdf", "dps", "score-mri"])
def test_single_precision_mri_reaches_the_posterior(prior, method):
    """complex64 k-space (what scanners and the CLI give) must sample the posterior as well as
    complex128 does.  Regression: the final exact data-consistency step ran CG past convergence
    on the singular masked-Fourier normal operator and divided by a zero curvature, returning
    pixels of 1e6.  Float32 and float64 noise draws differ, so both are compared with the
    closed-form posterior: with 16 samples the mean's standard error is σ_post/4 (mean absolute
    ≈ 0.2 σ_post); tolerance 0.4 σ_post."""
    from medrecon import reconstruct

    A, y, pm, ps = _problem(prior, "mri")
    # CCDF samples the posterior only when t0 leaves room to mix (as in the tests above); its
    # default start (TV at t0 = 0.2) is a short refinement, not a posterior sampler
    kw = {"t0": 0.5} if method == "ccdf" else {}
    for dt in (torch.complex64, torch.complex128):
        smp, _ = run_diffusion(y.to(dt), A, prior, method, n_samples=16, seed=2, steps=60, **kw)
        assert smp.dtype == dt and torch.isfinite(smp).all()
        err = float((smp.mean(0)[0].to(torch.complex128) - pm).abs().mean() / ps.mean())
        assert err < 0.4, (dt, err)
    # the public call in single precision: finite, in the data's units, consistent with the data
    rec = reconstruct(y.to(torch.complex64), A, method=method, prior=prior, n_samples=4, steps=30, seed=2)
    assert torch.isfinite(rec.mean).all() and torch.isfinite(rec.std).all()
    assert float(rec.mean.abs().max()) < 3 * float(A.adjoint(y).abs().max() + pm.abs().max())
    assert rec.info["data_residual"] < 1e-4


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_dds_cg_step_reduces_the_data_residual(prior, gamma):
    """The DDS data consistency on x̂₀: more CG steps leave a smaller residual ‖Ax − y‖ (CG on
    the normal equations minimises it over growing Krylov spaces around x̂₀), the proximal
    weight γ keeps the result nearer x̂₀, and 0 steps change nothing."""
    from medrecon.solvers import classical, pieces

    A, y, _, _ = _problem(prior, "ct")
    x0 = prior.sample(1, torch.Generator().manual_seed(7))  # a wrong image: large residual
    scale2 = classical.operator_norm(A, x0) ** 2
    t = torch.ones(1)
    res = []
    for m in (0, 1, 2, 5):
        x = pieces.cg_consistency(A, y, m, gamma, scale2)(x0, t, torch.Generator())
        res.append(float(torch.linalg.norm(A(x) - y)))
        if m == 0:
            torch.testing.assert_close(x, x0)
    assert all(b < a for a, b in zip(res, res[1:], strict=False)), res
    assert res[-1] < 0.2 * res[0]
    if gamma:
        free = pieces.cg_consistency(A, y, 5, 0.0, scale2)(x0, t, torch.Generator())
        prox = pieces.cg_consistency(A, y, 5, gamma, scale2)(x0, t, torch.Generator())
        assert torch.linalg.norm(prox - x0) < torch.linalg.norm(free - x0)


def test_dds_needs_the_ddim_predictor(prior):
    A, y, _, _ = _problem(prior, "mri")
    with pytest.raises(SettingsError, match="ddim"):
        run_diffusion(y, A, prior, "dds", n_samples=1, steps=10, predictor="reverse-diffusion")


def test_a_failing_diffusion_run_says_so(prior):
    """A run that returns noise which still fits the data (a broken score: no denoising at all,
    so DDS keeps the start's noise and only fits the measured directions) is reported in
    info["warnings"]; a good run with the right score is not."""
    from medrecon import reconstruct

    class NoDenoising:  # a score model that has learned nothing
        sde = prior.sde

        def score(self, x, t):
            return torch.zeros_like(x)

    A, y, _, _ = _problem(prior, "ct")
    hu_y = y * 4096 + A(torch.full((1, 1, N, N), -1024.0, dtype=torch.float64))  # the same image in HU
    good = reconstruct(hu_y, A, method="dds", prior=prior, n_samples=4, steps=60, t0=0.5)
    assert not good.info["warnings"], good.info["warnings"]
    bad = reconstruct(hu_y, A, method="dds", prior=NoDenoising(), n_samples=4, steps=60, start="noise")
    assert any("is failing" in w for w in bad.info["warnings"]), bad.info
