"""Tuning of diffusion settings and tuned defaults on the model card (small and fast)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medrecon import reconstruct
from medrecon.errors import SettingsError
from medrecon.operators import MaskedFourier, MultiCoilMRI, ParallelBeamCT, mri_mask
from medrecon.priors import ScorePrior, ScoreNet, ct_normaliser, network_spec
from medrecon.priors.sde import VESDE
from medrecon.solvers.analytic import GaussianPrior, periodic_rbf_covariance
from medrecon.solvers.presets import run_diffusion
from medrecon.solvers.cards import operator_key
from medrecon.solvers.presets import tuned_defaults
from medrecon.tuning import store_tuned_defaults, tune

N = 8


@pytest.fixture(scope="module")
def prior():
    return GaussianPrior(
        0.3 * torch.ones(N, N, dtype=torch.float64), periodic_rbf_covariance(N), VESDE(0.01, 5.0)
    )


def _hu(prior, n, seed):
    return (prior.sample(n, torch.Generator().manual_seed(seed)) * 4096 - 1024).float()


def test_tune_is_at_least_as_good_as_the_preset(prior):
    """Successive halving on 2 images, the preset is always a candidate: the chosen settings score at
    least the preset's PSNR, checked independently with reconstruct() on the same images and seed."""
    A = ParallelBeamCT.sparse_view(N, 4)
    hu = _hu(prior, 2, 0)
    prior.card = {}
    space = {"lam": (0.2, 1.0), "snr": (0.02, 0.4, "log")}
    res = tune(
        prior,
        lambda i: A,
        hu,
        space,
        budget=6,
        seed=0,
        method="song",
        data_range=4096.0,
        fixed={"steps": 15},
    )
    assert res["operator_key"] == operator_key(A) == "parallel-4" and res["method"] == "song"
    assert res["defaults"] == {"lam": 1.0, "snr": 0.16, "steps": 15} and res["fixed"] == {
        "steps": 15
    }
    assert res["best_psnr"] >= res["defaults_psnr"]
    assert res["runs"] <= 6 + 2 and len(res["trials"]) > 2  # the budget buys several configurations

    def score(settings):
        recs = [
            reconstruct(
                A(hu[i : i + 1]), A, "song", prior=prior, n_samples=1, seed=0, **settings
            ).mean
            for i in range(2)
        ]
        return (
            sum(
                float(10 * torch.log10(4096.0**2 / ((r - hu[i : i + 1]) ** 2).mean()))
                for i, r in enumerate(recs)
            )
            / 2
        )

    assert score(res["best"]) >= score(res["defaults"]) - 1e-9
    assert abs(score(res["best"]) - res["best_psnr"]) < 1e-2  # tune's own numbers are reproducible


def test_tune_validates_its_space(prior):
    A = ParallelBeamCT.sparse_view(N, 4)
    with pytest.raises(SettingsError, match="not a diffusion setting"):
        tune(prior, lambda i: A, _hu(prior, 1, 0), {"bogus": [1, 2]}, budget=2, method="song")
    with pytest.raises(SettingsError, match="list of choices"):
        tune(prior, lambda i: A, _hu(prior, 1, 0), {"lam": 0.5}, budget=2, method="song")


def test_operator_keys():
    assert operator_key(ParallelBeamCT.sparse_view(16, 23)) == "parallel-23"
    # a limited-angle scan is not a full scan with as many views (60 views over 90° and 120°)
    assert operator_key(ParallelBeamCT.limited_angle(16, math.radians(90), n_full=120)) == "parallel-60-la90"
    assert operator_key(ParallelBeamCT.limited_angle(16, math.radians(120), n_full=90)) == "parallel-60-la120"
    assert operator_key(ParallelBeamCT.limited_angle(16, math.pi, n_full=60)) == "parallel-60"
    assert operator_key(MaskedFourier(mri_mask("equispaced", (32, 32), 8, 0.08))) == "mri-1d-8"
    m2d = torch.zeros(32, 32)
    m2d[::2, ::4] = 1
    assert operator_key(MaskedFourier(m2d)) == "mri-2d-8"
    maps = torch.ones(8, 32, 32, dtype=torch.complex64) / 8**0.5
    assert operator_key(MultiCoilMRI(maps, mri_mask("equispaced", (32, 32), 8, 0.08))) == "sense-8"


