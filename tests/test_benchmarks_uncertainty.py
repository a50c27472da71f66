"""Smoke test of benchmarks/uncertainty.py: 32² crops, one report slice, a tiny untrained prior."""

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
    not (DATA / "ct" / "val.npz").is_file(),
    reason=f"validation data not found under {DATA} (set MEDRECON_DATA)",
)


def _load():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("_bench_uncertainty", REPO / "benchmarks" / "uncertainty.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_uncertainty_benchmark_smoke(capsys, tmp_path, monkeypatch):
    from medrecon.priors import ScoreNet, ScorePrior, ct_normaliser, network_spec
    from medrecon.priors.sde import VESDE

    monkeypatch.setenv("MEDRECON_CACHE", str(tmp_path / "cache"))  # the TV sweeps' cache
    torch.manual_seed(0)
    net = ScoreNet(network_spec("tiny"), VESDE(0.01, 10.0))
    card = ScorePrior(net, ct_normaliser(), {"modality": "ct"}).save(tmp_path, "tiny-ct", dtype=torch.float32)
    threads = torch.get_num_threads()
    bench = _load()
    out = bench.main(["--configs", "ct-la90,ct-23v", "--crop", "32", "--slices", "1", "--samples", "2",
                      "--steps", "6", "--iters", "5", "--prior-ct", str(card), "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    data = json.loads(lines[-1])  # the JSON line comes last
    assert data == json.loads(json.dumps(out, default=str)) and data["bench"] == "uncertainty"
    rows = {r["config"]: r for r in data["results"]}
    assert set(rows) == {"ct-la90", "ct-23v"}
    # 60 views over 90°: its own operator key, so no full-scan calibration is applied to it
    la = rows["ct-la90"]
    assert la["key"] == "parallel-60-la90" and la["n_views"] == 60 and la["std_scale"] == 1.0
    for r in rows.values():
        assert r["rows"] == [2] and 0 <= r["coverage_2sigma"] <= 1 and r["median_std"] > 0
        assert 5 < r["psnr_tv"] < 80 and 5 < r["psnr_dds"] < 80
        assert set(r["spearman"]) == set(bench.CANDIDATES)
        assert all(v["mean"] is None or -1 <= v["mean"] <= 1 for v in r["spearman"].values())
    # the keep rule is judged on the decision settings run (ct-23v here), never the limited-angle ones
    assert data["decision"]["settings"] == ["ct-23v"]
    assert all(v["of"] == 1 for v in data["decision"]["candidates"].values())
    assert any(line.startswith("setting") for line in lines) and any(line.startswith("Spearman") for line in lines)
    assert torch.get_num_threads() == threads  # the thread count is restored
    # --combine reports earlier runs' JSON lines as one run, without running anything
    log = tmp_path / "run.log"
    log.write_text("\n".join(lines) + "\n")
    again = bench.main(["--combine", str(log), str(log)])
    assert [r["config"] for r in again["results"]] == ["ct-la90", "ct-23v"] * 2
    assert again["decision"]["settings"] == ["ct-23v", "ct-23v"] and again["rows"] == {"ct": [2], "mri": [30]}


def test_null_space_part_removes_what_the_operator_sees():
    """P_null v = v − A⁺A v: A · P_null v ≈ 0, and a vector in the null space is kept."""
    from medrecon.operators import MaskedFourier, mri_mask

    bench = _load()
    A = MaskedFourier(mri_mask("equispaced", (16, 16), 4, 0.125, seed=0))  # noqa: N806
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 1, 16, 16, generator=g, dtype=torch.complex128)
    p = bench.null_space_part(A, v, iters=5)
    assert torch.linalg.norm(A(p)) < 1e-8 * torch.linalg.norm(A(v))
    torch.testing.assert_close(bench.null_space_part(A, p, iters=5), p)
