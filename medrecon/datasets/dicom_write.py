r"""Write a Volume as a derived DICOM series (CT, MR or Secondary Capture image storage).

The series is new (fresh Series and SOP Instance UIDs, ImageType ``DERIVED\\SECONDARY``, a
SeriesDescription naming the method) and keeps the input's patient and frame of reference when
``volume.meta["dicom"]`` holds them (as :func:`load_dicom_series` leaves it).

Which study (:func:`output_study_uid`):

* a reconstruction of *measured* data goes into the input's study, so it lands beside the
  original in a viewer or PACS;
* a reconstruction of a *simulated* measurement (``simulated=...``: a retrospective run) is
  labelled ``SIMULATED`` with its settings and by default goes into a study of its own (same
  patient, new StudyInstanceUID, no accession number), so it is never mistaken for part of the
  patient's examination; ``source_study=True`` puts it into the input's study all the same;
* an input without a StudyInstanceUID gets one study UID derived from its identity, so every
  series written from one input (each method, the uncertainty series) shares one study.

Geometry: every slice is written at its exact position -- the meta's per-slice positions when
they belong to this volume (unevenly spaced series, subsets of them; see
:mod:`medrecon.datasets.slices`), else the affine's (RAS+ → LPS).  Viewers get a WindowCenter /
WindowWidth (the source's, else a computed one); CT and Secondary Capture store values through
RescaleSlope / Intercept, MR (which has no Modality LUT) stores them directly.  The uncertainty
map is written as its own series with ``kind="uncertainty"``.  Files are written into a temporary
folder which is renamed onto the target at the end (see :mod:`medrecon.datasets._atomic`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medrecon.datasets._atomic import atomic_dir
from medrecon.datasets.dicom import PATIENT_STUDY_TAGS
from medrecon.datasets.slices import slice_positions_lps
from medrecon.datasets.types import LPS_TO_RAS, Volume
from medrecon.errors import SettingsError, ShapeError

__all__ = ["save_dicom_series", "output_study_uid", "mr_value_scale", "fit_lo"]

#: Namespace of the UIDs derived here (bump only if their meaning changes).
_UID_VERSION = "medrecon-output-v1"
#: Study attributes that belong to the source study's order, not to a study of simulated results.
_ORDER_TAGS = ("StudyID", "AccessionNumber", "ReferringPhysicianName")

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


def mr_value_scale(array: np.ndarray) -> float:
    """Power of ten that brings MR values (arbitrary units) to integers within int16 (1 if they are)."""
    peak = float(np.max(np.abs(array)))
    if peak == 0.0 or (np.allclose(array, np.round(array), atol=1e-3) and peak <= 32767):
        return 1.0
    return float(10.0 ** np.floor(np.log10(32767.0 / peak)))


def _encode_mr(array: np.ndarray, value_scale: float | None) -> tuple[np.ndarray, float]:
    """MR stores values without a Modality LUT: ``stored = round(value × scale)``, int16."""
    scale = mr_value_scale(array) if value_scale is None else float(value_scale)
    if not np.isfinite(scale) or scale <= 0:
        raise SettingsError(f"save_dicom_series(): value_scale must be > 0; got {value_scale!r}")
    if float(np.max(np.abs(array))) * scale > 32767.5:  # the given scale would overflow
        scale = mr_value_scale(array)
    return np.clip(np.round(array * scale), -32768, 32767).astype(np.int16), scale


def _window(array: np.ndarray, src: dict[str, Any], kind: str) -> tuple[float, float, str]:
    """VOI window (centre, width, explanation) in the values' units: the source's, else computed."""
    given = src.get("window")
    if kind == "reconstruction" and given is not None and len(given) == 2 and given[1] > 0:
        return float(given[0]), float(given[1]), "source series window"
    if kind == "uncertainty":
        lo, hi = 0.0, float(np.percentile(array, 99.5))
    else:
        lo, hi = (float(v) for v in np.percentile(array, [0.5, 99.5]))
    if not hi > lo:
        lo, hi = float(array.min()), float(array.max())
    if not hi > lo:
        hi = lo + 1.0
    return 0.5 * (lo + hi), hi - lo, "computed 0.5-99.5 percentile"


def fit_lo(text: str, limit: int = 64) -> str:
    """``text`` cut to a LO element's 64 characters, at the last ", " that fits when cut."""
    if len(text) <= limit:
        return text
    at = text[: limit + 1].rfind(", ")
    return text[:at] if at > 0 else text[:limit]


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
    pos, _ = slice_positions_lps(volume)  # exact per-slice positions when the meta has them
    thickness = volume.meta.get("dicom", {}).get("slice_thickness_mm") or float(
        np.linalg.norm(cols[:, 2])
    )
    return pos, orientation, (float(dy), float(dx)), float(thickness)


def _source_key(volume: Volume) -> str | None:
    """What identifies the input a volume came from (its study, series, instances or file)."""
    src = volume.meta.get("dicom", {})
    for tag in ("StudyInstanceUID", "SeriesInstanceUID"):
        if str(src.get(tag) or "").strip():
            return f"{tag}={src[tag]}"
    sops = [str(u) for u in src.get("sop_instance_uids") or [] if str(u or "").strip()]
    if sops:
        return "sop=" + hashlib.sha256("\\".join(sorted(sops)).encode()).hexdigest()
    if volume.meta.get("source"):
        return "path=" + str(Path(str(volume.meta["source"])).resolve())
    return None


