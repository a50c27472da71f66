"""End-to-end `medrecon` sub-commands: reconstruct (retrospective / prospective), simulate,
evaluate, info, tune, priors; exit codes and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medrecon.api import Reconstruction
from medrecon.cli.main import main
from medrecon.datasets import Volume, load_nifti, save_nifti

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDRECON_DATA", REPO.parent / "shared" / "data"))


def _phantom(path: Path, n: int = 48, z: int = 1, modality: str = "CT") -> Path:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    img = np.where(xx**2 + yy**2 < (0.35 * n) ** 2, 40.0, -1000.0)
    img[n // 2 - 3 : n // 2 + 3, n // 3 : n // 3 + 6] = 700.0
    if modality == "MR":
        img = (img + 1000.0) / 10.0  # positive magnitudes
    arr = np.stack([img + 5 * k for k in range(z)]).astype(np.float32)
    save_nifti(Volume(arr, np.diag([0.8, 0.8, 2.0, 1.0]), modality), path)
    return path


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_help_shows_examples(capsys):
    for argv in (["--help"], ["reconstruct", "--help"], ["batch", "--help"], ["simulate", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        assert "examples:" in capsys.readouterr().out


def test_bundled_sample_fbp(tmp_path, capsys):
    assert main(["reconstruct", "--modality", "ct", "--views", "23", "--method", "fbp", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bundled-ct: fbp on CT parallel beam, 23 views") and "PSNR" in out
    rec = json.loads((tmp_path / "bundled-ct_fbp_23v.json").read_text())
    assert rec["case_id"] == "bundled-ct" and rec["device"] == "cpu"
    assert rec["metrics"]["psnr"] > 20 and rec["seed"] != 0  # derived from run seed + case ID
    assert load_nifti(tmp_path / "bundled-ct_fbp_23v.nii.gz").shape == (1, 256, 256)
    assert (tmp_path / "bundled-ct_fbp_23v.png").read_bytes()[:4] == b"\x89PNG"


def test_fan_beam_angles_and_limited_angle(tmp_path):
    base = ["reconstruct", "--modality", "ct", "--method", "fbp", "--downsample", "2", "--out", str(tmp_path)]
    assert main([*base, "--geometry", "fan", "--views", "60", "--case-id", "fan"]) == 0
    assert main([*base, "--angles", "0,30,60,90,120,150", "--case-id", "ang"]) == 0
    assert main([*base, "--geometry", "fan", "--limited-angle", "200", "--case-id", "fla"]) == 0
    fan = json.loads((tmp_path / "fan_fbp_fan60v.json").read_text())
    assert fan["problem"] == "CT fan beam, 60 views" and fan["shape"] == [1, 128, 128]
    assert json.loads((tmp_path / "ang_fbp_6angles.json").read_text())["problem"].endswith("6 views")
    assert json.loads((tmp_path / "fla_fbp_fanla200.json").read_text())["problem"].endswith("limited angle")
    assert fan["metrics"]["psnr"] > json.loads((tmp_path / "ang_fbp_6angles.json").read_text())["metrics"]["psnr"]


def test_prospective_sinogram_with_reference(tmp_path):
    img = _phantom(tmp_path / "img.nii.gz")
    assert main(["simulate", "ct", str(img), str(tmp_path / "sim"), "--views", "60"]) == 0
    out = tmp_path / "out"
    assert main(["reconstruct", "--modality", "ct", "--input", str(tmp_path / "sim" / "sim.npy"), "--method", "fbp",
                 "--reference", str(tmp_path / "sim" / "sim_truth.nii.gz"), "--out", str(out), "--case-id", "s"]) == 0
    rec = json.loads((out / "s_fbp.json").read_text())
    assert rec["problem"] == "CT measured sinogram, parallel beam, 60 views"
    assert rec["shape"] == [1, 48, 48] and rec["metrics"]["psnr"] > 25


@pytest.mark.parametrize("fmt", ["bart", "fastmri"])
def test_prospective_multicoil_kspace_espirit(tmp_path, fmt):
    img = _phantom(tmp_path / "mr.nii.gz", n=48, modality="MR")
    assert main(["simulate", "mri", str(img), str(tmp_path / "sim"), "--coils", "4", "--acceleration", "2",
                 "--center-fraction", "0.3", "--formats", "native,bart"]) == 0
    src = tmp_path / "sim" / ("sim_ksp.cfl" if fmt == "bart" else "sim.h5")
    out = tmp_path / "out"
    assert main(["reconstruct", "--modality", "mri", "--input", str(src), "--method", "cg", "--iters", "10",
                 "--reference", str(tmp_path / "sim" / "sim_truth.nii.gz"), "--out", str(out), "--case-id", "k"]) == 0
    rec = json.loads((out / "k_cg.json").read_text())
    assert rec["notes"]["coils"] == 4 and rec["notes"]["coil_maps"] == "ESPIRiT"
    assert rec["problem"].startswith("MRI measured multi-coil k-space")
    assert rec["metrics"]["psnr"] > rec["metrics"]["psnr_initial"] - 1 and rec["metrics"]["ssim"] > 0.5


def test_retrospective_mri_single_coil(tmp_path):
    img = _phantom(tmp_path / "mr.nii.gz", n=48, z=2, modality="MR")
    assert main(["reconstruct", "--modality", "mri", "--input", str(img), "--method", "zero-filled",
                 "--acceleration", "2", "--mask", "random", "--out", str(tmp_path / "o"), "--case-id", "m",
                 "--slices", "1"]) == 0
    rec = json.loads((tmp_path / "o" / "m_zero-filled_R2-random.json").read_text())
    assert rec["shape"] == [1, 48, 48] and rec["metrics"]["psnr"] > 15


def test_diffusion_settings_pass_through_and_uncertainty(tmp_path, monkeypatch):
    """A diffusion method plugs in through medrecon.reconstruct: --prior/--samples/--steps arrive as
    settings and a returned std becomes the uncertainty map, its thumbnail and a figure panel."""
    import medrecon.api

    seen = {}
    real = medrecon.api.reconstruct

    def fake(y, A, method="tv", *, seed=0, progress=False, **settings):  # noqa: N803
        if method != "song":
            return real(y, A, method=method, seed=seed)
        seen.update(settings, seed=seed)
        mean = real(y, A, method="fbp").mean
        samples = mean[None] + torch.randn((settings["n_samples"], *mean.shape), generator=torch.Generator().manual_seed(seed))
        return Reconstruction(samples.mean(0), samples.std(0), samples, {"method": method, "wall_time_s": 0.0})

    monkeypatch.setattr(medrecon.api, "reconstruct", fake)
    out = tmp_path / "o"
    argv = ["reconstruct", "--modality", "ct", "--views", "23", "--method", "song", "--prior", "ct-256",
            "--samples", "3", "--steps", "5", "--out", str(out), "--downsample", "2"]
    assert main(argv) == 0
    assert {k: seen[k] for k in ("n_samples", "steps")} == {"n_samples": 3, "steps": 5}
    assert getattr(seen["prior"], "name", seen["prior"]) == "ct-256"  # loaded once, timed, then passed
    assert load_nifti(out / "bundled-ct_song_23v_std.nii.gz").array.mean() > 0
    rec = json.loads((out / "bundled-ct_song_23v.json").read_text())
    assert "coverage_2sigma" in rec["metrics"]
    monkeypatch.setattr(medrecon.api, "reconstruct", real)


def test_bad_input_and_usage_exit_2_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    cases = [
        (["--input", str(bad)], "broken.nii.gz"),
        (["--input", str(tmp_path / "nope.h5")], "no such file"),
        (["--method", "tvv"], "did you mean 'tv'"),
        (["--mode", "prospective"], "prospective mode needs measured data"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--views", "0"], "--"),
    ]
    for extra, text in cases:
        rc = main(["reconstruct", "--modality", "ct", "--out", str(tmp_path / "o"), "--method", "fbp", *extra])
        err = _err_line(capsys)
        assert rc == 2 and text in err, (extra, err)
    h5 = tmp_path / "k.h5"
    h5.write_bytes(b"")
    assert main(["reconstruct", "--modality", "ct", "--input", str(h5), "--out", str(tmp_path / "o")]) == 2
    assert "use --modality mri" in _err_line(capsys)
    with pytest.raises(SystemExit) as exc:  # argparse usage errors are exit 2 too
        main(["reconstruct", "--modality", "pet"])
    assert exc.value.code == 2


def test_evaluate_simulate_info_tune_priors(tmp_path, capsys):
    img = _phantom(tmp_path / "img.nii.gz")
    assert main(["reconstruct", "--modality", "ct", "--input", str(img), "--method", "fbp", "--views", "30",
                 "--out", str(tmp_path / "o"), "--case-id", "e"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "o" / "e_fbp_30v.nii.gz"), "--reference", str(img),
                 "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["psnr"] > 20 and json.loads((tmp_path / "m.json").read_text())["metrics"] == metrics
    other = _phantom(tmp_path / "other.nii.gz", n=32)
    assert main(["evaluate", str(tmp_path / "o" / "e_fbp_30v.nii.gz"), "--reference", str(other)]) == 2
    assert "differs from the reference" in _err_line(capsys)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "device:" in out and "priors:" in out and "methods:" in out
    with pytest.raises(SystemExit):  # tune needs --prior and --input
        main(["tune"])
    assert main(["priors", "list"]) == 0


@pytest.mark.data
def test_real_dicom_series_to_dicom(tmp_path):
    series = DATA / "ct" / "dicom" / "totalseg_example_ct"
    if not series.is_dir():
        pytest.skip(f"validation series not found at {series} (set MEDRECON_DATA)")
    out = tmp_path / "o"
    assert main(["reconstruct", "--modality", "ct", "--input", str(series), "--slices", "9:11", "--downsample", "4",
                 "--views", "60", "--method", "fbp", "--format", "dicom", "--out", str(out)]) == 0
    (record,) = out.glob("case-*_fbp_60v.json")
    rec = json.loads(record.read_text())
    assert rec["shape"] == [2, 128, 128] and rec["metrics"]["psnr"] > 25
    assert "totalseg" not in record.read_text()  # case IDs, not input names
    files = sorted((out / f"{rec['case_id']}_fbp_60v_dicom").iterdir())
    assert len(files) == 2
    from medrecon.datasets import load_dicom_series

    back = load_dicom_series(out / f"{rec['case_id']}_fbp_60v_dicom")
    assert back.shape == (2, 128, 128) and back.modality == "CT"


def test_diffusion_method_end_to_end_tiny_steps(tmp_path):
    """A real diffusion method with the shipped CT prior and 2 steps: uncertainty map and calibration."""
    from medrecon.priors.registry import shipped_registry

    if "ct-256" not in shipped_registry().names():
        pytest.skip("the ct-256 prior is not shipped in this checkout")
    out = tmp_path / "o"
    assert main(["reconstruct", "--modality", "ct", "--views", "23", "--method", "ccdf", "--samples", "2",
                 "--steps", "2", "--downsample", "2", "--out", str(out), "--case-id", "d"]) == 0
    rec = json.loads((out / "d_ccdf_23v.json").read_text())
    assert rec["info"]["nfe"] > 0 and "coverage_2sigma" in rec["metrics"]
    assert load_nifti(out / "d_ccdf_23v_std.nii.gz").array.max() > 0


@pytest.mark.parametrize("method", ["ccdf", "song"])
def test_mri_diffusion_end_to_end_with_the_shipped_prior(tmp_path, method):
    """The shipped brain-MRI prior through the CLI on complex64 k-space (a few steps): finite
    images, a positive uncertainty map, and a data residual at the CG-tolerance level."""
    from medrecon.priors.registry import shipped_registry

    if "mri-256" not in shipped_registry().names():
        pytest.skip("the mri-256 prior is not shipped in this checkout")
    img = _phantom(tmp_path / "mr.nii.gz", n=64, z=1, modality="MR")
    out = tmp_path / "o"
    assert main(["reconstruct", "--modality", "mri", "--input", str(img), "--method", method, "--acceleration", "4",
                 "--samples", "2", "--steps", "4", "--out", str(out), "--case-id", "m"]) == 0
    rec = json.loads((out / f"m_{method}_R4-equispaced.json").read_text())
    assert rec["info"]["nfe"] > 0 and rec["info"]["data_residual"] < 1e-3
    std = load_nifti(out / f"m_{method}_R4-equispaced_std.nii.gz").array
    assert np.isfinite(std).all() and std.max() > 0
    assert np.isfinite(load_nifti(out / f"m_{method}_R4-equispaced.nii.gz").array).all()


def test_mbir3d_volume_from_and_to_nifti_keeps_geometry(tmp_path):
    """A NIfTI volume through `--method mbir3d` (the shipped CT prior, a few steps, a memory
    budget small enough to force chunks): the reconstruction and its uncertainty volume come
    back with the input's shape and affine."""
    from medrecon.priors.registry import shipped_registry

    if "ct-256" not in shipped_registry().names():
        pytest.skip("the ct-256 prior is not shipped in this checkout")
    src = _phantom(tmp_path / "vol.nii.gz", n=48, z=4)
    out = tmp_path / "o"
    assert main(["reconstruct", "--modality", "ct", "--input", str(src), "--views", "8", "--method", "mbir3d",
                 "--samples", "2", "--steps", "10", "--out", str(out), "--case-id", "v"]) == 0
    vin = load_nifti(src)
    rec, std = load_nifti(out / "v_mbir3d_8v.nii.gz"), load_nifti(out / "v_mbir3d_8v_std.nii.gz")
    for vol in (rec, std):
        assert vol.shape == vin.shape
        np.testing.assert_allclose(vol.affine, vin.affine, atol=1e-5)
    assert np.isfinite(rec.array).all() and std.array.max() > 0
    record = json.loads((out / "v_mbir3d_8v.json").read_text())
    assert record["info"]["method"] == "mbir3d" and record["metrics"]["psnr"] > 0


