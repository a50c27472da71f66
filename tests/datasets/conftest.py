"""Fixtures for the medrecon.datasets tests: small synthetic DICOM series and the real-data root."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from medrecon.datasets import Volume, save_dicom_series

REPO = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """``MEDRECON_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("MEDRECON_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    root = data_root()
    if not (root / "README.md").is_file():
        pytest.skip(f"real data not found at {root} (set MEDRECON_DATA)")
    return root


def oblique_affine(spacing=(0.7, 0.8, 2.5), angle=0.3, origin=(-40.0, 25.0, 10.0)) -> np.ndarray:
    """RAS affine with in-plane rotation about z and anisotropic voxels (x, y, z spacing)."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def synthetic_volume(shape=(4, 12, 10), modality="CT", seed=0, affine=None) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1000, 1500, size=shape).astype(np.float32)
    if modality != "CT":
        arr = np.abs(arr)
    meta = {
        "dicom": {
            "PatientID": "CASE-0001",
            "PatientName": "Test^Synthetic",
            "StudyInstanceUID": "1.2.3.4.5",
            "StudyID": "S1",
            "FrameOfReferenceUID": "1.2.3.4.6",
            "PatientPosition": "HFS",
            "SeriesNumber": "3",
        }
    }
    return Volume(arr, oblique_affine() if affine is None else affine, modality, meta)


@pytest.fixture
def make_series(tmp_path: Path) -> Callable[..., tuple[Volume, Path]]:
    """Write a synthetic series with medrecon's writer; returns (volume, folder)."""
    counter = iter(range(10_000))

    def _make(
        shape=(4, 12, 10), modality="CT", seed=0, affine=None, folder=None
    ) -> tuple[Volume, Path]:
        vol = synthetic_volume(shape, modality, seed, affine)
        out = Path(folder) if folder is not None else tmp_path / f"series{next(counter)}"
        save_dicom_series(vol, out, method="synthetic")
        return vol, out

    return _make


def pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(path)


def copy_pydicom_file(name: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(pydicom_file(name), folder / name))


def write_enhanced_ct(
    path: Path,
    frames: np.ndarray,
    positions_lps: np.ndarray,
    spacing=(0.5, 0.6),
    slope=2.0,
    intercept=-1024.0,
) -> None:
    """Enhanced CT Image Storage file: frames (F, R, C) stored values, one position per frame."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "CT", "CASE-ENH", generate_uid()
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    f, r, c = frames.shape
    ds.NumberOfFrames, ds.Rows, ds.Columns = f, r, c
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    pm, po, pv = Dataset(), Dataset(), Dataset()
    pm.PixelSpacing, pm.SliceThickness = list(spacing), 1.5
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = slope, intercept, "HU"
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [pm], [po]
    shared.PixelValueTransformationSequence = [pv]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for k in range(f):
        item, pp = Dataset(), Dataset()
        pp.ImagePositionPatient = [float(v) for v in positions_lps[k]]
        item.PlanePositionSequence = [pp]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = np.ascontiguousarray(frames.astype(np.uint16)).tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def helpers():
    """The plain helper functions of this conftest, for tests that need them directly."""
    import types

    return types.SimpleNamespace(
        oblique_affine=oblique_affine,
        synthetic_volume=synthetic_volume,
        pydicom_file=pydicom_file,
        copy_pydicom_file=copy_pydicom_file,
        write_enhanced_ct=write_enhanced_ct,
        data_root=data_root,
    )
