"""Read DICOM image series (classic single-frame and enhanced multi-frame) into a Volume.

What the reader does, in order:

1. walks the folder (recursively by default, following symbolic links, each real folder once),
   skipping files that are not DICOM and objects that are not images (RTSTRUCT, RTPLAN, RTDOSE,
   SR, presentation states, ...);
2. groups images by SeriesInstanceUID -- several series raise :class:`InputError` listing them,
   pick one with ``series_uid=`` (see :func:`list_dicom_series`) -- and within a series by
   SOPInstanceUID: an instance stored more than once (two copies of an export) is read once,
   from an intact copy; broken copies (cut short in the pixel data or in the header) are named
   in a warning and dropped, and only an instance without an intact copy is an error;
3. expands enhanced multi-frame objects into one record per frame (per-frame position, shared
   or per-frame orientation, pixel measures and rescale);
4. checks that all slices share one orientation and size, sorts them along the slice normal
   by ImagePositionPatient, drops exact duplicates and rejects conflicting ones;
5. reports gantry tilt (slice positions sheared off the normal) and uneven spacing as a
   :class:`DicomGeometryWarning` with the measured values (or an error if asked);
6. decodes pixels (compressed transfer syntaxes through pylibjpeg / pydicom's RLE) and applies
   RescaleSlope / RescaleIntercept, so CT comes out in HU.

The affine (RAS+, mm, see :mod:`medrecon.datasets.types`) uses the measured step between the first
and last slice as its third column, so the first and last slice map exactly to their DICOM
positions even under gantry tilt.  Patient identifiers go to ``Volume.meta`` only.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medrecon.datasets.types import LPS_TO_RAS, GeometryWarning, Volume
from medrecon.errors import InputError, SettingsError

__all__ = ["DicomGeometryWarning", "SeriesInfo", "list_dicom_series", "load_dicom_series"]

NON_IMAGE_MODALITIES = {
    "RTSTRUCT",
    "RTPLAN",
    "RTDOSE",
    "RTRECORD",
    "RTIMAGE",
    "SR",
    "PR",
    "KO",
    "REG",
    "SEG",
    "DOC",
    "PLAN",
    "RWV",
    "FID",
    "RAW",
}
#: the patient and study modules a derived series copies from its source
PATIENT_STUDY_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
COPY_TAGS = (
    *PATIENT_STUDY_TAGS,
    "PatientAge",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "PatientPosition",
    "Manufacturer",
    "KVP",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "Modality",
    "ProtocolName",
    "SequenceName",
)


class DicomGeometryWarning(GeometryWarning):
    """Gantry tilt, uneven slice spacing, dropped duplicate slices or dropped broken copies of an
    instance stored more than once (values and file names in the message)."""


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder (no patient identifiers).

    ``n_images`` counts instances (distinct SOPInstanceUIDs); ``n_files`` the files holding them,
    more when instances are stored twice; ``instance_uids`` are the SOPInstanceUIDs.
    """

    series_uid: str
    modality: str
    n_images: int
    series_number: str
    description: str
    n_files: int = 0
    instance_uids: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __str__(self) -> str:
        return (
            f"{self.series_uid} ({self.modality}, {self.n_images} images, "
            f"series {self.series_number or '?'} {self.description!r})"
        )


@dataclass
class _Slice:
    path: Path
    frame: int | None
    position: np.ndarray  # LPS mm
    orientation: np.ndarray  # 6 direction cosines (row dir, column dir)
    spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float | None
    slope: float
    intercept: float
    sop_uid: str


def _problem(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:200]}"