@pytest.mark.parametrize("method", ["dds3d", "mbir3d"])
def test_volume_method_on_a_dicom_series_writes_matching_volume_and_uncertainty(tmp_path, capsys, method):
    """A DICOM series through a volume method (the shipped CT prior, a few steps) with --slices:
    the time estimate comes first on stderr, and one reconstruction series and one uncertainty
    series come back with the selected slices' positions, orientation and spacing."""
    from medrecon.datasets import load_volume, save_dicom_series, subset_volume
    from medrecon.priors.registry import shipped_registry

    if "ct-256" not in shipped_registry().names():
        pytest.skip("the ct-256 prior is not shipped in this checkout")
    n, z = 32, 6
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    body = np.where(xx**2 + yy**2 < (0.4 * n) ** 2, 40.0, -1000.0)
    arr = np.stack([body + (300.0 if 2 <= k <= 3 else 0.0) * (np.abs(xx) < 4) for k in range(z)]).astype(np.float32)
    affine = np.array([[0.0, 0.9, 0, -14.0], [0.9, 0.0, 0, -20.0], [0, 0, 2.5, 31.0], [0, 0, 0, 1]])
    series = tmp_path / "series"
    save_dicom_series(Volume(arr, affine, "CT", {"dicom": {"SeriesNumber": "4"}}), series, method="fixture")
    out = tmp_path / "o"
    assert main(["reconstruct", "--modality", "ct", "--input", str(series), "--views", "8", "--method", method,
                 "--samples", "2", "--steps", "10", "--slices", "1:5", "--format", "dicom", "--out", str(out),
                 "--case-id", "s"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"medrecon reconstruct: {method}: about "), err  # the estimate, before the run
    ref = subset_volume(load_volume(str(series)), slice(1, 5))
    rec = load_volume(str(out / f"s_{method}_8v_dicom"))
    std = load_volume(str(out / f"s_{method}_8v_std_dicom"))
    for vol in (rec, std):
        assert vol.shape == ref.shape == (4, n, n)
        np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-3)
    assert np.isfinite(rec.array).all() and std.array.max() > 0
    record = json.loads((out / f"s_{method}_8v.json").read_text())
    assert record["info"]["settings"]["init"] == "tv3d" and record["time_estimate"]["nfe"] == record["info"]["nfe"]
