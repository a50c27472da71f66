"""Smoke tests of the volume benchmarks: benchmarks/mbir3d.py, and tune.py / calibrate.py on
volumes (tiny untrained prior, small volumes)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDRECON_DATA", REPO.parent / "shared" / "data"))


def _load(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import their siblings
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_prior(tmp_path) -> Path:
    from medrecon.priors import ScoreNet, ScorePrior, ct_normaliser, network_spec
    from medrecon.priors.sde import VESDE

    torch.manual_seed(0)
    net = ScoreNet(network_spec("tiny"), VESDE(0.01, 10.0))
    return ScorePrior(net, ct_normaliser(), {"modality": "ct"}).save(tmp_path, "tiny-ct", dtype=torch.float32)


@pytest.fixture
def volume_file(tmp_path) -> Path:
    """A 12-slice CT-like volume in the development data's npz layout (z positions shuffled)."""
    n, z = 32, 12
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    body = np.where(xx**2 + yy**2 < (0.4 * n) ** 2, 40.0, -1000.0)
    vol = np.stack([body + 200.0 * np.exp(-((xx - k) ** 2 + yy**2) / 20) for k in range(z)]).astype(np.int16)
    order = np.random.default_rng(0).permutation(z)
    path = tmp_path / "vol.npz"
    np.savez(path, images=vol[order], z_position_mm=(2.5 * np.arange(z))[order].astype(np.float32))
    return path


def test_tuning_volumes_are_disjoint_blocks_in_z_order(volume_file):
    bench = _load("mbir3d")
    vols = bench.tuning_volumes(volume_file, 32, 4, 3)
    full = bench.read_volume(volume_file)
    assert vols.shape == (3, 4, 1, 32, 32)
    for block, start in zip(vols, (0, 4, 8), strict=True):
        np.testing.assert_array_equal(block[:, 0].numpy(), full[start : start + 4])
    assert np.all(np.diff(full[:, 16, :].argmax(1)) >= 0)  # sorted by z: the bump moves right
    with pytest.raises(SystemExit):
        bench.tuning_volumes(volume_file, 32, 5, 3)  # 15 slices do not fit 12


def test_tune_benchmark_on_a_volume_stores_under_the_volume_method(capsys, tmp_path, tiny_prior, volume_file):
    """tune.py --method dds3d: blocks of the volume, the operator key of --views, the winner stored
    as tuned/parallel-8/dds3d beside (not over) a 2-D method's entry of the same key."""
    from medrecon.tuning import store_tuned_defaults

    store_tuned_defaults(tiny_prior, "parallel-8", {"dds": {"t0": 0.3}})
    tune = _load("tune")
    out = tune.main(["--method", "dds3d", "--prior", str(tiny_prior), "--volume", str(volume_file), "--size", "32",
                     "--views", "8", "--slices", "4", "--blocks", "2", "--budget", "3", "--max-nfe", "4",
                     "--space", '{"t0": [0.05, 0.3], "steps": {"choices": [10, 20]}}', "--store", str(tiny_prior)])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(json.dumps(out)) and line["operator_key"] == "parallel-8"
    assert line["n_images"] == 2 and line["volume"] == str(volume_file) and line["trained_on_volume"] is False
    tuned = json.loads(tiny_prior.read_text())["tuned"]["parallel-8"]
    assert tuned["dds"]["t0"] == 0.3 and set(tuned["dds3d"]) >= {"t0", "steps"}


def test_calibrate_benchmark_on_a_volume(capsys, tiny_prior, volume_file):
    cal = _load("calibrate")
    out = cal.main(["--method", "mbir3d", "--prior-ct", str(tiny_prior), "--volume", str(volume_file), "--size", "32",
                    "--views", "8,23", "--slices", "4", "--blocks", "2", "--samples", "2",
                    "--fixed", '{"steps": 10}', "--store"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["operator_key"] for r in line["results"]] == ["parallel-8", "parallel-23"] == [
        r["operator_key"] for r in out["results"]]
    stored = json.loads(tiny_prior.read_text())["calibration"]
    assert stored["parallel-23"]["mbir3d"]["n_slices"] == 4 and stored["parallel-8"]["mbir3d"]["std_scale"] > 0


@pytest.mark.skipif(not (DATA / "nifti" / "totalseg_example_ct.nii.gz").is_file(),
                    reason=f"the report volume is not under {DATA} (set MEDRECON_DATA)")
def test_mbir3d_benchmark_smoke(capsys, tiny_prior):
    threads = torch.get_num_threads()
    bench = _load("mbir3d")
    bench.main(["--size", "32", "--slices", "4", "--views", "8", "--samples", "2", "--prior", str(tiny_prior),
                      "--methods", "tv3d,dds,dds3d", "--overrides", '{"dds3d": {"steps": 10}, "dds": {"steps": 10}}'])
    lines = capsys.readouterr().out.strip().splitlines()
    data = json.loads(lines[-1])
    assert data["bench"] == "mbir3d" and data["cpu"] and data["slices"] == 4
    rows = {r["method"]: r for r in data["results"]}
    assert set(rows) == {"fbp", "tv3d", "dds", "dds3d"}
    assert "coverage_2sigma" in rows["dds3d"] and "coverage_2sigma" not in rows["tv3d"]
    assert all(r["psnr"] > 10 and r["z_coherence"] >= 0 for r in rows.values())
    assert rows["dds3d"]["settings"]["init"] == "tv3d"
    targets = {t["target"]: t["ok"] for t in data["targets"]}
    assert targets["8 views: best volume method ≥ 3-D TV + 0 dB"] in (True, False)
    assert targets["64 × 256², 23 views, 4 samples: ≤ 300 s (2 cores)"] is None  # not this size
    assert any(line.startswith("target:") for line in lines) and torch.get_num_threads() == threads
