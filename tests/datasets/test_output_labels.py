"""What a derived series tells a PACS user: simulated vs measured, which study, modality and window.

Issue 24 items 2 (simulated runs labelled, kept out of the patient's study by default), 3 (one
study per input) and 8 (window, no Modality LUT on MR, NIfTI MRI input written as MR).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medrecon.cli.main import main
from medrecon.datasets import Volume, load_dicom_series, save_dicom_series, save_nifti

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _first(folder: Path):
    import pydicom

    return pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])


def _one(out: Path, pattern: str) -> Path:
    """The one output matching ``pattern`` (file names may carry the settings: c_fbp_8v_dicom)."""
    (found,) = [p for p in out.glob(pattern) if "_std" not in p.name]
    return found


def _reconstruct(inp: Path, out: Path, *extra: str, modality: str = "ct", method: str = "fbp") -> dict:
    args = ["reconstruct", "--modality", modality, "--input", str(inp), "--method", method,
            "--format", "dicom", "--out", str(out), "--case-id", "c", *extra]
    if modality == "ct" and inp.suffix != ".npy":
        args += ["--views", "8"]
    assert main(args) == 0
    return json.loads(_one(out, f"c_{method}*.json").read_text())


def _anonymised_series(make_series, tmp_path: Path) -> Path:
    """A CT series whose files carry no StudyInstanceUID and no FrameOfReferenceUID."""
    import pydicom

    _, folder = make_series(shape=(2, 24, 24), folder=tmp_path / "anon")
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        del ds.StudyInstanceUID, ds.FrameOfReferenceUID
        ds.save_as(f)
    return folder


# ------------------------------------------------------------------ item 2: simulated runs
def test_simulated_run_is_labelled_and_kept_out_of_the_patients_study(make_series, tmp_path):
    _, series = make_series(shape=(2, 24, 24))
    rec = _reconstruct(series, tmp_path / "a")
    ds = _first(_one(tmp_path / "a", "c_fbp*_dicom"))
    assert "SIMULATED" in ds.SeriesDescription and "8 views" in ds.SeriesDescription
    text = str(ds.DerivationDescription)
    assert "SIMULATED" in text and "8 views" in text and "noise 0" in text and "measured data" not in text
    assert "SIMULATED" in str(ds.ImageComments)
    # not the patient's study, but the same patient and frame of reference; no order attributes
    assert ds.StudyInstanceUID != "1.2.3.4.5" and ds.PatientID == "CASE-0001"
    assert ds.FrameOfReferenceUID == "1.2.3.4.6"
    assert ds.AccessionNumber == "" and ds.StudyID == "" and "SIMULATED" in ds.StudyDescription
    assert rec["simulated"] == "8 views, parallel beam, noise 0" and "not the patient's" in rec["study"]
    # a second method on the same input goes into the same (simulated) study
    _reconstruct(series, tmp_path / "b", "--iters", "2", method="cg")
    assert _first(_one(tmp_path / "b", "c_cg*_dicom")).StudyInstanceUID == ds.StudyInstanceUID
    # the explicit opt-in puts it into the input's study, still labelled
    rec = _reconstruct(series, tmp_path / "c", "--into-source-study")
    ds = _first(_one(tmp_path / "c", "c_fbp*_dicom"))
    assert ds.StudyInstanceUID == "1.2.3.4.5" and "SIMULATED" in ds.SeriesDescription
    assert rec["study"].startswith("the input's study")


def test_simulated_mri_and_nifti_outputs_are_labelled(tmp_path):
    vol = Volume(np.abs(np.random.default_rng(0).normal(100, 30, (1, 32, 32))), np.eye(4), "MR")
    save_nifti(vol, tmp_path / "mr.nii.gz")
    assert main(["reconstruct", "--modality", "mri", "--input", str(tmp_path / "mr.nii.gz"), "--method",
                 "zero-filled", "--acceleration", "2", "--noise", "0.01", "--out", str(tmp_path / "o"),
                 "--case-id", "m"]) == 0
    import nibabel as nib

    descrip = nib.load(_one(tmp_path / "o", "m_zero-filled*.nii.gz")).header["descrip"].tobytes().decode()
    assert "SIMULATED R=2 equispaced" in descrip and "noise 0.01" in descrip
    assert json.loads(_one(tmp_path / "o", "m_zero-filled*.json").read_text())["simulated"].startswith("R=2")


def test_measured_data_are_not_labelled_simulated(tmp_path):
    img = tmp_path / "img.nii.gz"
    save_nifti(Volume(np.random.default_rng(1).uniform(-1000, 500, (1, 32, 32)), np.eye(4), "CT"), img)
    assert main(["simulate", "ct", str(img), str(tmp_path / "sim"), "--views", "30"]) == 0
    sino = tmp_path / "sim" / "sim.npy"
    rec = _reconstruct(sino, tmp_path / "a")
    _reconstruct(sino, tmp_path / "b", "--iters", "2", method="cg")
    a, b = _first(_one(tmp_path / "a", "c_fbp*_dicom")), _first(_one(tmp_path / "b", "c_cg*_dicom"))
    assert "SIMULATED" not in a.SeriesDescription and "from measured data" in a.DerivationDescription
    assert rec["simulated"] is None and "derived from the input" in rec["study"]
    # item 3: a measured input without a study: both methods' series share one study and frame
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.FrameOfReferenceUID == b.FrameOfReferenceUID


# ------------------------------------------------------------------ item 3: one study per input
def test_outputs_of_an_input_without_study_share_one_study(make_series, tmp_path):
    folder = _anonymised_series(make_series, tmp_path)
    vol = load_dicom_series(folder)
    assert vol.meta["dicom"]["StudyInstanceUID"] == ""
    std = Volume(np.full(vol.shape, 3.0), vol.affine, vol.modality, vol.meta)
    save_dicom_series(vol, tmp_path / "rec", method="song")
    save_dicom_series(std, tmp_path / "std", method="song", kind="uncertainty")
    save_dicom_series(vol, tmp_path / "other", method="tv")
    uids = {(_first(tmp_path / d).StudyInstanceUID, _first(tmp_path / d).FrameOfReferenceUID)
            for d in ("rec", "std", "other")}
    assert len(uids) == 1
    # and through the CLI: each method's series (simulated: in the input's own simulated study)
    for method, extra in (("fbp", ()), ("cg", ("--iters", "2"))):
        _reconstruct(folder, tmp_path / method, *extra, method=method)
    studies = {_first(_one(tmp_path / m, f"c_{m}*_dicom")).StudyInstanceUID for m in ("fbp", "cg")}
    assert len(studies) == 1
    for method in ("fbp", "cg"):
        _reconstruct(folder, tmp_path / f"{method}-in", "--into-source-study", *(("--iters", "2") if
                     method == "cg" else ()), method=method)
    studies = {_first(_one(tmp_path / f"{m}-in", f"c_{m}*_dicom")).StudyInstanceUID for m in ("fbp", "cg")}
    assert len(studies) == 1


# ------------------------------------------------------------------ item 8: viewer-facing DICOM
def test_window_is_kept_from_the_source_or_computed(make_series, tmp_path, helpers):
    vol = helpers.synthetic_volume(shape=(2, 16, 16))
    vol.meta["dicom"]["window"] = [40.0, 400.0]
    save_dicom_series(vol, tmp_path / "kept", method="fbp")
    ds = _first(tmp_path / "kept")
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 400.0)
    std = Volume(np.abs(vol.array) / 100.0, vol.affine, "CT", vol.meta)
    save_dicom_series(std, tmp_path / "std", method="fbp", kind="uncertainty")
    ds = _first(tmp_path / "std")
    lo, hi = float(ds.WindowCenter) - float(ds.WindowWidth) / 2, float(ds.WindowCenter) + float(ds.WindowWidth) / 2
    assert lo == pytest.approx(0.0, abs=1e-3) and hi == pytest.approx(np.percentile(std.array, 99.5), rel=1e-3)
    del vol.meta["dicom"]["window"]
    save_dicom_series(vol, tmp_path / "computed", method="fbp")
    ds = _first(tmp_path / "computed")
    lo, hi = np.percentile(vol.array, [0.5, 99.5])
    assert float(ds.WindowCenter) == pytest.approx((lo + hi) / 2, rel=1e-4)
    assert float(ds.WindowWidth) == pytest.approx(hi - lo, rel=1e-4)
    # the reader keeps a series' window, so a derived series of a real MR slice has it
    mr = load_dicom_series(helpers.pydicom_file("MR_small.dcm"))
    save_dicom_series(mr, tmp_path / "mr", method="fbp")
    assert float(_first(tmp_path / "mr").WindowCenter) == 600.0


def test_mr_has_no_rescale_and_keeps_its_values(tmp_path, helpers):
    base = helpers.synthetic_volume(shape=(2, 8, 9), modality="MR")
    rec = Volume(base.array / 7.0, base.affine, "MR", base.meta)  # float values
    std = Volume(base.array / 70.0, base.affine, "MR", base.meta)
    save_dicom_series(rec, tmp_path / "rec", method="song", value_scale=10.0)
    save_dicom_series(std, tmp_path / "std", method="song", kind="uncertainty", value_scale=10.0)
    for name, v in (("rec", rec), ("std", std)):
        ds = _first(tmp_path / name)
        assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds and "RescaleType" not in ds
        assert ds.SOPClassUID == MR_STORAGE and "x 10" in str(ds.ImageComments)
        back = load_dicom_series(tmp_path / name)
        assert np.abs(back.array / 10.0 - v.array).max() <= 0.05 + 1e-6
    # integral values fit as they are: no scale, no comment
    save_dicom_series(base, tmp_path / "int", method="song")
    np.testing.assert_array_equal(load_dicom_series(tmp_path / "int").array, base.array)
    assert "ImageComments" not in _first(tmp_path / "int")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (apt-get install dicom3tools)")
def test_mr_passes_dciodvfy_without_rescale_warnings(tmp_path, helpers):
    vol = helpers.synthetic_volume(shape=(2, 8, 9), modality="MR")
    (f, _) = save_dicom_series(Volume(vol.array / 3.0, vol.affine, "MR", vol.meta), tmp_path / "o",
                               method="song")
    out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    assert [ln for ln in lines if ln.startswith("Error")] == []
    assert [ln for ln in lines if "Rescale" in ln] == []


def test_nifti_mri_input_becomes_an_mr_series(tmp_path):
    import nibabel as nib

    arr = np.abs(np.random.default_rng(2).normal(300, 80, (32, 32, 2))).astype(np.float32)  # (X, Y, Z)
    nib.save(nib.Nifti1Image(arr, np.diag([0.9, 0.9, 3.0, 1.0])), tmp_path / "brain.nii.gz")  # no modality
    for fmt in ("dicom", "nifti"):
        assert main(["reconstruct", "--modality", "mri", "--input", str(tmp_path / "brain.nii.gz"), "--method",
                     "zero-filled", "--format", fmt, "--out", str(tmp_path / fmt), "--case-id", "b"]) == 0
    ds = _first(_one(tmp_path / "dicom", "b_zero-filled*_dicom"))
    assert ds.Modality == "MR" and ds.SOPClassUID == MR_STORAGE and "RescaleSlope" not in ds
    assert "WindowCenter" in ds
    header = nib.load(_one(tmp_path / "nifti", "b_zero-filled*.nii.gz")).header["descrip"].tobytes().decode()
    assert "modality=MR" in header
