"""Slice subsets of unevenly spaced series keep their exact positions (DICOM and NIfTI output).

Every unevenly spaced DICOM series in MEDRECON_DATA is found by reading the data (not from a
list), and its expected slice positions are read with pydicom straight from the files, so the
checks do not lean on the reader under test.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from medrecon.datasets import (
    GeometryWarning,
    Volume,
    list_dicom_series,
    load_dicom_series,
    load_nifti,
    save_dicom_series,
    save_nifti,
    subset_volume,
)
from medrecon.datasets.types import LPS_TO_RAS
from medrecon.errors import InputError


def data_root() -> Path:
    """``MEDRECON_DATA`` or ``<repo>/../shared/data`` (as the datasets conftest)."""
    return Path(os.environ.get("MEDRECON_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))

_NOT_DICOM = (".npz", ".npy", ".md", ".json", ".nii", ".nii.gz", ".mat", ".cfl", ".hdr", ".txt", ".csv")


def _series_positions(folder: Path, series_uid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct ImagePositionPatient of a series, sorted along the slice normal, read with pydicom;
    with the row/column directions (scaled by the pixel spacing) for in-plane shifts."""
    import pydicom

    pos, ori, spacing = [], None, None
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        if ds.get("SeriesInstanceUID") != series_uid or "ImagePositionPatient" not in ds:
            continue
        pos.append([float(v) for v in ds.ImagePositionPatient])
        ori = np.array([float(v) for v in ds.ImageOrientationPatient])
        spacing = [float(v) for v in ds.PixelSpacing]
    p = np.array(pos)
    normal = np.cross(ori[:3], ori[3:])
    p = p[np.argsort(p @ normal, kind="stable")]
    keep = [0] + [k for k in range(1, len(p)) if np.linalg.norm(p[k] - p[k - 1]) > 1e-3]
    return p[keep], ori[:3] * spacing[1], ori[3:] * spacing[0]


def _uneven_series() -> list[tuple[str, Path, str]]:
    root = data_root()
    if not (root / "README.md").is_file():
        return []
    found = []
    folders = sorted({p.parent for p in root.rglob("*") if p.is_file() and not p.name.endswith(_NOT_DICOM)})
    for folder in folders:
        try:
            infos = list_dicom_series(folder, recursive=False)
        except InputError:
            continue
        for info in infos:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    vol = load_dicom_series(folder, series_uid=info.series_uid, recursive=False,
                                            on_tilt="ignore", on_uneven="ignore")
            except InputError:  # not one volume (mixed orientations, conflicting slices, ...)
                continue
            if vol.meta["geometry"]["uneven"]:
                found.append((str(folder.relative_to(root)), folder, info.series_uid))
    return found


@pytest.fixture(scope="module")
def uneven_series() -> list[tuple[str, Path, str]]:
    found = _uneven_series()
    if not found:
        pytest.skip(f"no real data at {data_root()} (set MEDRECON_DATA)")
    return found


def _load(folder: Path, uid: str) -> Volume:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_dicom_series(folder, series_uid=uid, recursive=False)


def _written_positions(folder: Path) -> np.ndarray:
    import pydicom

    files = sorted(folder.glob("*.dcm"))
    return np.array([[float(v) for v in pydicom.dcmread(f).ImagePositionPatient] for f in files])


def test_the_uneven_series_are_found(uneven_series):
    names = {name for name, _, _ in uneven_series}
    assert "dicom_cases/dcmqa_GE" in names  # the case; the others are whatever the data holds
    assert len(names) >= 2


def test_every_subset_of_every_uneven_series_is_written_at_its_exact_positions(uneven_series, tmp_path):
    for name, folder, uid in uneven_series:
        exact, col, row = _series_positions(folder, uid)
        vol = _load(folder, uid)
        assert vol.shape[0] == len(exact), name
        n, f = vol.shape[0], 4
        windows = [slice(a, a + w) for w in (1, 2, 3) for a in range(n - w + 1)] + [slice(None, None, 2)]
        for k, s in enumerate(windows):
            sub = subset_volume(vol, s, downsample=f)
            out = tmp_path / f"{name.replace('/', '_')}_{k}"
            save_dicom_series(sub, out, method="fbp")
            want = exact[s] + (f - 1) / 2 * (col + row)
            np.testing.assert_allclose(_written_positions(out), want, atol=2e-3, err_msg=f"{name} {s}")
            # the affine places the subset's own first and last slice exactly
            ends = (LPS_TO_RAS @ sub.affine @ np.array([[0, 0, 0, 1], [0, 0, len(want) - 1, 1]]).T)[:3].T
            np.testing.assert_allclose(ends, want[[0, -1]], atol=2e-3, err_msg=f"{name} {s}")


