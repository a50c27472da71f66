"""Measured data as physicists bring it: the geometry check, retrospective thinning, short scans.

Sinograms are simulated here with planted geometry errors (a flipped detector, a centre of
rotation 3 bins off) on an asymmetric phantom; k-space is fully sampled and written in BART's
format, then undersampled by medrecon and, independently, in NumPy.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medrecon.cli.main import main
from medrecon.datasets import KSpace, Sinogram, load_kspace
from medrecon.datasets.simulate import ct_operator
from medrecon.datasets.thinning import thin_view_indices
from medrecon.errors import SettingsError
from medrecon.pipeline.case import ReconstructConfig, case_seed, run_case
from medrecon.pipeline.geometry_check import check_geometry
from medrecon.pipeline.problems import build_problem

N = 64
FAN = {"type": "fan", "convention": "astra", "detector": "flat", "n_detectors": 100, "detector_spacing_mm": 1.4,
       "source_to_isocenter_mm": 250.0, "source_to_detector_mm": 350.0, "pixel_size_mm": 1.0, "image_size": N,
       "units": "image_pixel", "angles_rad": (np.arange(180) * 2 * math.pi / 180).tolist()}
PARALLEL = {"type": "parallel", "n_detectors": 92, "detector_spacing_mm": 1.0, "image_size": N,
            "angles_rad": (np.arange(90) * math.pi / 90).tolist()}


def _phantom(n: int = N) -> np.ndarray:
    """An ellipse with inserts that have no symmetry (HU-like values)."""
    yy, xx = np.mgrid[:n, :n] - n / 2
    img = np.where(xx**2 / 25**2 + yy**2 / 20**2 < 1, 40.0, -1000.0)
    img = img + np.where((xx - 8) ** 2 + (yy + 5) ** 2 < 30, 600.0, 0.0)
    img = img + np.where((xx + 10) ** 2 + (yy - 8) ** 2 < 10, 1200.0, 0.0)
    img = img + np.where((np.abs(xx - 3) < 2) & (np.abs(yy - 11) < 6), 300.0, 0.0)
    return img


def _sinogram(geometry: dict, noise: float = 0.005, **truth) -> np.ndarray:
    """The phantom's sinogram with the ``truth`` keys (not the file's), plus a little noise."""
    A = ct_operator({**geometry, **truth}, (N, N), matrix_budget=0)
    y = A(torch.from_numpy(_phantom())[None, None])[0, 0].numpy()  # (views, bins)
    return (y + noise * y.std() * np.random.default_rng(0).standard_normal(y.shape)).astype(np.float32)


def _save(tmp_path: Path, name: str, data: np.ndarray, geometry: dict) -> Path:
    np.save(tmp_path / f"{name}.npy", data)
    (tmp_path / f"{name}.json").write_text(json.dumps(geometry))
    return tmp_path / f"{name}.npy"


# ----------------------------------------------------------------------------- geometry check
def test_check_geometry_finds_a_planted_flip_and_offset():
    data = _sinogram(FAN, detector_flipped=True, detector_offset_bins=3.0)
    check = check_geometry(Sinogram(data[None], FAN))
    assert check.changed and check.confidence == "high"
    assert check.keys() == {"detector_flipped": True, "rotation_direction": "counterclockwise",
                            "detector_offset_bins": 3.0}
    assert check.stated.residual > 5 * check.best.residual
    assert check.mirror is not None and check.mirror.keys()["rotation_direction"] == "clockwise"
    text = "\n".join(check.lines())
    assert '"detector_flipped": true' in text and "mirror" in text and "confidence: high" in text


def test_check_geometry_keeps_the_right_geometry():
    data = _sinogram(FAN)
    check = check_geometry(Sinogram(data[None], FAN))
    assert not check.changed and check.best == check.stated
    assert check.margin > 0.5 and check.offset_rise > 0.1


def test_check_geometry_finds_a_parallel_offset_and_says_what_it_cannot_tell(tmp_path, capsys):
    path = _save(tmp_path, "par", _sinogram(PARALLEL, detector_offset_bins=-3.0), PARALLEL)
    assert main(["check-geometry", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["keys"]["detector_offset_bins"] == -3.0 and out["changed"] and out["margin"] is None
    assert any("parallel beam" in n for n in out["notes"])
    assert main(["check-geometry", str(path)]) == 0
    text = capsys.readouterr().out
    assert "keys to use in the JSON" in text and '"detector_offset_bins": -3.0' in text


def test_a_reconstruction_whose_data_fit_another_geometry_says_so(tmp_path):
    path = _save(tmp_path, "scan", _sinogram(FAN, detector_flipped=True), FAN)
    cfg = ReconstructConfig(input=str(path), out=str(tmp_path / "o"), method="fbp", case_id="c")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rec = run_case(cfg)
    assert any("the data fit another geometry" in w and "check-geometry" in w for w in rec["warnings"])
    assert rec["notes"]["geometry_check"]["best_fit"]["detector_flipped"] is True
    good = _save(tmp_path, "good", _sinogram(FAN), FAN)
    rec = run_case(ReconstructConfig(input=str(good), out=str(tmp_path / "o2"), method="fbp", case_id="g"))
    assert not any("another geometry" in w for w in rec["warnings"])
    assert rec["notes"]["geometry_check"]["best_fit"] == "as given"


# ----------------------------------------------------------------------------- thinning
def test_thin_view_indices():
    angles = np.radians(np.arange(0, 360, 1.0))
    assert thin_view_indices(angles, views=3).tolist() == [0, 120, 240]
    assert thin_view_indices(angles, view_step=100).tolist() == [0, 100, 200, 300]
    assert thin_view_indices(angles, limited_angle_deg=3).tolist() == [0, 1, 2]
    backwards = np.mod(-angles + 1.0, 2 * math.pi)  # a scan turning the other way, starting at 1 rad
    assert thin_view_indices(backwards, limited_angle_deg=2.5).tolist() == [0, 1, 2]
    with pytest.raises(SettingsError, match="--views 400: the data have 360 views"):
        thin_view_indices(angles, views=400)
    with pytest.raises(SettingsError, match="not both"):
        thin_view_indices(angles, views=4, view_step=2)


@pytest.mark.parametrize("selection", [{"views": 12}, {"view_step": 7}, {"limited_angle_deg": 90.0, "views": 20}],
                         ids=["views", "view-step", "limited-angle"])
def test_thinning_a_measured_sinogram_equals_thinning_in_numpy(tmp_path, selection):
    data = np.stack([_sinogram(FAN), _sinogram(FAN, noise=0.01)])
    path = _save(tmp_path, "scan", data, FAN)
    n = data.shape[1]
    if "views" in selection and "limited_angle_deg" not in selection:
        idx = np.floor(np.arange(12) * n / 12).astype(int)
    elif "view_step" in selection:
        idx = np.arange(0, n, 7)
    else:  # 2° steps from 0: views 0..44 lie within 90°; 20 of those 45, equally spaced
        idx = np.arange(45)[np.floor(np.arange(20) * 45 / 20).astype(int)]
    cfg = ReconstructConfig(input=str(path), out=str(tmp_path / "o"), method="fbp", case_id="c", **selection)
    prob = build_problem(cfg, seed=0)
    torch.testing.assert_close(prob.y, torch.from_numpy(data[:, idx])[:, None])
    full = ct_operator(FAN, (N, N))
    np.testing.assert_allclose(prob.A.angles, full.full_angles[idx])
    np.testing.assert_allclose(prob.A.full_angles, full.full_angles)  # T is every measured view
    torch.testing.assert_close(prob.reference, full.fbp(torch.from_numpy(data)[:, None]))
    assert prob.notes["scan"] == ("limited angle: FBP normalised to the range covered"
                                  if "limited_angle_deg" in selection else "full scan")
    thin = prob.notes["thinning"]
    assert thin["how"] == "retrospective on measured data" and thin["view_indices"] == idx.tolist()
    rec = run_case(cfg)
    assert "retrospective on measured data" in rec["problem"] and rec["notes"]["thinning"]["views_kept"] == idx.size
    assert rec["simulated"].startswith("retrospective on measured data")
    assert rec["notes"]["reference"] == f"FBP of all {n} measured views" and "psnr" in rec["metrics"]
    assert rec["metrics"]["psnr"] > 15  # FBP of the thinned data against FBP of all of it


def test_thinning_measured_kspace_equals_masking_in_numpy(tmp_path):
    """BART k-space (readout along kx, the last axis): the phase-encode rows an mri_mask over
    (readout, phase) keeps, zeroed elsewhere, as NumPy does it."""
    from medrecon.datasets.bart import save_bart_kspace
    from medrecon.operators import fft2c, mri_mask

    g = torch.Generator().manual_seed(0)
    img = torch.from_numpy(_phantom(32) + 1100.0).to(torch.complex64)
    maps = torch.randn(4, 32, 32, generator=g, dtype=torch.complex64)
    full = fft2c(maps * img)[:, None].numpy()  # (coils, Z=1, ky, kx), fully sampled
    save_bart_kspace(KSpace(full), tmp_path / "k")
    cfg = ReconstructConfig(modality="mri", input=str(tmp_path / "k.cfl"), out=str(tmp_path / "o"),
                            method="zero-filled", acceleration=4.0, mask="random", case_id="m")
    seed = case_seed(0, "m")
    prob = build_problem(cfg, seed)
    loaded = load_kspace(str(tmp_path / "k.cfl")).data
    rows = mri_mask("random", (32, 32), 4.0, 0.08, seed=seed).numpy().any(axis=0)  # one flag per ky line
    torch.testing.assert_close(prob.y, torch.from_numpy(loaded * rows[None, None, :, None]).permute(1, 0, 2, 3))
    assert prob.notes["thinning"]["how"] == "retrospective on measured data"
    assert prob.reference is not None and "full scan" in prob.notes["reference"]
    rec = run_case(cfg)
    assert "R=4 random, retrospective on measured data" in rec["problem"] and "psnr" in rec["metrics"]
    assert rec["simulated"].startswith("retrospective on measured data: R=4 random")


def test_thinning_refuses_undersampled_kspace(tmp_path):
    from medrecon.datasets.bart import save_bart_kspace

    k = np.ones((1, 1, 16, 16), np.complex64)
    k[:, :, ::2] = 0  # every other phase-encode line missing
    save_bart_kspace(KSpace(k), tmp_path / "u")
    cfg = ReconstructConfig(modality="mri", input=str(tmp_path / "u.cfl"), out=str(tmp_path / "o"),
                            method="zero-filled", acceleration=2.0, input_domain="kspace")
    with pytest.raises(SettingsError, match="u.cfl: --acceleration: retrospective thinning needs a fully sampled"):
        build_problem(cfg, 0)


# ----------------------------------------------------------------------------- figure window
def test_a_panel_far_outside_the_shared_window_gets_its_own():
    from medrecon.report import panel_range

    low, high, label = panel_range("initial estimate (fbp)", np.linspace(-950, -850, 100), "HU", (-160.0, 240.0))
    assert -950 < low < high < -850 and "own window" in label
    assert panel_range("reconstruction", np.linspace(-1000, 100, 100), "HU", (-160.0, 240.0))[:2] == (-160.0, 240.0)