def output_study_uid(volume: Volume, *, simulated: bool, source_study: bool | None = None) -> str:
    """The StudyInstanceUID a derived series of ``volume`` goes into.

    Parameters
    ----------
    volume : Volume
        The written volume; its ``meta`` identifies the input.
    simulated : bool
        True when the measurement was simulated from the input images (a retrospective run).
    source_study : bool, optional
        Put the series into the input's own study.  Default: yes for measured data, no for
        simulated data.

    Returns
    -------
    str
        The input's StudyInstanceUID (measured data, or ``source_study=True``), else a UID
        derived from the input's identity: one study per input, so every series written from it
        (each method, the uncertainty maps) lands in the same study, and simulated results in a
        study of their own beside the patient's.  A volume with nothing that identifies its input
        gets a fresh UID.
    """
    from pydicom.uid import generate_uid

    into_source = (not simulated) if source_study is None else bool(source_study)
    src = volume.meta.get("dicom", {})
    key = _source_key(volume)
    if into_source and str(src.get("StudyInstanceUID") or "").strip():
        return str(src["StudyInstanceUID"])
    if key is None:
        return str(generate_uid())
    what = "study" if into_source else "separate-study"
    return str(generate_uid(entropy_srcs=[_UID_VERSION, what, key]))


def save_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    method: str,
    kind: Literal["reconstruction", "uncertainty"] = "reconstruction",
    series_number: int | None = None,
    overwrite: bool = False,
    simulated: str | None = None,
    source_study: bool | None = None,
    value_scale: float | None = None,
    cautions: tuple[str, ...] | list[str] = (),
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
    simulated : str, optional
        The volume was reconstructed from a measurement *simulated* from images (a retrospective
        run); this text names the settings (e.g. ``"parallel beam, 60 views, noise 0"``).  The
        series is then labelled ``SIMULATED`` with these settings in SeriesDescription,
        DerivationDescription and ImageComments, so nobody takes it for an acquisition.
    source_study : bool, optional
        Put the series into the input's study.  Default: yes for measured data, no for
        simulated data, which go into a study of their own (see :func:`output_study_uid`).
    value_scale : float, optional
        MR only: stored value = round(value × ``value_scale``) (MR images carry no
        RescaleSlope / Intercept).  Default: a power of ten chosen from the data; pass the
        reconstruction's scale for its uncertainty series so the two compare.  Any scale other
        than 1 is stated in ImageComments.
    cautions : sequence of str
        Lines a reader must see (the input is outside the prior's domain; the uncertainty is
        sampling spread, not error), put first in ImageComments as ``CAUTION: …``.

    Returns
    -------
    list of Path
        The written files, in slice order.  Slices are placed at the exact per-slice positions
        of ``meta["dicom"]["slice_positions_lps"]`` when they belong to this volume (see
        :func:`medrecon.datasets.slices.slice_positions_lps`), else by the affine.

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
    if modality == "MR":
        stored, mr_scale = _encode_mr(arr, value_scale)
        slope, intercept = 1.0, 0.0
    else:
        (stored, slope, intercept), mr_scale = _encode(arr), 1.0
    center, width, why = _window(arr, src, kind)
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
    what = "uncertainty (posterior std)" if kind == "uncertainty" else "reconstruction"
    description = f"medrecon {method} {what}"
    derivation = f"{description} from measured data"
    comments = [f"CAUTION: {c}" for c in cautions]
    if simulated is not None:
        short = "uncertainty" if kind == "uncertainty" else "recon"
        description = fit_lo(f"medrecon {method} {short} SIMULATED {simulated}")
        derivation = (
            f"medrecon {method} {what} from SIMULATED measurements: undersampling simulated "
            f"retrospectively from the source images ({simulated}); not an acquired low-dose "
            "or accelerated scan"
        )
        comments.append(f"SIMULATED measurement ({simulated}); not an acquisition")
    if mr_scale != 1.0:
        comments.append(f"pixel value = {what} (a.u.) x {mr_scale:g}")
    study_uid = output_study_uid(volume, simulated=simulated is not None, source_study=source_study)
    own_study = study_uid != str(src.get("StudyInstanceUID") or "")
    key = _source_key(volume)
    frame_uid = src.get("FrameOfReferenceUID") or (
        generate_uid(entropy_srcs=[_UID_VERSION, "frame", key]) if key else generate_uid()
    )
    series_uid = generate_uid()
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
            if own_study and simulated is not None:  # a study of simulated results, no order
                for tag in _ORDER_TAGS:
                    setattr(ds, tag, "")
                ds.StudyDescription = "medrecon SIMULATED reconstructions (not acquired)"
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
            ds.DerivationDescription = derivation[:1024]
            if comments:
                ds.ImageComments = "; ".join(comments)[:10240]
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
            if modality != "MR":  # MR images carry no Modality LUT; values are stored as is
                ds.RescaleIntercept, ds.RescaleSlope = _ds_str(intercept), _ds_str(slope)
                ds.RescaleType = "HU" if modality == "CT" else "US"
            ds.WindowCenter = _ds_str(center * mr_scale)
            ds.WindowWidth = _ds_str(max(width * mr_scale, 1.0))
            ds.WindowCenterWidthExplanation = why
            ds.Laterality = ""
            _modality_fields(ds, modality, src)
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            ds["PixelData"].VR = "OW"
            pydicom.dcmwrite(tmp / name, ds, enforce_file_format=True)
            files.append(Path(folder) / name)
    return files


def _software_version() -> str:
    from medrecon._version import __version__

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
