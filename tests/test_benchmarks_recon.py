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
