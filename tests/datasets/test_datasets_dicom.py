"""DICOM reading (grouping, sorting, geometry, HU, transfer syntaxes, enhanced, RT objects) and writing."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import numpy as np
import pytest

from medrecon.datasets import (
    DicomGeometryWarning,
    Volume,
    list_dicom_series,
    load_dicom_series,
    save_dicom_series,
)
from medrecon.datasets.types import LPS_TO_RAS
from medrecon.errors import InputError, SettingsError


def _corner_lps(vol: Volume, k: int, j: int, i: int) -> np.ndarray:
    return (LPS_TO_RAS @ vol.affine @ np.array([i, j, k, 1.0]))[:3]


def test_ct_small_hu_and_affine(helpers):
    import pydicom

    path = helpers.pydicom_file("CT_small.dcm")
    vol = load_dicom_series(path)
    ds = pydicom.dcmread(path)
    assert vol.shape == (1, 128, 128) and vol.modality == "CT"
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.array[0], hu)
    np.testing.assert_allclose(
        _corner_lps(vol, 0, 0, 0), np.array(ds.ImagePositionPatient, float), atol=1e-6
    )
    row, col = (
        np.array(ds.ImageOrientationPatient[:3], float),
        np.array(ds.ImageOrientationPatient[3:], float),
    )
    dr, dc = (float(x) for x in ds.PixelSpacing)
    expect = np.array(ds.ImagePositionPatient, float) + 127 * dc * row + 127 * dr * col
    np.testing.assert_allclose(_corner_lps(vol, 0, 127, 127), expect, atol=1e-6)
    assert "Volume(" in repr(vol) and "CompressedSamples" not in repr(vol)  # no identifiers in repr


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_transfer_syntaxes_decode_identically(helpers, name):
    ref = load_dicom_series(helpers.pydicom_file("MR_small.dcm"))
    vol = load_dicom_series(helpers.pydicom_file(name))
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.affine, ref.affine)


def test_round_trip_preserves_values_geometry_and_identifiers(make_series):
    import pydicom

    vol, folder = make_series(shape=(5, 12, 10))
    back = load_dicom_series(folder)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    ds = pydicom.dcmread(sorted(folder.iterdir())[0])
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "synthetic" in ds.SeriesDescription
    assert ds.PatientID == "CASE-0001" and ds.StudyInstanceUID == "1.2.3.4.5"
    assert ds.FrameOfReferenceUID == "1.2.3.4.6"
    assert back.meta["dicom"]["SeriesInstanceUID"] != "" and int(ds.SeriesNumber) == 1003
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in folder.iterdir()}
    assert len(uids) == 5


def test_float_values_and_uncertainty_series(tmp_path, helpers):
    vol = helpers.synthetic_volume()
    rec = Volume(vol.array / 7.0, vol.affine, "CT", vol.meta)
    std = Volume(np.abs(vol.array) / 300.0, vol.affine, "CT", vol.meta)
    save_dicom_series(rec, tmp_path / "rec", method="song")
    save_dicom_series(std, tmp_path / "std", method="song", kind="uncertainty")
    r, s = load_dicom_series(tmp_path / "rec"), load_dicom_series(tmp_path / "std")
    step = np.ptp(rec.array) / 65534
    assert np.abs(r.array - rec.array).max() <= step
    assert np.abs(s.array - std.array).max() <= np.ptp(std.array) / 65534 + 1e-6
    assert r.meta["dicom"]["SeriesInstanceUID"] != s.meta["dicom"]["SeriesInstanceUID"]
    assert "uncertainty" in s.meta["dicom"]["SeriesDescription"]
    assert s.meta["dicom"]["StudyInstanceUID"] == r.meta["dicom"]["StudyInstanceUID"] == "1.2.3.4.5"


def test_writer_refuses_overwrite_and_leaves_no_temp(make_series, tmp_path):
    vol, folder = make_series()
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(InputError, match="already exists"):
        save_dicom_series(vol, folder, method="x")
    assert sorted(p.name for p in folder.iterdir()) == before
    save_dicom_series(vol, folder, method="again", overwrite=True)
    assert "again" in load_dicom_series(folder).meta["dicom"]["SeriesDescription"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(SettingsError):
        save_dicom_series(vol, tmp_path / "bad", method="x", kind="nonsense")
    assert not (tmp_path / "bad").exists()


def test_several_series_listed_and_picked(make_series, tmp_path):
    _, a = make_series(folder=tmp_path / "mix" / "a", seed=1)
    _, b = make_series(folder=tmp_path / "mix" / "b", seed=2, shape=(3, 12, 10))
    infos = list_dicom_series(tmp_path / "mix")
    assert [i.n_images for i in infos] == [4, 3]
    with pytest.raises(InputError, match="holds 2 series") as err:
        load_dicom_series(tmp_path / "mix")
    assert all(i.series_uid in str(err.value) for i in infos)
    vol = load_dicom_series(tmp_path / "mix", series_uid=infos[1].series_uid)
    assert vol.shape == (3, 12, 10)
    with pytest.raises(InputError, match="no series"):
        load_dicom_series(tmp_path / "mix", series_uid="1.2.3")


def test_rt_objects_and_other_files_are_ignored(make_series, helpers):
    vol, folder = make_series()
    for name in ("rtstruct.dcm", "rtplan.dcm", "rtdose.dcm", "test-SR.dcm"):
        helpers.copy_pydicom_file(name, folder)
    (folder / "notes.txt").write_text("not dicom")
    back = load_dicom_series(folder)
    np.testing.assert_array_equal(back.array, vol.array)


def test_enhanced_multiframe_ct(tmp_path, helpers):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 3000, size=(5, 6, 7))
    z = np.array([12.0, 4.0, 8.0, 0.0, 16.0])  # frames stored out of order
    pos = np.stack([np.full(5, -10.0), np.full(5, 20.0), z], axis=1)
    helpers.write_enhanced_ct(tmp_path / "enh" / "f.dcm", frames, pos)
    vol = load_dicom_series(tmp_path / "enh")
    order = np.argsort(z)
    np.testing.assert_allclose(vol.array, frames[order] * 2.0 - 1024.0)
    assert vol.spacing_mm == pytest.approx((4.0, 0.5, 0.6))
    np.testing.assert_allclose(_corner_lps(vol, 4, 5, 6), [-10 + 6 * 0.6, 20 + 5 * 0.5, 16.0])


def _write_shifted(make_series, tmp_path, shift_fn, name="g"):
    """Series whose slice positions are moved by shift_fn(k) (LPS mm) after writing."""
    import pydicom

    vol, folder = make_series(
        shape=(5, 6, 6), folder=tmp_path / name, affine=np.diag([1.0, 1.0, 2.0, 1.0])
    )
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        k = int(ds.InstanceNumber) - 1
        ds.ImagePositionPatient = [
            float(v) + d for v, d in zip(ds.ImagePositionPatient, shift_fn(k), strict=True)
        ]
        ds.save_as(f)
    return vol, folder


def test_gantry_tilt_reported_and_affine_keeps_shear(make_series, tmp_path):
    vol, folder = _write_shifted(make_series, tmp_path, lambda k: (0.0, 0.5 * k, 0.0))
    with pytest.warns(DicomGeometryWarning, match="gantry tilt"):
        back = load_dicom_series(folder)
    assert back.meta["geometry"]["tilt_deg"] == pytest.approx(
        np.degrees(np.arctan(0.5 / 2.0)), abs=1e-3
    )
    last = np.array(back.meta["dicom"]["slice_positions_lps"][-1])
    np.testing.assert_allclose(_corner_lps(back, 4, 0, 0), last, atol=1e-4)
    with pytest.raises(InputError, match="gantry tilt"):
        load_dicom_series(folder, on_tilt="error")


def test_uneven_spacing_reported(make_series, tmp_path):
    _, folder = _write_shifted(make_series, tmp_path, lambda k: (0.0, 0.0, 3.0 if k >= 3 else 0.0))
    with pytest.warns(DicomGeometryWarning, match="uneven slice spacing"):
        back = load_dicom_series(folder)
    assert back.meta["geometry"]["uneven"] and max(
        back.meta["geometry"]["gaps_mm"]
    ) == pytest.approx(5.0)
    with pytest.raises(InputError, match="uneven"):
        load_dicom_series(folder, on_uneven="error")
    with pytest.raises(SettingsError):
        load_dicom_series(folder, on_uneven="maybe")


def test_duplicates_dropped_or_rejected(make_series, tmp_path):
    import pydicom

    vol, folder = make_series(shape=(3, 6, 6))
    files = sorted(folder.iterdir())
    shutil.copy(files[1], folder / "copy.dcm")  # the same instance twice
    with pytest.warns(DicomGeometryWarning, match="duplicate"):
        assert load_dicom_series(folder).shape == (3, 6, 6)
    ds = pydicom.dcmread(files[1])
    ds.SOPInstanceUID = "1.2.3.999"
    arr = ds.pixel_array.copy()
    arr[0, 0] += 1
    ds.PixelData = arr.tobytes()
    ds.save_as(folder / "copy.dcm")
    with pytest.raises(InputError, match="same position"):
        load_dicom_series(folder)


def test_mixed_orientation_and_too_few_slices(make_series, tmp_path):
    import pydicom

    _, folder = make_series(shape=(3, 6, 6))
    with pytest.raises(InputError, match="at least 4"):
        load_dicom_series(folder, min_slices=4)
    f = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(f)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(f)
    with pytest.raises(InputError, match="2 different orientations"):
        load_dicom_series(folder)


def _dciodvfy_errors(path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    # only the "Error" lines: warnings may quote attribute values
    return [
        line.split(" - ")[1] if " - " in line else line
        for line in (out.stdout + out.stderr).splitlines()
        if line.startswith("Error")
    ]


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy not installed (apt-get install dicom3tools)"
)
@pytest.mark.parametrize(
    "modality,kind",
    [
        ("CT", "reconstruction"),
        ("CT", "uncertainty"),
        ("MR", "reconstruction"),
        ("MR", "uncertainty"),
        ("OT", "reconstruction"),
    ],
)
def test_written_files_pass_dciodvfy(tmp_path, helpers, modality, kind):
    vol = helpers.synthetic_volume(shape=(2, 8, 9), modality=modality)
    arr = vol.array / 3.0 if kind == "uncertainty" else vol.array
    files = save_dicom_series(
        Volume(np.abs(arr) if kind == "uncertainty" else arr, vol.affine, modality, vol.meta),
        tmp_path / "out",
        method="song",
        kind=kind,
    )
    for f in files:
        assert _dciodvfy_errors(f) == [], f.name


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy not installed (apt-get install dicom3tools)"
)
def test_derived_from_real_ct_slice_passes_dciodvfy(tmp_path, helpers):
    vol = load_dicom_series(helpers.pydicom_file("CT_small.dcm"))
    (f,) = save_dicom_series(vol, tmp_path / "d", method="fbp")
    assert _dciodvfy_errors(f) == []


def test_single_slice_without_geometry(tmp_path, helpers):
    import pydicom

    src = helpers.pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(src)
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.save_as(tmp_path / "one.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vol = load_dicom_series(tmp_path / "one.dcm")
    assert vol.shape == (1, 128, 128) and vol.meta["geometry"]["missing_geometry"]


@pytest.mark.parametrize(
    "name,shape",
    [
        ("image_dfl.dcm", (1, 512, 512)),  # deflated explicit VR little endian
        ("693_J2KI.dcm", (1, 512, 512)),  # JPEG 2000 (lossy allowed), CT
        ("JPGExtended.dcm", (1, 1024, 256)),  # JPEG extended (process 2 and 4)
        ("JPEGLSNearLossless_16.dcm", (1, 50, 10)),  # JPEG-LS near-lossless
    ],
)
def test_more_transfer_syntaxes_decode(helpers, name, shape):
    vol = load_dicom_series(helpers.pydicom_file(name))
    assert vol.shape == shape and np.all(np.isfinite(vol.array)) and vol.array.std() > 0


def test_undecodable_pixel_data_names_the_file(helpers):
    path = helpers.pydicom_file("JPEG-lossy.dcm")  # pylibjpeg cannot decode this one
    try:
        load_dicom_series(path)
    except InputError as err:
        assert path.name in str(err) and "decode" in str(err)


# ------------------------------------------------------------------ issue 31 item 5: duplicate instances
def _copy_series(src, dst):
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        shutil.copy(f, dst / f.name)
    return sorted(dst.iterdir())


def _cut_before(path, tag: bytes) -> None:
    """Truncate a file just before the first occurrence of ``tag`` (a header cut short)."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(tag, 132)])


