"""Smoke test of benchmarks/recon.py: 32² crops, one slice, classical methods only."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDRECON_DATA", REPO.parent / "shared" / "data"))

pytestmark = pytest.mark.skipif(
    not (DATA / "ct" / "val.npz").is_file() or not (DATA / "mri" / "val.npz").is_file(),
    reason=f"validation data not found under {DATA} (set MEDRECON_DATA)",
)


def _load():
    spec = importlib.util.spec_from_file_location("_bench_recon", REPO / "benchmarks" / "recon.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_recon_benchmark_smoke(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDRECON_CACHE", str(tmp_path))  # the weight sweep's cache
    threads = torch.get_num_threads()
    bench = _load()
    out = bench.main(
        [
            "--crop",
            "32",
            "--slices",
            "1",
            "--configs",
            "ct-23v,mri-8x-equispaced",
            "--methods",
            "fbp,zero-filled,tv,ccdf",
            "--prior-ct",
            "none",
            "--prior-mri",
            "none",
            "--iters",
            "5",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    data = json.loads(lines[-1])  # the JSON line comes last
    assert data == json.loads(json.dumps(out))
    assert (
        data["bench"] == "recon" and data["threads"] == 2 and data["size"] == {"ct": 32, "mri": 32}
    )
    rows = {(r["config"], r["method"]): r for r in data["results"]}
    assert set(rows) == {("ct-23v", m) for m in ("fbp", "tv", "ccdf")} | {
        ("mri-8x-equispaced", m) for m in ("zero-filled", "tv", "ccdf")
    }
    assert rows[("ct-23v", "ccdf")]["skipped"] == "no prior given"
    for key in (
        ("ct-23v", "fbp"),
        ("ct-23v", "tv"),
        ("mri-8x-equispaced", "zero-filled"),
        ("mri-8x-equispaced", "tv"),
    ):
        r = rows[key]
        assert r["n_slices"] == 1 and r["nfe"] == 0 and 5 < r["psnr"] < 80 and 0 < r["ssim"] <= 1, r
    assert (
        rows[("ct-23v", "tv")]["psnr_soft"] is not None
        and "psnr_soft" not in rows[("mri-8x-equispaced", "tv")]
    )
    # the TV weight was swept on the tuning rows, which are not the reported ones
    assert (
        set(data["weights"]) == {"ct-noiseless", "mri"} and data["weights"]["mri"]["tv"]["lam"] > 0
    )
    assert not set(data["rows"]["ct"]) & set(data["tuning_rows"]["ct"])
    assert (tmp_path / "bench" / "recon_sweep.json").is_file()
    assert any(line.startswith("setting") for line in lines)  # the table
    assert all(t["ok"] is None for t in data["targets"])  # no diffusion rows: nothing to judge
    assert torch.get_num_threads() == threads  # the thread count is restored


def test_calibrate_benchmark_stores_a_factor(capsys, tmp_path):
    """benchmarks/calibrate.py on 32² crops with a tiny untrained prior: pools the noisy twin of a
    CT setting, fits the factor on the tuning rows only and writes it into the card it was given."""
    from medrecon.priors import ScoreNet, ScorePrior, ct_normaliser, network_spec
    from medrecon.priors.sde import VESDE

    torch.manual_seed(0)
    net = ScoreNet(network_spec("tiny"), VESDE(0.01, 10.0))
    card = ScorePrior(net, ct_normaliser(), {"modality": "ct"}).save(tmp_path, "tiny-ct", dtype=torch.float32)
    _load()  # registers the recon module the calibrate script imports
    spec = importlib.util.spec_from_file_location("_bench_cal", REPO / "benchmarks" / "calibrate.py")
    cal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cal)
    out = cal.main(["--settings", "ct-23v", "--crop", "32", "--samples", "2", "--prior-ct", str(card),
                    "--fixed", '{"steps": 4, "init": "fbp"}', "--store"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(json.dumps(out)) and line["bench"] == "calibrate"
    (res,) = line["results"]
    assert res["pooled_noisy"] and res["n_images"] == 4 and res["rows"] == [7, 24]
    assert res["std_scale"] > 0 and res["coverage_calibrated"] >= 0.95
    stored = json.loads(card.read_text())["calibration"]["parallel-23"]["ccdf"]
    assert stored["std_scale"] == res["std_scale"] and stored["settings"]["steps"] == 4


@pytest.mark.parametrize(("spec", "names", "keys"), [
    ("ct-la90", ["ct-la90"], ["parallel-60-la90"]),
    ("ct-23v,ct-la120", ["ct-23v", "ct-la120"], ["parallel-23", "parallel-60-la120"]),
    ("ct", ["ct-10v", "ct-23v", "ct-60v", "ct-10v-noisy", "ct-23v-noisy", "ct-60v-noisy"], None),
    ("ct-la", [], None),  # not a prefix of the table's names, not a limited-angle name
])
def test_limited_angle_settings_are_named_not_prefixed(spec, names, keys):
    """``ct-la<arc>`` names a limited-angle setting (60 views over the arc, its own operator key),
    which the ``ct`` prefix of the table does not pull in."""
    from medrecon.solvers.cards import operator_key

    recon = _load()
    got = recon.select_configs(spec)
    assert [c.name for c in got] == names
    if keys:
        assert [operator_key(c.build(32)) for c in got] == keys
