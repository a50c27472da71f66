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
