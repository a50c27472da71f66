"""Tuning of diffusion settings and tuned defaults on the model card (small and fast)."""

from __future__ import annotations

import json

import pytest
import torch

from medrecon import reconstruct
from medrecon.errors import SettingsError
from medrecon.operators import MaskedFourier, MultiCoilMRI, ParallelBeamCT, mri_mask
from medrecon.priors import ScorePrior, ScoreNet, ct_normaliser, network_spec
from medrecon.priors.sde import VESDE
from medrecon.solvers.analytic import GaussianPrior, periodic_rbf_covariance
from medrecon.solvers.presets import run_diffusion
from medrecon.solvers.tuning import operator_key, store_tuned_defaults, tune, tuned_defaults

N = 8


@pytest.fixture(scope="module")
def prior():
    return GaussianPrior(0.3 * torch.ones(N, N, dtype=torch.float64), periodic_rbf_covariance(N), VESDE(0.01, 5.0))


def _hu(prior, n, seed):
    return (prior.sample(n, torch.Generator().manual_seed(seed)) * 4096 - 1024).float()


def test_tune_is_at_least_as_good_as_the_preset(prior):
    """Successive halving on 3 images, the preset is always a candidate: the chosen settings score at
    least the preset's PSNR, checked independently with reconstruct() on the same images and seed.
    (Single-coil MRI keeps it fast: no CG projection.)"""
    A = MaskedFourier(mri_mask("random", (N, N), 2, 0.25, seed=0))
    x = prior.sample(3, torch.Generator().manual_seed(0)).float()
    prior.card = {}
    space = {"lam": (0.2, 1.0), "snr": (0.02, 0.4, "log")}
    res = tune(prior, lambda i: A, x, space, budget=10, seed=0, method="song", data_range=1.0, n_samples=2,
               fixed={"steps": 20})
    assert res["operator_key"] == "mri-2d-2" and res["method"] == "song"
    assert res["defaults"] == {"lam": 1.0, "snr": 0.16} and res["fixed"] == {"steps": 20}
    assert res["best_psnr"] >= res["defaults_psnr"]
    assert res["runs"] <= 10 + 3 and len(res["trials"]) > 2  # the budget buys several configurations

    def score(settings):
        recs = [reconstruct(A(x[i:i + 1].to(torch.complex64)), A, "song", prior=prior, n_samples=2, seed=0,
                            steps=20, **settings).mean for i in range(3)]
        return sum(float(10 * torch.log10(1 / ((r.abs() - x[i:i + 1]) ** 2).mean())) for i, r in enumerate(recs)) / 3

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
    assert operator_key(MaskedFourier(mri_mask("equispaced", (32, 32), 8, 0.08))) == "mri-1d-8"
    m2d = torch.zeros(32, 32)
    m2d[::2, ::4] = 1
    assert operator_key(MaskedFourier(m2d)) == "mri-2d-8"
    maps = torch.ones(8, 32, 32, dtype=torch.complex64) / 8**0.5
    assert operator_key(MultiCoilMRI(maps, mri_mask("equispaced", (32, 32), 8, 0.08))) == "sense-8"


def test_stored_defaults_are_picked_up(tmp_path):
    """store_tuned_defaults edits only the card: the prior still loads (sha256 covers the weights),
    run_diffusion applies the stored settings between the preset and the caller's overrides, and
    entries of other operators and methods are kept."""
    torch.manual_seed(0)
    net = ScoreNet(network_spec("tiny"), VESDE(0.01, 10.0))
    card = ScorePrior(net, ct_normaliser(), {"modality": "ct"}).save(tmp_path, "tiny-ct", dtype=torch.float32)
    store_tuned_defaults(card, "mri-1d-4", {"song": {"steps": 7, "snr": 0.05}})
    store_tuned_defaults(card, "mri-1d-4", {"ccdf": {"steps": 9, "t0": 0.5}})
    store_tuned_defaults(card, "parallel-23", {"ccdf": {"lam": 0.8}})
    saved = json.loads(card.read_text())
    assert saved["tuned"]["mri-1d-4"] == {"song": {"steps": 7, "snr": 0.05}, "ccdf": {"steps": 9, "t0": 0.5}}
    assert saved["tuned"]["parallel-23"] == {"ccdf": {"lam": 0.8}}
    loaded = ScorePrior.load(card)
    A = MaskedFourier(mri_mask("equispaced", (16, 16), 4, 0.125))
    y = A(torch.full((1, 1, 16, 16), 0.2, dtype=torch.complex64))
    assert tuned_defaults(loaded.card, A, "song") == {"steps": 7, "snr": 0.05}
    _, info = run_diffusion(y, A, loaded, "song", n_samples=1, seed=0)
    assert info["settings"]["steps"] == 7 and info["settings"]["snr"] == 0.05 and info["tuned"] == "mri-1d-4"
    _, info = run_diffusion(y, A, loaded, "song", n_samples=1, seed=0, steps=5)  # the caller wins
    assert info["settings"]["steps"] == 5 and info["settings"]["snr"] == 0.05
    B = MaskedFourier(mri_mask("equispaced", (16, 16), 2, 0.125))  # noqa: N806
    _, info = run_diffusion(B(y.new_ones(1, 1, 16, 16)), B, loaded, "song", n_samples=1, seed=0, steps=3)
    assert info["tuned"] is None and info["settings"]["snr"] == 0.16  # another operator: the preset
    with pytest.raises(SettingsError, match="not diffusion settings"):
        store_tuned_defaults(card, "mri-1d-4", {"song": {"bogus": 1}})
    with pytest.raises(SettingsError, match="method"):
        store_tuned_defaults(card, "mri-1d-4", {"nope": {"steps": 3}})
    assert json.loads(card.read_text()) == saved  # a rejected update leaves the card as it was
