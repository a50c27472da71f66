"""Smoke tests of the benchmark scripts (they are scripts, not a package: load them by path)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_operators_benchmark_quick_smoke(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDRECON_CACHE", str(tmp_path))  # do not touch the user's cache
    threads = torch.get_num_threads()
    out = _load("operators").main(["--smoke"])
    lines = capsys.readouterr().out.strip().splitlines()
    data = json.loads(lines[-1])  # the JSON line comes last
    assert data == json.loads(json.dumps(out))
    assert data["bench"] == "operators" and data["smoke"] and data["threads"] == 2
    for key in ("radon23_vs_skimage", "radon180_vs_skimage", "sense_vs_sigpy"):
        assert data[key] > 0, key
    assert data["radon_adjoint_relerr"] < 1e-12
    assert data["radon_vs_skimage_relerr"] < 1e-4
    assert "radon23_vs_astra" not in data and "radon23_vs_deepinv" not in data  # no peers
    assert {"op", "case"} <= set(data["results"][0])
    assert any(line.startswith("operation") and "speed-up" in line for line in lines)  # table
    assert torch.get_num_threads() == threads  # the thread count is restored


def test_operators_benchmark_clinical_mode_smoke(capsys, tmp_path, monkeypatch):
    """--clinical at a tiny size, ours only: one fresh process per measurement, each with its
    time and peak memory; the CPU is named and the targets are judged."""
    monkeypatch.setenv("MEDRECON_CACHE", str(tmp_path))
    monkeypatch.setenv("MEDRECON_MATRIX_BUDGET_GB", "0")  # matrix-free, as at clinical size
    out = _load("operators").main(["--clinical", "--clinical-size", "32", "--reps", "1", "--no-peers"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(out))
    assert out["bench"] == "operators-clinical" and out["cpu"] and out["size"] == 32
    assert {(r["geometry"], r["op"]) for r in out["results"]} == {
        (g, op) for g in ("fan", "parallel") for op in ("A", "AT", "fbp")}
    assert all(r["who"] == "medrecon" and r["note"] == "matrix-free" and r["peak_mib"] > 0 for r in out["results"])
    assert out["fan_fbp_s"] >= 0 and "fan_fbp_peak_gib <= 2" in out["targets"]


def test_prior_designs_compares_checkpoints(capsys, tmp_path):
    """Two tiny runs (VE, VP) through the trainer, compared on the same slices: a table, then
    JSON with one row per checkpoint, each at its own step and design."""
    import numpy as np

    from medrecon.training import TrainConfig, train

    g = np.random.default_rng(0)
    imgs = np.full((6, 32, 32), -1000.0)
    for im in imgs:
        cy, cx = g.uniform(10, 22, 2)
        yy, xx = np.mgrid[:32, :32]
        im[(yy - cy) ** 2 + (xx - cx) ** 2 < 60] = 40.0
    data = tmp_path / "toy.npz"
    np.savez(data, images=imgs.astype(np.int16))
    cks = []
    for sde in ("ve", "vp"):
        cfg = TrainConfig(run=f"toy-{sde}", data=(str(data),), modality="ct", size="tiny", sde=sde, sigma_max=20.0,
                          patch_size=16, batch_size=2, warmup_steps=1, max_steps=2, out_dir=str(tmp_path / sde),
                          validate_every_s=0, sample_every_s=0, progress=False, threads=1)
        train(cfg)
        cks.append(str(tmp_path / sde / "last.pt"))
    threads = torch.get_num_threads()
    out = _load("prior_designs").main([*cks, "--val", str(data), "--every", "2", "--threads", "1"])
    torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(out))
    assert out["slices"] == 3 and [r["run"] for r in out["results"]] == ["toy-ve", "toy-vp"]
    assert out["results"][1]["design"].startswith("VP tiny") and all(r["step"] == 2 for r in out["results"])
    assert all(np.isfinite(r["psnr_sigma0.1"]) for r in out["results"])
    assert any(line.startswith("toy-vp") for line in lines)


def test_prior_designs_takes_exported_priors(capsys, tmp_path):
    """A design given as an exported prior (card) is judged like a checkpoint: same Tweedie numbers
    for the same weights; reconstruction (--recon) refuses checkpoints with the fix named."""
    import numpy as np
    import pytest

    from medrecon.training import TrainConfig, export_prior, train

    imgs = np.full((4, 32, 32), -1000.0)
    imgs[:, 8:24, 8:24] = 40.0
    data = tmp_path / "toy.npz"
    np.savez(data, images=imgs.astype(np.int16))
    cfg = TrainConfig(run="toy-pos", data=(str(data),), modality="ct", size="tiny", sigma_max=20.0, coords=True,
                      patch_size=16, batch_size=2, warmup_steps=1, max_steps=2, out_dir=str(tmp_path / "r"),
                      validate_every_s=0, sample_every_s=0, progress=False, threads=1)
    train(cfg)
    ck = str(tmp_path / "r" / "last.pt")
    card = export_prior(ck, tmp_path / "w", "toy-pos", card={"modality": "ct"}, dtype=torch.float32)
    threads = torch.get_num_threads()
    bench = _load("prior_designs")
    out = bench.main([ck, str(card), "--val", str(data), "--threads", "1"])
    torch.set_num_threads(threads)
    a, b = out["results"]
    assert a["design"] == b["design"] and "+xy" in a["design"] and a["step"] == b["step"] == 2
    assert abs(a["psnr_sigma0.1"] - b["psnr_sigma0.1"]) < 1e-3  # the same EMA weights (stored as float32)
    with pytest.raises(SystemExit, match="exported priors"):
        bench.main([ck, "--val", str(data), "--threads", "1", "--recon", "ct-10v"])
    torch.set_num_threads(threads)
    capsys.readouterr()


def test_benchmark_targets_of_issue_23():
    """priors.py states the denoising targets; recon.py states the 10-view target (TV + 3 dB)."""
    priors = _load("priors")
    got = priors.check_targets({"ct_denoise_gain_vs_tv_sigma0.05": 5.2, "ct_denoise_gain_vs_tv_sigma0.1": 4.9})
    assert [(t["value"], t["ok"]) for t in got] == [(5.2, True), (4.9, False)]  # MRI not measured: not listed
    recon = _load("recon")
    rows = [{"config": "ct-10v", "method": "tv", "psnr": 30.0, "ssim": 0.9},
            {"config": "ct-10v", "method": "dds", "psnr": 32.5, "ssim": 0.91}]
    by_name = {t["target"]: t for t in recon.check_targets(rows)}
    three = [t for name, t in by_name.items() if "TV + 3 dB" in name]
    two = [t for name, t in by_name.items() if "TV + 2 dB" in name]
    assert three and three[0]["ok"] is False and three[0]["value"] == 2.5 and two[0]["ok"] is True


def test_train_threads_compares_layouts(capsys, tmp_path):
    """One run at T threads against T one-thread runs, read off the runs' own loss.csv (a tiny
    net for a few seconds; T = 1 here so that it runs on any machine)."""
    import numpy as np

    imgs = np.full((4, 32, 32), -1000.0)
    imgs[:, 8:24, 8:24] = 40.0
    data = tmp_path / "toy.npz"
    np.savez(data, images=imgs.astype(np.int16))
    out = _load("train_threads").main(["--preset", "", "--seconds", "8", "--threads", "1", "--no-tcmalloc",
                                       "--out", str(tmp_path / "runs"), "--", "--data", str(data), "--modality",
                                       "ct", "--size", "tiny", "--patch-size", "16", "--batch-size", "2",
                                       "--sigma-max", "20", "--warmup-steps", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(out))
    assert [r["layout"] for r in out["results"]] == ["1x1", "1x1"] and out["tcmalloc"] is None
    assert all(r["steps_per_s_total"] > 0 for r in out["results"])
    assert (tmp_path / "runs" / "glibc-1x1" / "loss.csv").is_file()


def test_priors_train_gap_draws_the_validation_noise_for_the_training_slices(tmp_path):
    """``--train-gap``: the training slices get the validation's noise draws, so the same slices give
    a gap of exactly 0, and the validation rows are those of a run without it."""
    import numpy as np

    from medrecon.priors import ScorePrior
    from medrecon.training import TrainConfig, export_prior, train

    rng = np.random.default_rng(0)
    imgs = np.full((4, 32, 32), -1000.0)
    imgs[:, 8:24, 8:24] = 40.0 + 200.0 * rng.random((4, 16, 16))
    data = tmp_path / "toy.npz"
    np.savez(data, images=imgs.astype(np.int16))
    cfg = TrainConfig(run="toy", data=(str(data),), modality="ct", size="tiny", sigma_max=20.0, patch_size=16,
                      batch_size=2, warmup_steps=1, max_steps=2, out_dir=str(tmp_path / "r"),
                      validate_every_s=0, sample_every_s=0, progress=False, threads=1)
    train(cfg)
    prior = ScorePrior.load(export_prior(tmp_path / "r" / "last.pt", tmp_path / "w", "toy", card={"modality": "ct"}))
    bench = _load("priors")
    x = torch.from_numpy(((imgs + 1024.0) / 4096.0).astype(np.float32))
    same = bench.evaluate(prior, x, x, 0, 1, 32, tmp_path, "ct", train_gap=x)["rows"]
    plain = bench.evaluate(prior, x, x, 0, 1, 32, tmp_path, "ct")["rows"]
    assert [r["prior"] for r in same] == [r["prior"] for r in plain]
    assert all(r["train_gap"] == 0.0 and "train_gap" not in p for r, p in zip(same, plain, strict=True))
    other = bench.evaluate(prior, x[:2], x, 0, 1, 32, tmp_path, "ct", train_gap=x.flip(-1))["rows"]
    assert all(np.isfinite(r["train_gap"]) for r in other)
