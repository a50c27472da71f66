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


def test_prior_designs_compares_checkpoints(capsys, tmp_path):
    """Two tiny runs (VE, VP) through the trainer, compared on the same slices: a table, then
    JSON with one row per checkpoint, each at its own step and design."""
    import numpy as np

    from medrecon.priors.train import TrainConfig, train

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