def test_stored_defaults_are_picked_up(tmp_path, prior):
    """store_tuned_defaults edits only the card: a ScorePrior still loads (sha256 covers the weights);
    run_diffusion applies the stored settings between the preset and the caller's overrides (shown
    with the analytic prior carrying the loaded card, to stay fast); other entries are kept."""
    torch.manual_seed(0)
    net = ScoreNet(network_spec("tiny"), VESDE(0.01, 10.0))
    card = ScorePrior(net, ct_normaliser(), {"modality": "ct"}).save(
        tmp_path, "tiny-ct", dtype=torch.float32
    )
    A = MaskedFourier(mri_mask("equispaced", (N, N), 4, 0.125))
    key = operator_key(A)
    assert key.startswith("mri-1d-")
    store_tuned_defaults(card, key, {"song": {"steps": 7, "snr": 0.05}})
    store_tuned_defaults(card, key, {"ccdf": {"steps": 9, "t0": 0.5}})
    store_tuned_defaults(card, "parallel-23", {"ccdf": {"lam": 0.8}})
    saved = json.loads(card.read_text())
    sha = {"weights_sha256": saved["sha256"]}  # each entry names the weights it was tuned on
    assert saved["tuned"][key] == {
        "song": {"steps": 7, "snr": 0.05, **sha},
        "ccdf": {"steps": 9, "t0": 0.5, **sha},
    }
    assert saved["tuned"]["parallel-23"] == {"ccdf": {"lam": 0.8, **sha}}
    loaded = ScorePrior.load(card)
    assert loaded.card["tuned"] == saved["tuned"] and tuned_defaults(loaded.card, A, "song") == {
        "steps": 7,
        "snr": 0.05,
    }
    prior.card = loaded.card
    y = A(prior.sample(1, torch.Generator().manual_seed(2)).to(torch.complex128))
    _, info = run_diffusion(y, A, prior, "song", n_samples=1, seed=0)
    assert (
        info["settings"]["steps"] == 7 and info["settings"]["snr"] == 0.05 and info["tuned"] == key
    )
    _, info = run_diffusion(y, A, prior, "song", n_samples=1, seed=0, steps=5)  # the caller wins
    assert info["settings"]["steps"] == 5 and info["settings"]["snr"] == 0.05
    _, info = run_diffusion(y, A, prior, "ccdf", n_samples=1, seed=0)
    assert info["settings"]["t0"] == 0.5 and info["settings"]["snr"] == 0.16  # per method
    B = MaskedFourier(mri_mask("equispaced", (N, N), 2, 0.125))  # noqa: N806
    _, info = run_diffusion(
        B(y.new_ones(1, 1, N, N)), B, prior, "song", n_samples=1, seed=0, steps=3
    )
    assert info["tuned"] is None and info["settings"]["snr"] == 0.16  # another operator: the preset
    prior.card = {**loaded.card, "sha256": "f" * 64}  # the same card on other weights
    _, info = run_diffusion(y, A, prior, "song", n_samples=1, seed=0, steps=3)
    assert info["settings"]["snr"] == 0.16  # the tuned snr is not applied to weights it was not tuned on
    assert any("tuned on other weights" in w and f"{key}/song" in w for w in info["warnings"])
    prior.card = {}
    with pytest.raises(SettingsError, match="not diffusion settings"):
        store_tuned_defaults(card, key, {"song": {"bogus": 1}})
    with pytest.raises(SettingsError, match="method"):
        store_tuned_defaults(card, key, {"nope": {"steps": 3}})
    assert json.loads(card.read_text()) == saved  # a rejected update leaves the card as it was


