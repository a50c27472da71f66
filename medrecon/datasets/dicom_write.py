r"""Write a Volume as a derived DICOM series (CT, MR or Secondary Capture image storage).

The series is new (fresh Series and SOP Instance UIDs, ImageType ``DERIVED\\SECONDARY``, a
SeriesDescription naming the method) but belongs to the input's patient, study and frame of
reference when ``volume.meta["dicom"]`` holds them (as :func:`load_dicom_series` leaves it), so
it lands beside the original in a viewer or PACS.  Geometry comes from the affine (RAS+ → LPS);
when the meta's per-slice positions agree with the affine at both ends (uneven spacing on read)
those exact positions are written instead.  The uncertainty map is written as its own series
with ``kind="uncertainty"``.  Files are written into a temporary folder which is renamed onto the
target at the end (see :mod:`medrecon.datasets._atomic`).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medrecon.datasets._atomic import atomic_dir
from medrecon.datasets.dicom import PATIENT_STUDY_TAGS
from medrecon.datasets.types import LPS_TO_RAS, Volume
from medrecon.errors import SettingsError, ShapeError

__all__ = ["save_dicom_series"]

_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "OT": "1.2.840.10008.5.1.4.1.1.7",
}


def _encode(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Encode as int16 stored values with ``value = stored * slope + intercept``."""
    lo, hi = float(array.min()), float(array.max())
    rounded = np.round(array)
    if np.allclose(array, rounded, atol=1e-3) and lo >= -32768 and hi <= 32767:
        return rounded.astype(np.int16), 1.0, 0.0
    intercept = 0.5 * (hi + lo)
    slope = (hi - lo) / 65534.0 if hi > lo else 1.0
    slope = float(f"{slope:.10g}")  # DS holds at most 16 characters
    intercept = float(f"{intercept:.10g}")
    stored = np.clip(np.round((array - intercept) / slope), -32767, 32767)
    return stored.astype(np.int16), slope, intercept


def _ds_str(x: float) -> str:
    s = f"{x:.10g}"
    return s if len(s) <= 16 else f"{x:.8g}"


def _positions(volume: Volume) -> tuple[np.ndarray, np.ndarray, tuple[float, float], float]:
    aff = LPS_TO_RAS @ volume.affine  # back to LPS
    cols = aff[:3, :3]
    dx, dy = np.linalg.norm(cols[:, 0]), np.linalg.norm(cols[:, 1])
    orientation = np.concatenate([cols[:, 0] / dx, cols[:, 1] / dy])
    if abs(orientation[:3] @ orientation[3:]) > 1e-3:
        raise ShapeError(
            "save_dicom_series(): affine's in-plane axes are not orthogonal; DICOM cannot store it"
        )
    nz = volume.shape[0]
    pos = aff[:3, 3] + np.outer(np.arange(nz), cols[:, 2])
    recorded = volume.meta.get("dicom", {}).get("slice_positions_lps")
    if recorded is not None and len(recorded) == nz:
        rec = np.asarray(recorded, dtype=np.float64)
        if np.allclose(rec[[0, -1]], pos[[0, -1]], atol=1e-2):
            pos = rec
    thickness = volume.meta.get("dicom", {}).get("slice_thickness_mm") or float(
        np.linalg.norm(cols[:, 2])
    )
    return pos, orientation, (float(dy), float(dx)), float(thickness)