def test_a_truncated_copy_of_an_instance_is_dropped_and_the_intact_copy_read(make_series, tmp_path):
    """Two copies of one series (same SeriesInstanceUID and SOPInstanceUIDs); in the second copy
    one file is cut short in its pixel data and one in its header.  The intact copies are read,
    the broken ones are named in a warning and dropped."""
    vol, first = make_series(shape=(3, 8, 8), folder=tmp_path / "root" / "a")
    files = _copy_series(first, tmp_path / "root" / "b")
    files[1].write_bytes(files[1].read_bytes()[:-40])  # pixel data cut short
    _cut_before(files[2], b"\x28\x00\x10\x00")  # header cut before Rows: UIDs readable, no image size
    (info,) = list_dicom_series(tmp_path / "root")
    assert info.n_images == 3 and info.n_files == 6  # instances, not files
    with pytest.warns(DicomGeometryWarning) as caught:
        back = load_dicom_series(tmp_path / "root")
    np.testing.assert_allclose(back.array, vol.array, atol=0.5)
    text = " ".join(str(w.message) for w in caught)
    assert files[1].name in text and files[2].name in text and "intact copy" in text, text
    assert "b/" in text  # which copy: the folder is named
    assert len(back.meta["dicom"]["sop_instance_uids"]) == 3


def test_every_copy_broken_or_a_single_broken_file_still_fails(make_series, tmp_path):
    _, first = make_series(shape=(3, 8, 8), folder=tmp_path / "root" / "a")
    files = _copy_series(first, tmp_path / "root" / "b")
    orig = sorted(first.iterdir())
    for f in (orig[1], files[1]):
        f.write_bytes(f.read_bytes()[:-40 if f is orig[1] else -60])
    with pytest.raises(InputError, match="PixelData holds") as info:
        load_dicom_series(tmp_path / "root")
    assert "every copy" in str(info.value)
    _, alone = make_series(shape=(3, 8, 8), folder=tmp_path / "alone")
    one = sorted(alone.iterdir())[1]
    one.write_bytes(one.read_bytes()[:-40])
    with pytest.raises(InputError, match="PixelData holds") as info:
        load_dicom_series(alone)
    assert one.name in str(info.value)