# ----------------------------------------------------------------------------- calibration
def test_calibration_of_an_exact_posterior_sampler(prior):
    """Song with λ = 1 samples the analytic posterior; with n samples, |x̄ − x| / std is then
    sqrt(1 + 1/n) times a Student-t variable with n − 1 degrees of freedom (x̄ − x has variance
    σ²(1 + 1/n); the sample std is σ·sqrt(χ²/(n − 1))), so the fitted factor must come out near
    c* = sqrt(1 + 1/n)·t_{n−1}(0.975)/2 = 1.25 for n = 8.  Tolerance ±25 %: 24 images × 64
    correlated pixels make the 95 % quantile uncertain by about ±10 % (spread of the quantile of
    ~24 independent images), and 40 sampler steps add a few per cent of bias."""
    from scipy.stats import t as student_t

    from medrecon.tuning import calibrate

    A = ParallelBeamCT.sparse_view(N, 4)
    hu = _hu(prior, 24, 3)
    prior.card = {}
    res = calibrate(prior, lambda i: A, hu, method="song", n_samples=8, settings={"steps": 40, "lam": 1.0})
    want = (1 + 1 / 8) ** 0.5 * float(student_t.ppf(0.975, 7)) / 2
    assert res["operator_key"] == "parallel-4" and res["n_samples"] == 8 and res["n_images"] == 24
    assert abs(res["std_scale"] / want - 1) < 0.25, (res["std_scale"], want)
    assert res["coverage_calibrated"] >= 0.95 - 1e-9 and res["coverage_raw"] < res["coverage_calibrated"]
    assert res["settings"]["steps"] == 40 and res["settings"]["lam"] == 1.0