def test_nifti_of_an_uneven_subset_warns_and_keeps_the_exact_positions(uneven_series, tmp_path):
    for name, folder, uid in uneven_series:
        exact, col, row = _series_positions(folder, uid)
        exact = exact + 3.5 * (col + row)  # downsample 8 moves the first voxel to the block centre
        vol = _load(folder, uid)
        n = vol.shape[0]
        for a in range(n - 1):
            for w in (2, 3):
                if a + w > n:
                    continue
                sub = subset_volume(vol, slice(a, a + w), downsample=8)
                gaps = np.linalg.norm(np.diff(exact[a : a + w], axis=0), axis=1)
                even = w == 2 or abs(gaps[1] - gaps[0]) / 2 <= 0.01  # the middle slice's offset
                path = tmp_path / f"{name.replace('/', '_')}_{a}_{w}.nii.gz"
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    save_nifti(sub, path)
                geo = [str(c.message) for c in caught if issubclass(c.category, GeometryWarning)]
                if even:
                    assert geo == [], (name, a, w)
                else:
                    assert len(geo) == 1 and str(path) in geo[0], (name, a, w, geo)
                    assert f"{gaps.min():.3f}-{gaps.max():.3f} mm" in geo[0]
                back = load_nifti(path)
                first_last = (back.affine @ np.array([[0, 0, 0, 1], [0, 0, w - 1, 1]]).T)[:3].T
                np.testing.assert_allclose(first_last, (exact[[a, a + w - 1]] * [-1, -1, 1]), atol=2e-3)
                if not even:  # the header extension holds every slice's exact position
                    np.testing.assert_allclose(back.meta["dicom"]["slice_positions_lps"],
                                               exact[a : a + w], atol=2e-3)


def test_subset_keeps_the_meta_that_belongs_to_its_slices(uneven_series):
    name, folder, uid = uneven_series[0]
    vol = _load(folder, uid)
    sub = subset_volume(vol, slice(1, 3))
    assert sub.meta["dicom"]["sop_instance_uids"] == vol.meta["dicom"]["sop_instance_uids"][1:3]
    assert len(sub.meta["geometry"]["gaps_mm"]) == 1
    assert vol.meta["dicom"]["slice_positions_lps"] == _load(folder, uid).meta["dicom"]["slice_positions_lps"]


def test_cli_slices_of_an_uneven_series_are_written_at_their_exact_positions(uneven_series, tmp_path, capsys):
    """The issue's repro for dcmqa_GE, then every uneven series through the same CLI path."""
    from medrecon.cli.main import main

    ge = next((f, u) for n, f, u in uneven_series if n == "dicom_cases/dcmqa_GE")
    out = tmp_path / "o"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["reconstruct", "--modality", "ct", "--input", str(ge[0]), "--views", "60", "--method",
                     "fbp", "--slices", "12:14", "--format", "dicom", "--out", str(out)]) == 0
    (series,) = out.glob("*_dicom")
    np.testing.assert_allclose(_written_positions(series)[:, 2], [56.476, 60.696], atol=1e-3)
    for k, (name, folder, uid) in enumerate(uneven_series):
        exact, col, row = _series_positions(folder, uid)
        gaps = np.diff(exact @ np.cross(col, row) / np.linalg.norm(np.cross(col, row)))
        a = int(np.argmax(np.abs(np.diff(gaps))))  # the window of three slices with the most uneven gaps
        for fmt in ("dicom", "nifti"):
            out = tmp_path / f"u{k}{fmt}"
            capsys.readouterr()
            with warnings.catch_warnings(record=True) as caught:  # the CLI may print them itself
                warnings.simplefilter("always")
                assert main(["reconstruct", "--modality", "ct", "--input", str(folder), "--views", "8",
                             "--method", "fbp", "--slices", f"{a}:{a + 3}", "--downsample", "8",
                             "--format", fmt, "--out", str(out), "--case-id", "u"]) == 0
            if fmt == "dicom":
                (series,) = [p for p in out.glob("u_fbp*_dicom") if "_std" not in p.name]
                np.testing.assert_allclose(_written_positions(series),
                                           exact[a : a + 3] + 3.5 * (col + row), atol=2e-3, err_msg=name)
            else:
                (image,) = [p for p in out.glob("u_fbp*.nii.gz") if "_std" not in p.name]
                said = [str(c.message) for c in caught] + capsys.readouterr().err.splitlines()
                assert any(str(image) in m and "unevenly spaced slices" in m for m in said), name
                ext = load_nifti(image).meta["dicom"]["slice_positions_lps"]
                np.testing.assert_allclose(ext, exact[a : a + 3] + 3.5 * (col + row), atol=2e-3)
                (record,) = out.glob("u_fbp*.json")
                assert json.loads(record.read_text())["simulated"]