def _read_header(path: Path) -> Any | None:
    """Header without pixels; None if the file is not DICOM at all."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            if path.suffix.lower() not in (".dcm", ".dicom"):
                return None
        # a .dcm file without the preamble: accept it if it parses to something DICOM-like
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if not any(t in ds for t in ("SOPClassUID", "Modality", "Rows")):
            raise InputError(path, "not a DICOM file (no DICM preamble, no DICOM elements)")
        return ds
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any parser failure is a bad input file
        raise InputError(path, f"unreadable DICOM file ({_problem(err)})") from err


def _sop_class(ds: Any) -> str:
    uid = ds.get("SOPClassUID") or getattr(
        getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""
    )
    return str(uid or "")


def _is_image(path: Path, ds: Any) -> bool:
    """Image objects are read; RT / SR / presentation objects are skipped.

    An object of an image storage class without Rows / Columns is an error, not a skip: that is
    what a file truncated inside its header looks like.
    """
    from pydicom.uid import UID

    if (
        str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        == "1.2.840.10008.1.3.10"
    ):
        return False  # DICOMDIR
    modality = str(ds.get("Modality", "")).upper()
    if modality in NON_IMAGE_MODALITIES:
        return False
    if "SOPInstanceUID" not in ds:
        raise InputError(path, "incomplete DICOM object: no SOPInstanceUID (truncated file?)")
    has_size = "Rows" in ds and "Columns" in ds
    cls = _sop_class(ds)
    if not has_size and cls and "Image Storage" in UID(cls).name:
        raise InputError(
            path, f"{UID(cls).name} object without Rows/Columns (truncated or incomplete header)"
        )
    return has_size


def _files(path: Path, recursive: bool) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(path, "no such file or folder")
    if recursive:  # symbolic links followed, each real folder once (a link loop ends there)
        out, seen = [], set()
        for r, dirs, fs in os.walk(path, followlinks=True):
            real = os.path.realpath(r)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            out += [Path(r) / f for f in fs]
    else:
        out = [p for p in path.iterdir() if p.is_file()]
    return sorted(p for p in out if not p.name.startswith("."))


#: a file that claims to be DICOM but is broken: (path, error, its SOPInstanceUID or "")
_Broken = tuple[Path, InputError, str]


def _uids_of_broken(path: Path) -> tuple[str, str]:
    """(SOPInstanceUID, SeriesInstanceUID) of a broken file, as far as its header can be read."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["SOPInstanceUID", "SeriesInstanceUID"])
        return str(ds.get("SOPInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - nothing readable
        return "", ""


def _scan(path: Path, recursive: bool) -> tuple[dict[str, list[tuple[Path, Any]]], dict[str, list[_Broken]]]:
    """Image headers by SeriesInstanceUID, and the broken files attributed to a series.

    A broken file (cut short in its header) whose SOPInstanceUID can be read belongs to the
    series it names, or to the series of an intact file with that SOPInstanceUID: it may be a
    spare copy (:func:`_one_copy_each` decides).  Any other broken file raises its error.
    """
    series: dict[str, list[tuple[Path, Any]]] = {}
    pending: list[tuple[Path, InputError]] = []
    for f in _files(path, recursive):
        try:
            ds = _read_header(f)
            if ds is None:
                if path.is_file():
                    raise InputError(f, "not a DICOM file (no DICM preamble)")
                continue
            if not _is_image(f, ds):
                continue
        except InputError as err:
            pending.append((f, err))
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    broken: dict[str, list[_Broken]] = {}
    if pending:
        owner = {str(ds.get("SOPInstanceUID", "")): uid for uid, items in series.items() for _, ds in items}
        for f, err in pending:
            sop, uid = _uids_of_broken(f)
            uid = uid if uid in series else owner.get(sop, "") if sop else ""
            if not sop or uid not in series:
                raise err
            broken.setdefault(uid, []).append((f, err, sop))
    if not series:
        raise InputError(path, "no DICOM image objects found")
    return series, broken


def _sop(path: Path, ds: Any) -> str:
    return str(ds.get("SOPInstanceUID", "") or f"file:{path}")


def _frames(ds: Any) -> list[int | None]:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    return list(range(n)) if enhanced else [None]


def _intact(path: Path, ds: Any) -> str | None:
    """None when the file's pixel data decode to the size its header gives, else the problem."""
    try:
        _decode(path, _frames(ds), (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)))
    except InputError as err:
        return err.problem
    return None


def _one_copy_each(
    folder: Path, items: list[tuple[Path, Any]], broken: list[_Broken]
) -> list[tuple[Path, Any]]:
    """One intact file per SOPInstanceUID; broken spare copies are named in a warning.

    Copies of one size are taken as the same bytes (the first is kept); copies of different
    sizes are decoded, and the first that decodes is kept.

    Raises
    ------
    InputError
        Every copy of an instance is broken (the message names them).
    """
    by_sop: dict[str, list[tuple[Path, Any]]] = {}
    for f, ds in items:
        by_sop.setdefault(_sop(f, ds), []).append((f, ds))
    broken_by_sop: dict[str, list[tuple[Path, str]]] = {}
    for f, err, sop in broken:
        if sop not in by_sop:
            raise err
        broken_by_sop.setdefault(sop, []).append((f, err.problem))

    def rel(p: Path) -> str:
        return os.path.relpath(p, folder) if folder.is_dir() else p.name

    keep, spare, dropped = [], 0, []
    for sop, copies in by_sop.items():
        bad = list(broken_by_sop.get(sop, []))
        if len(copies) == 1 and not bad:
            keep.append(copies[0])
            continue
        spare += len(copies) + len(bad) - 1
        if len({f.stat().st_size for f, _ in copies}) == 1:  # same size: the same bytes
            good: tuple[Path, Any] | None = copies[0]
        else:
            good = None
            for f, ds in copies:
                problem = _intact(f, ds)
                if problem is not None:
                    bad.append((f, problem))
                elif good is None:
                    good = (f, ds)
        if good is None:
            f0, problem0 = bad[0]
            raise InputError(f0, f"{problem0}; every copy of this instance is broken: "
                                 + ", ".join(rel(f) for f, _ in bad))
        keep.append(good)
        dropped += [f"{rel(f)} ({problem}; intact copy {rel(good[0])} read)" for f, problem in bad]
    if spare:
        text = f"{folder}: {spare} duplicate file(s) of instances stored more than once (same SOPInstanceUID); " \
               "one intact copy of each read"
        if dropped:
            text += f"; dropped {len(dropped)} broken cop{'y' if len(dropped) == 1 else 'ies'}: " + "; ".join(dropped)
        warnings.warn(text, DicomGeometryWarning, stacklevel=3)
    return keep


def list_dicom_series(path: str | Path, *, recursive: bool = True) -> list[SeriesInfo]:
    """List the image series in a folder (non-image objects and non-DICOM files are skipped).

    Parameters
    ----------
    path : str or Path
        A folder (or one file).
    recursive : bool
        Also look in sub-folders.

    Returns
    -------
    list of SeriesInfo
        One entry per SeriesInstanceUID, largest first.

    Raises
    ------
    InputError
        No image found, or a file that claims to be DICOM cannot be parsed.
    """
    infos = []
    series, broken = _scan(Path(path), recursive)
    for uid, items in series.items():
        ds = items[0][1]
        sops = frozenset(_sop(f, d) for f, d in items)
        infos.append(
            SeriesInfo(
                uid,
                str(ds.get("Modality", "OT")),
                len(sops),
                str(ds.get("SeriesNumber", "")),
                str(ds.get("SeriesDescription", "")),
                n_files=len(items) + len(broken.get(uid, [])),
                instance_uids=sops,
            )
        )
    return sorted(infos, key=lambda s: -s.n_images)


def _pixel_format(ds: Any) -> tuple[Any, ...]:
    return tuple(
        ds.get(t)
        for t in ("Rows", "Columns", "BitsAllocated", "PixelRepresentation", "SamplesPerPixel")
    )


def _float(ds: Any, name: str, default: float | None, path: Path) -> float | None:
    if name not in ds or ds[name].value in (None, ""):
        return default
    try:
        v = float(ds[name].value)
    except (TypeError, ValueError) as err:
        raise InputError(path, f"{name} is not a number") from err
    if not np.isfinite(v):
        raise InputError(path, f"{name} is not finite ({v})")
    return v


def _vector(ds: Any, name: str, n: int, path: Path) -> np.ndarray | None:
    if name not in ds or ds[name].value in (None, ""):
        return None
    try:
        v = np.asarray([float(x) for x in ds[name].value], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(path, f"{name} is not a list of numbers") from err
    if v.shape != (n,) or not np.all(np.isfinite(v)):
        raise InputError(path, f"{name} must hold {n} finite numbers; got {v.tolist()}")
    return v


def _group(ds: Any, seq: str, i: int | None) -> Any | None:
    """Item of a functional-group sequence from the per-frame group i, else the shared group."""
    for top, idx in (
        ("PerFrameFunctionalGroupsSequence", i),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        if idx is None or top not in ds or len(ds[top].value) <= idx:
            continue
        item = ds[top].value[idx]
        if seq in item and len(item[seq].value):
            return item[seq].value[0]
    return None


def _slices_of(path: Path, ds: Any) -> list[_Slice]:
    sop = str(ds.get("SOPInstanceUID", path.name))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    out = []
    for i in range(n_frames) if enhanced else [None]:
        src = (
            {
                name: _group(ds, name, i)
                for name in (
                    "PlanePositionSequence",
                    "PlaneOrientationSequence",
                    "PixelMeasuresSequence",
                    "PixelValueTransformationSequence",
                )
            }
            if enhanced
            else {}
        )
        pos_ds = src.get("PlanePositionSequence") or ds
        ori_ds = src.get("PlaneOrientationSequence") or ds
        meas = src.get("PixelMeasuresSequence") or ds
        trans = src.get("PixelValueTransformationSequence") or ds
        pos = _vector(pos_ds, "ImagePositionPatient", 3, path)
        ori = _vector(ori_ds, "ImageOrientationPatient", 6, path)
        spacing = _vector(meas, "PixelSpacing", 2, path)
        if spacing is None:
            spacing = _vector(ds, "ImagerPixelSpacing", 2, path)
        if spacing is not None and np.any(spacing <= 0):
            raise InputError(path, f"PixelSpacing must be positive; got {spacing.tolist()}")
        if ori is not None and (
            abs(np.linalg.norm(ori[:3]) - 1) > 1e-2
            or abs(np.linalg.norm(ori[3:]) - 1) > 1e-2
            or abs(ori[:3] @ ori[3:]) > 1e-2
        ):
            raise InputError(
                path, f"ImageOrientationPatient is not two orthonormal vectors: {ori.tolist()}"
            )
        if n_frames > 1 and not enhanced:
            raise InputError(
                path, f"{n_frames} frames without functional groups (not a volume slice)"
            )
        out.append(
            _Slice(
                path=path,
                frame=i,
                position=pos if pos is not None else np.full(3, np.nan),
                orientation=ori if ori is not None else np.full(6, np.nan),
                spacing=(float(spacing[0]), float(spacing[1]))
                if spacing is not None
                else (1.0, 1.0),
                thickness=_float(meas, "SliceThickness", None, path),
                slope=_float(trans, "RescaleSlope", 1.0, path) or 1.0,
                intercept=_float(trans, "RescaleIntercept", 0.0, path) or 0.0,
                sop_uid=sop if i is None else f"{sop}#{i}",
            )
        )
    return out


def _decode(path: Path, frames: list[int | None], shape: tuple[int, int]) -> list[np.ndarray]:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001
        raise InputError(path, f"unreadable DICOM file ({_problem(err)})") from err
    if not ds.get("PixelData"):
        raise InputError(path, "image object has no (or empty) PixelData")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(
            path, f"colour image (SamplesPerPixel={ds.SamplesPerPixel}); expected greyscale"
        )
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" in ds and ts is not None and not ts.is_compressed:
        bits = int(ds.get("BitsAllocated") or 0)
        if bits not in (1, 8, 16, 32, 64):
            raise InputError(path, f"BitsAllocated is {bits}; expected 8, 16 or 32")
        n = (
            int(ds.get("NumberOfFrames", 1) or 1)
            * shape[0]
            * shape[1]
            * int(ds.get("SamplesPerPixel", 1) or 1)
        )
        expected = (n * bits + 7) // 8
        got = len(ds.PixelData)
        if got not in (expected, expected + 1):
            raise InputError(
                path,
                f"PixelData holds {got} bytes; Rows x Columns x frames at "
                f"{bits} bits needs {expected}",
            )
    try:
        arr = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - decoder errors of every plugin
        raise InputError(
            path, f"cannot decode pixel data (transfer syntax {ts or 'unknown'}; {_problem(err)})"
        ) from err
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != shape:
        raise InputError(path, f"pixel data has shape {arr.shape}; expected frames of {shape}")
    out = []
    for f in frames:
        idx = 0 if f is None else f
        if idx >= arr.shape[0]:
            raise InputError(path, f"frame {idx} missing: pixel data holds {arr.shape[0]} frames")
        a = arr[idx]
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            a = a.max() + a.min() - a  # display inversion, keep the value range
        out.append(a)
    return out


def _check_policy(name: str, value: str) -> None:
    if value not in ("warn", "error", "ignore"):
        raise SettingsError(
            f"load_dicom_series(): {name} must be 'warn', 'error' or 'ignore'; got {value!r}"
        )


def _report(folder: Path, policy: str, message: str) -> None:
    if policy == "error":
        raise InputError(folder, message)
    if policy == "warn":
        warnings.warn(f"{folder}: {message}", DicomGeometryWarning, stacklevel=3)


def load_dicom_series(
    path: str | Path,
    *,
    series_uid: str | None = None,
    recursive: bool = True,
    min_slices: int = 1,
    on_tilt: Literal["warn", "error", "ignore"] = "warn",
    on_uneven: Literal["warn", "error", "ignore"] = "warn",
    spacing_rtol: float = 1e-2,
) -> Volume:
    """Load one DICOM image series from a folder (or a single file) as a Volume.

    Parameters
    ----------
    path : str or Path
        Folder holding the series (other files and non-image objects are ignored) or one file.
    series_uid : str, optional
        The SeriesInstanceUID to load when the folder holds several series.
    recursive : bool
        Also read sub-folders.
    min_slices : int
        Fewer slices than this raise :class:`InputError`.
    on_tilt, on_uneven : {"warn", "error", "ignore"}
        What to do about gantry tilt / uneven slice spacing.  Either way the measured values are
        in ``volume.meta["geometry"]``.
    spacing_rtol : float
        Slice gaps that differ from the median gap by more than this fraction are "uneven".

    Returns
    -------
    Volume
        ``array`` (Z, Y, X) float32 (HU for CT, rescaled stored values otherwise), affine RAS+ mm,
        ``meta["dicom"]`` with the identifiers and per-slice positions a writer needs and
        ``meta["geometry"]`` with the tilt / spacing report.

    Raises
    ------
    InputError
        Several series without ``series_uid``, mixed orientations or sizes, conflicting duplicate
        slices, unreadable or undecodable files (the message names the file); an instance stored
        more than once raises only when every copy is broken (broken spare copies are dropped
        with a :class:`DicomGeometryWarning` naming them).

    Examples
    --------
    >>> from pydicom.data import get_testdata_file
    >>> vol = load_dicom_series(get_testdata_file("CT_small.dcm"))
    >>> vol.shape, vol.modality
    ((1, 128, 128), 'CT')
    """
    _check_policy("on_tilt", on_tilt)
    _check_policy("on_uneven", on_uneven)
    folder = Path(path)
    series, broken = _scan(folder, recursive)
    if series_uid is None and len(series) > 1:
        listing = "; ".join(str(s) for s in list_dicom_series(folder, recursive=recursive))
        raise InputError(
            folder, f"holds {len(series)} series; pick one with series_uid=: {listing}"
        )
    if series_uid is not None and series_uid not in series:
        raise InputError(
            folder, f"no series with SeriesInstanceUID {series_uid}; found {sorted(series)}"
        )
    uid = series_uid if series_uid is not None else next(iter(series))
    items = _one_copy_each(folder, series[uid], broken.get(uid, []))
    first = items[0][1]
    fmt = Counter(_pixel_format(ds) for _, ds in items).most_common(1)[0][0]
    shape = (fmt[0], fmt[1])
    slices: list[_Slice] = []
    for f, ds in items:
        if _pixel_format(ds) != fmt:
            raise InputError(
                f,
                "pixel format (Rows, Columns, BitsAllocated, PixelRepresentation, SamplesPerPixel) "
                f"{_pixel_format(ds)} differs from the series' {fmt}",
            )
        slices.extend(_slices_of(f, ds))
    return _assemble(folder, first, slices, shape, min_slices, on_tilt, on_uneven, spacing_rtol)


def _assemble(
    folder: Path,
    first: Any,
    slices: list[_Slice],
    shape: tuple[int, int],
    min_slices: int,
    on_tilt: str,
    on_uneven: str,
    spacing_rtol: float,
) -> Volume:
    from medrecon.datasets._dicom_geometry import sort_slices

    slices, geometry = sort_slices(folder, slices, shape, min_slices, spacing_rtol)
    if geometry["tilt_deg"] > 0.01:
        _report(
            folder,
            on_tilt,
            f"gantry tilt: slice positions sheared {geometry['tilt_deg']:.2f} deg off the "
            f"slice normal (GantryDetectorTilt {first.get('GantryDetectorTilt', 'absent')}); "
            "the affine keeps the shear",
        )
    if geometry["uneven"]:
        g = geometry["gaps_mm"]
        _report(
            folder,
            on_uneven,
            f"uneven slice spacing: gaps {min(g):.3f}-{max(g):.3f} mm; the affine uses "
            f"the mean step {geometry['step_mm']:.3f} mm, exact positions are in meta",
        )
    by_file: dict[Path, list[int]] = {}
    for k, s in enumerate(slices):
        by_file.setdefault(s.path, []).append(k)
    raw: list[np.ndarray | None] = [None] * len(slices)
    for f, ks in by_file.items():
        for k, a in zip(ks, _decode(f, [slices[k].frame for k in ks], shape), strict=True):
            raw[k] = a
    slices, raw = _drop_duplicates(folder, slices, raw, geometry)
    array = np.stack(
        [
            a.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)
            for a, s in zip(raw, slices, strict=True)
        ]
    )
    if not np.all(np.isfinite(array)):
        raise InputError(folder, "pixel values are not finite after rescaling")
    affine_lps = geometry["affine_lps"]
    copied = {t: first.get(t, None) for t in COPY_TAGS}  # an empty element reads as None
    meta = {"source": str(folder), "dicom": {t: "" if v is None else str(v) for t, v in copied.items()}}
    meta["dicom"].update(
        slice_positions_lps=np.stack([s.position for s in slices]).tolist(),
        orientation_lps=slices[0].orientation.tolist(),
        pixel_spacing_mm=list(slices[0].spacing),
        slice_thickness_mm=slices[0].thickness,
        sop_instance_uids=[s.sop_uid for s in slices],
        window=_voi_window(first),
        sop_class_uid=str(
            first.get("SOPClassUID", "") or getattr(first.file_meta, "MediaStorageSOPClassUID", "")
        ),
    )
    geometry.pop("affine_lps")
    geometry["slice_positions_lps"] = meta["dicom"]["slice_positions_lps"]
    meta["geometry"] = geometry
    modality = str(first.get("Modality", "OT")).upper() or "OT"
    return Volume(
        array, LPS_TO_RAS @ affine_lps, modality if modality in ("CT", "MR") else "OT", meta
    )


def _voi_window(ds: Any) -> list[float] | None:
    """The first WindowCenter / WindowWidth pair (values after rescale), or None."""
    try:
        c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
        if c is None or w is None or c == "" or w == "":
            return None
        c, w = (v[0] if isinstance(v, Sequence) and not isinstance(v, str) else v for v in (c, w))
        center, width = float(c), float(w)
    except (TypeError, ValueError, IndexError):
        return None
    return [center, width] if np.isfinite(center) and np.isfinite(width) and width > 0 else None


def _drop_duplicates(
    folder: Path, slices: list[_Slice], raw: list[Any], geometry: dict[str, Any]
) -> tuple[list[_Slice], list[np.ndarray]]:
    keep_s, keep_r, dropped = [slices[0]], [raw[0]], 0
    for s, r in zip(slices[1:], raw[1:], strict=True):
        if np.linalg.norm(s.position - keep_s[-1].position) < 1e-3:
            same = s.sop_uid == keep_s[-1].sop_uid or (
                np.array_equal(r, keep_r[-1])
                and s.slope == keep_s[-1].slope
                and s.intercept == keep_s[-1].intercept
            )
            if not same:
                raise InputError(
                    s.path,
                    f"different image at the same position as {keep_s[-1].path.name} "
                    f"({s.position.round(3).tolist()} mm); not one volume",
                )
            dropped += 1
            continue
        keep_s.append(s)
        keep_r.append(r)
    if dropped:
        geometry["dropped_duplicates"] = dropped
        warnings.warn(
            f"{folder}: dropped {dropped} duplicate slice(s) at repeated positions",
            DicomGeometryWarning,
            stacklevel=4,
        )
    return keep_s, keep_r