def save_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    method: str,
    kind: Literal["reconstruction", "uncertainty"] = "reconstruction",
    series_number: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``volume`` as a derived DICOM series, one file per slice, into ``folder``.

    Parameters
    ----------
    volume : Volume
        Image (Z, Y, X); CT in HU.  ``meta["dicom"]`` (from :func:`load_dicom_series`) supplies the
        patient, study and frame of reference; without it new study identifiers are made.
    folder : str or Path
        Output folder; must not exist unless ``overwrite`` is True.
    method : str
        Reconstruction method, used in SeriesDescription (e.g. ``"song"``, ``"fbp"``).
    kind : {"reconstruction", "uncertainty"}
        ``"uncertainty"`` marks the series as the pixel-wise posterior standard deviation.
    series_number : int, optional
        Default: the input's SeriesNumber + 1000 (+ 1 for uncertainty), else 1000 / 1001.
    overwrite : bool
        Replace an existing folder.

    Returns
    -------
    list of Path
        The written files, in slice order.

    Raises
    ------
    InputError
        ``folder`` exists and ``overwrite`` is False.
    ShapeError, SettingsError
        Non-finite values, a non-orthogonal affine, an unknown ``kind`` or empty ``method``.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    if kind not in ("reconstruction", "uncertainty"):
        raise SettingsError(
            f"save_dicom_series(): kind must be 'reconstruction' or 'uncertainty'; got {kind!r}"
        )
    if not str(method).strip():
        raise SettingsError("save_dicom_series(): method must name the reconstruction method")
    arr = np.asarray(volume.array, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ShapeError("save_dicom_series(): volume holds NaN or Inf values")
    src: dict[str, Any] = dict(volume.meta.get("dicom", {}))
    modality = volume.modality if volume.modality in ("CT", "MR") else "OT"
    sop_class = _SOP_CLASS[modality]
    stored, slope, intercept = _encode(arr)
    pos, orientation, spacing, thickness = _positions(volume)
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    try:
        base_number = int(src.get("SeriesNumber") or 0)
    except ValueError:
        base_number = 0
    number = (
        series_number if series_number is not None else base_number + 1000 + (kind == "uncertainty")
    )
    description = f"medrecon {method} {'uncertainty (posterior std)' if kind == 'uncertainty' else 'reconstruction'}"
    series_uid, frame_uid = generate_uid(), src.get("FrameOfReferenceUID") or generate_uid()
    study_uid = src.get("StudyInstanceUID") or generate_uid()
    image_type = ["DERIVED", "SECONDARY"] + {"CT": ["AXIAL"], "MR": ["OTHER"]}.get(modality, [])
    files = []
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        for k in range(arr.shape[0]):
            sop_uid = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            name = f"{k + 1:05d}.dcm"
            ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.ImageType = image_type
            ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
            for tag in PATIENT_STUDY_TAGS:
                setattr(ds, tag, src.get(tag, ""))
            ds.StudyInstanceUID = study_uid
            ds.StudyDate, ds.StudyTime = src.get("StudyDate") or date, src.get("StudyTime") or time
            ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime = date, time, date, time
            ds.Modality = modality
            ds.Manufacturer = "medrecon"
            ds.ManufacturerModelName = "medrecon"
            ds.SoftwareVersions = _software_version()
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = (
                series_uid,
                number,
                description,
            )
            ds.DerivationDescription = f"{description} from measured data"[:1024]
            ds.InstanceNumber = k + 1
            ds.PatientPosition = src.get("PatientPosition", "") if modality != "OT" else None
            if ds.PatientPosition is None:
                del ds.PatientPosition
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = (
                frame_uid,
                src.get("PositionReferenceIndicator", ""),
            )
            ds.ImagePositionPatient = [_ds_str(v) for v in pos[k]]
            ds.ImageOrientationPatient = [_ds_str(v) for v in orientation]
            ds.PixelSpacing = [_ds_str(v) for v in spacing]
            ds.SliceThickness = _ds_str(thickness)
            ds.SliceLocation = _ds_str(float(pos[k] @ np.cross(orientation[:3], orientation[3:])))
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope = _ds_str(intercept), _ds_str(slope)
            ds.Laterality = ""
            if modality != "MR":
                ds.RescaleType = "HU" if modality == "CT" else "US"
            _modality_fields(ds, modality, src)
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            ds["PixelData"].VR = "OW"
            pydicom.dcmwrite(tmp / name, ds, enforce_file_format=True)
            files.append(Path(folder) / name)
    return files


def _software_version() -> str:
    from medrecon import __version__

    return f"medrecon {__version__}"


def _modality_fields(ds: Any, modality: str, src: dict[str, Any]) -> None:
    if modality == "CT":
        ds.KVP = src.get("KVP", "")
        ds.AcquisitionNumber = ""
    elif modality == "MR":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
        ds.MRAcquisitionType, ds.EchoTime, ds.EchoTrainLength, ds.RepetitionTime = "2D", "", "", ""
    else:
        ds.ConversionType, ds.PatientOrientation = "WSD", ""