def test_calibration_is_stored_and_applied(tmp_path, prior):
    """store_calibration writes card["calibration"][key][method]; reconstruct multiplies std by the
    factor only for runs with the calibrated settings, converts it to other sample counts by the
    t-quantile ratio, and says what it did in info; calibrated=False gives the raw spread."""
    from scipy.stats import t as student_t

    from medrecon.solvers.cards import std_scale
    from medrecon.tuning import calibrate, store_calibration

    torch.manual_seed(0)
    net = ScoreNet(network_spec("tiny"), VESDE(0.01, 10.0))
    card = ScorePrior(net, ct_normaliser(), {"modality": "ct"}).save(tmp_path, "tiny-ct", dtype=torch.float32)
    A = ParallelBeamCT.sparse_view(N, 4)
    prior.card = {}
    hu = _hu(prior, 3, 5)
    res = calibrate(prior, lambda i: A, hu, method="song", n_samples=4, settings={"steps": 12})
    store_calibration(card, res)
    store_tuned_defaults(card, "parallel-4", {"song": {"snr": 0.1}})  # the other writer keeps it
    saved = json.loads(card.read_text())
    entry = saved["calibration"]["parallel-4"]["song"]
    assert entry["std_scale"] == res["std_scale"] and entry["n_samples"] == 4 and saved["tuned"]
    prior.card = ScorePrior.load(card).card
    y = A(hu[:1])
    # the tuned snr changed the spread-relevant settings since the fit: not applied
    rec = reconstruct(y, A, "song", prior=prior, n_samples=4, seed=1, steps=12)
    assert rec.info["std_scale"] == 1.0 and "snr differ" in rec.info["std_calibration"]
    same = {"steps": 12, "snr": 0.16}
    raw = reconstruct(y, A, "song", prior=prior, n_samples=4, seed=1, calibrated=False, **same)
    cal = reconstruct(y, A, "song", prior=prior, n_samples=4, seed=1, **same)
    assert raw.info["std_scale"] == 1.0 and cal.info["std_scale"] == pytest.approx(res["std_scale"], abs=1e-4)
    torch.testing.assert_close(cal.std, raw.std * res["std_scale"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cal.mean, raw.mean)  # only the uncertainty map changes
    c8, how = std_scale(prior.card, A, "song", 8, {**raw.info["settings"]})
    ratio = float(student_t.ppf(0.975, 7) / student_t.ppf(0.975, 3))
    assert c8 == pytest.approx(res["std_scale"] * ratio) and "4 samples" in how
    assert std_scale(prior.card, A, "song", 1, raw.info["settings"])[0] == 1.0
    assert std_scale(prior.card, A, "ccdf", 4, raw.info["settings"]) == (1.0, "none stored for parallel-4/ccdf")
    assert entry["weights_sha256"] == saved["sha256"]
    # a factor measured on other weights (a re-exported prior) is not applied
    other = {**prior.card, "sha256": "f" * 64}
    c_other, how_other = std_scale(other, A, "song", 4, {**raw.info["settings"]})
    assert c_other == 1.0 and "other weights" in how_other
    prior.card = {}
    with pytest.raises(SettingsError, match="n_samples"):
        calibrate(prior, lambda i: A, hu, method="song", n_samples=1)
    with pytest.raises(SettingsError, match="lacks"):
        store_calibration(card, {"std_scale": 2.0})


def test_tune_re_measures_values_tuned_on_earlier_weights(tmp_path):
    """A card whose tuned entry names other weights: tune() does not start from it (the preset
    does) but re-measures it as a candidate that reaches the last rung."""
    from medrecon.operators import ParallelBeamCT
    from medrecon.priors.sde import VESDE
    from medrecon.solvers.analytic import GaussianPrior, periodic_rbf_covariance

    prior = GaussianPrior(0.3 * torch.ones(8, 8, dtype=torch.float64), periodic_rbf_covariance(8), VESDE(0.01, 5.0))
    A = ParallelBeamCT.sparse_view(8, 4)  # noqa: N806
    prior.card = {"sha256": "a" * 64,
                  "tuned": {operator_key(A): {"song": {"snr": 0.3, "steps": 6, "weights_sha256": "b" * 64}}}}
    hu = prior.sample(2, torch.Generator().manual_seed(0)).float() * 4096 - 1024
    res = tune(prior, lambda i: A, hu, {"snr": (0.05, 0.2), "steps": [5, 6]}, budget=4, method="song")
    assert res["defaults"]["snr"] != 0.3  # the stale value is not the starting point
    earlier = [t for t in res["trials"] if t["settings"]["snr"] == 0.3 and t["settings"]["steps"] == 6]
    assert earlier and earlier[0]["n_images"] == 2  # re-measured on every image


def test_z_error_cap_makes_z_incoherent_settings_lose():
    """Volumes under a z-error cap (issue 34): every trial records its inter-slice error, those
    above the cap are infeasible, and the winner is the best PSNR among the feasible ones; with
    an unreachable cap nothing is feasible and the ranking is PSNR's."""
    from medrecon.tuning import z_error

    n, z = 8, 5
    g = GaussianPrior(0.5 * torch.ones(n, n, dtype=torch.float64), periodic_rbf_covariance(n), VESDE(0.01, 5.0))
    g.card = {}
    base = g.sample(1, torch.Generator().manual_seed(0))
    vol = (base + 0.2 * torch.linspace(0, 1, z, dtype=torch.float64).reshape(z, 1, 1, 1)).float()
    hu = (vol * 4096 - 1024)[None]  # one volume (1, Z, 1, H, W)
    A = ParallelBeamCT(n, torch.arange(3).double().numpy() * math.pi / 3)
    space = {"lam_tv": [1e-7, 3e-5, 1e-3], "t0": [0.2, 0.5]}
    kw = dict(budget=6, seed=0, method="dds3d", data_range=4096.0, fixed={"steps": 10})
    free = tune(g, lambda i: A, hu, space, z_error_cap=[float("inf")], **kw)
    zs = sorted({t["z_error"] for t in free["trials"]})
    assert len(zs) > 1 and all(t["feasible"] for t in free["trials"])
    k = len(zs) // 2 - 1 if len(zs) > 2 else 0
    cap = (zs[k] + zs[k + 1]) / 2  # between two measured values: no trial sits on the cap
    capped = tune(g, lambda i: A, hu, space, z_error_cap=[cap], **kw)
    feasible = [t for t in capped["trials"] if t["feasible"] and t["n_images"] == 1]
    assert feasible and capped["best_feasible"] is True
    assert capped["trials"][0]["settings"] == capped["best"] and capped["trials"][0]["feasible"]
    assert all(t["z_error"] <= cap for t in feasible) and all(
        t["z_error"] > cap for t in capped["trials"] if not t["feasible"]
    )
    # the recorded z-error is the one of the returned settings, measured again independently
    rec = reconstruct(A(hu[0]), A, "dds3d", prior=g, n_samples=1, seed=0, **capped["best"])
    assert abs(z_error(rec.mean, hu[0]) - capped["trials"][0]["z_error"]) < 1e-3
    none = tune(g, lambda i: A, hu, space, z_error_cap=[-1.0], **kw)
    assert none["best_feasible"] is False and none["best_psnr"] == max(t["psnr"] for t in none["trials"])
    with pytest.raises(SettingsError, match="z_error_cap"):
        tune(g, lambda i: A, hu[:, 0], space, z_error_cap=[1.0], **kw)
