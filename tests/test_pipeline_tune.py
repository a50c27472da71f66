"""`medrecon tune` as a library call: an analytic Gaussian prior on 8×8 images, 4-view CT."""

from __future__ import annotations

import json

import numpy as np
import torch

from medrecon.cli.main import main
from medrecon.datasets import Volume, save_nifti
from medrecon.pipeline.tune import TuneConfig, run_tune


def test_tune_with_analytic_prior_stores_on_card(tmp_path):
    from medrecon.priors.sde import VESDE
    from medrecon.solvers.analytic import GaussianPrior, periodic_rbf_covariance

    prior = GaussianPrior(0.3 * torch.ones(8, 8, dtype=torch.float64), periodic_rbf_covariance(8), VESDE(0.01, 5.0))
    hu = prior.sample(2, torch.Generator().manual_seed(0)).float() * 4096 - 1024
    save_nifti(Volume(hu[:, 0].numpy(), np.eye(4), "CT"), tmp_path / "val.nii.gz")
    card = tmp_path / "toy.json"
    card.write_text(json.dumps({"name": "toy"}))
    cfg = TuneConfig(prior=str(card), input=str(tmp_path / "val.nii.gz"), views=4, method="song", budget=3,
                     steps=10, store=True, out=str(tmp_path / "tune.json"))
    res = run_tune(cfg, prior=prior)
    assert res["operator_key"] == "parallel-4" and res["best_psnr"] >= res["defaults_psnr"]
    stored = json.loads(card.read_text())["tuned"]["parallel-4"]["song"]
    assert {k: v for k, v in stored.items() if k != "weights_sha256"} == res["best"]
    assert json.loads((tmp_path / "tune.json").read_text())["n_images"] == 2


def test_tune_cli_unknown_prior_exit_2(tmp_path, capsys):
    save_nifti(Volume(np.zeros((1, 8, 8), np.float32), np.eye(4), "CT"), tmp_path / "v.nii.gz")
    assert main(["tune", "--prior", "no-such-prior", "--input", str(tmp_path / "v.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-prior" in err
