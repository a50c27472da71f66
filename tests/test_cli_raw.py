"""``medrecon reconstruct`` / ``convert`` / ``batch`` on raw scanner files (twix on the shared data,
MRD written here), end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medrecon.cli.main import main
from medrecon.datasets import KSpace, load_nifti, save_mrd

REPO = Path(__file__).resolve().parents[1]
RAW = Path(os.environ.get("MEDRECON_DATA", REPO.parent / "shared" / "data")) / "mri" / "raw"
GRE = RAW / "twixtools_example_gre.dat"
INVIVO = RAW / "pulseq_flash2d_invivo_16ch_2024-02-06-164128.dat"


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path.name} not found in {path.parent} (set MEDRECON_DATA)")
    return path


def test_twix_reconstruct_prints_what_it_found_and_writes_scanner_geometry(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["reconstruct", "--modality", "mri", "--input", str(need(GRE)), "--method", "cg", "--iters", "5",
                 "--out", str(out), "--case-id", "gre"]) == 0
    err = capsys.readouterr().err
    assert "found SIEMENS Skyra 2.9 T; sequence gre; 2 coils, 1 slice, 160×320 k-space" in err
    assert "no noise scan" in err and "k-space edge" in err and "320 → 160 readout samples" in err
    vol = load_nifti(out / "gre_cg.nii.gz")
    assert vol.shape == (1, 160, 160)
    assert np.allclose(vol.spacing_mm, (4.0, 1.25, 1.25), atol=1e-3)
    rec = json.loads((out / "gre_cg.json").read_text())
    assert rec["notes"]["geometry"].startswith("from the scanner header") and "ESPIRiT" in rec["notes"]["coil_maps"]
    assert rec["simulated"] is None


def test_twix_to_mr_dicom(tmp_path):
    import pydicom

    out = tmp_path / "o"
    assert main(["reconstruct", "--modality", "mri", "--input", str(need(GRE)), "--method", "zero-filled",
                 "--format", "dicom", "--out", str(out), "--case-id", "gre"]) == 0
    files = sorted((out / "gre_zero-filled_dicom").glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "MR" and (ds.Rows, ds.Columns) == (160, 160)
    assert np.allclose([float(v) for v in ds.PixelSpacing], [1.25, 1.25], atol=1e-3)
    normal = np.cross(*np.reshape([float(v) for v in ds.ImageOrientationPatient], (2, 3)))
    assert abs(normal @ np.array([0.0, 0.0383878015, 0.9992629886])) > 0.999  # the protocol's slice normal


def test_acceleration_on_a_fully_sampled_scan_is_retrospective(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["reconstruct", "--modality", "mri", "--input", str(need(INVIVO)), "--method", "cg", "--iters", "10",
                 "--acceleration", "3", "--center-fraction", "0.16", "--out", str(out), "--case-id", "head"]) == 0
    rec = json.loads((out / "head_cg_R3-equispaced.json").read_text())
    assert rec["simulated"].startswith("retrospective on measured data: R=3 equispaced")
    assert "retrospective on measured data" in rec["problem"]
    assert rec["notes"]["thinning"]["lines_kept"] < 128 / 2
    assert rec["metrics"]["psnr"] > rec["metrics"]["psnr_initial"] > 15  # CG-SENSE beats zero-filling


def test_epi_twix_is_refused_in_one_line(tmp_path, capsys):
    epi = need(RAW / "twixtools_example_epi.dat")
    assert main(["reconstruct", "--modality", "mri", "--input", str(epi), "--method", "cg",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "EPI" in err and epi.name in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_raw_options_are_refused_for_other_inputs(tmp_path, capsys):
    from medrecon.datasets import Volume, save_nifti

    img = tmp_path / "m.nii.gz"
    save_nifti(Volume(np.ones((1, 16, 16), np.float32), np.eye(4), "MR"), img)
    assert main(["reconstruct", "--modality", "mri", "--input", str(img), "--method", "zero-filled",
                 "--partial-fourier", "pocs", "--out", str(tmp_path / "o")]) == 2
    assert "--partial-fourier pocs: only for raw scanner files" in capsys.readouterr().err


def _mrd_scan(path: Path, accelerated: bool = True) -> Path:
    """A 4-coil MRD scan: R = 2 with 16 calibration lines in the centre, a noise scan."""
    rng = np.random.default_rng(0)
    n, coils = 64, 4
    yy, xx = np.mgrid[:n, :n] - n / 2
    img = ((yy / 24) ** 2 + (xx / 20) ** 2 < 1).astype(float) + 0.5 * ((yy - 5) ** 2 + (xx + 6) ** 2 < 30)
    sens = np.stack([np.exp(-((yy - 30 * np.cos(a)) ** 2 + (xx - 30 * np.sin(a)) ** 2) / 2000)
                     for a in np.arange(coils) * np.pi / 2])
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(sens * img, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    k = k + 0.002 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    mask = np.ones((1, n, n), bool)
    if accelerated:
        mask[:, 1::2] = False
        mask[:, n // 2 - 8: n // 2 + 8] = True
    noise = 0.002 * (rng.standard_normal((coils, 2000)) + 1j * rng.standard_normal((coils, 2000)))
    raw = {"vendor": "Test", "model": "Synthetic", "field_T": 3.0, "acceleration": [2 if accelerated else 1, 1],
           "recon_fov_mm": [220.0, 220.0, 5.0], "readout_oversampling": 1.0}
    ksp = KSpace((k[:, None] * mask).astype(np.complex64), mask=mask, header={"raw": raw, "readout_axis": -1},
                 noise=noise.astype(np.complex64))
    return save_mrd(ksp, path)


def test_accelerated_mrd_scan_with_noise_scan_prospective(tmp_path, capsys):
    scan = _mrd_scan(tmp_path / "scan.mrd")
    out = tmp_path / "o"
    assert main(["reconstruct", "--modality", "mri", "--input", str(scan), "--method", "cg", "--iters", "15",
                 "--out", str(out), "--case-id", "acc"]) == 0
    err = capsys.readouterr().err
    assert "found Test Synthetic 3.0 T" in err and "R = 2 (header)" in err and "noise scan: 2000 samples" in err
    assert "prewhiten: noise scan (2000 samples per coil)" in err
    rec = json.loads((out / "acc_cg.json").read_text())
    assert "R≈1.6 as measured" in rec["problem"] and "16×16 calibration region" in rec["notes"]["coil_maps"]


def test_convert_twix_to_mrd_then_reconstruct_it(tmp_path, capsys):
    mrd = tmp_path / "gre.h5"
    assert main(["convert", str(need(GRE)), str(mrd), "--to", "mrd"]) == 0
    assert "160 lines" in capsys.readouterr().out
    assert main(["reconstruct", "--modality", "mri", "--input", str(mrd), "--method", "zero-filled",
                 "--out", str(tmp_path / "o"), "--case-id", "m"]) == 0
    assert "found SIEMENS Skyra" in capsys.readouterr().err
    assert load_nifti(tmp_path / "o" / "m_zero-filled.nii.gz").shape == (1, 160, 160)
    assert main(["convert", str(need(GRE)), str(mrd), "--to", "mrd"]) == 2  # no silent overwrite


def test_batch_folder_picks_up_raw_files(tmp_path):
    from medrecon.pipeline.case import ReconstructConfig
    from medrecon.pipeline.manifest import read_cases

    src = tmp_path / "in"
    src.mkdir()
    _mrd_scan(src / "a.mrd")
    _mrd_scan(src / "b.h5", accelerated=False)
    specs = read_cases(src, ReconstructConfig(method="cg"), tmp_path / "out")
    kinds = sorted(s.description for s in specs)
    assert kinds == ["MRD raw data", "MRD raw data"], kinds
    assert {s.config.modality for s in specs} == {"mri"}


def test_thinned_invivo_warns_when_the_coil_maps_miss_the_object(tmp_path, capsys):
    """Retrospective R = 4 on the 128² in-vivo scan keeps a 10×10 calibration square; ESPIRiT
    maps from it cover a few per cent of the head and the run says so (and by how much).  With
    a quarter of the lines as calibration the maps cover it, and no warning is given."""
    out = tmp_path / "o"
    args = ["reconstruct", "--modality", "mri", "--input", str(need(INVIVO)), "--method", "cg", "--acceleration", "4",
            "--out", str(out)]
    assert main([*args, "--case-id", "thin"]) == 0
    err = capsys.readouterr().err
    assert "coil maps from the 10×10 calibration region cover only" in err
    rec = json.loads((out / "thin_cg_R4-equispaced.json").read_text())
    assert rec["notes"]["coil_map_coverage"] < 0.9
    assert any("cover only" in w for w in rec["warnings"])
    assert main([*args, "--center-fraction", "0.25", "--case-id", "wide"]) == 0
    assert "cover only" not in capsys.readouterr().err
    rec = json.loads((out / "wide_cg_R4-equispaced.json").read_text())
    assert rec["notes"]["coil_map_coverage"] >= 0.9 and rec["metrics"]["psnr"] > 25  # cut to the maps: 18 dB
