"""Fuzz suite: mutated inputs must raise a medrecon error that names the file and the problem.

Every case starts from a small valid file made in a temporary folder, breaks it in one way
(truncation, a missing or wrong element, mixed series, inconsistent geometry, impossible
dimensions, NaN / Inf, wrong mask shapes, ...) and checks that:

* the reader raises a :class:`medrecon.errors.MedreconError` (never another exception type);
* the message names the offending file (or folder, for folder-level problems) and no patient name;
* nothing is written or left behind in the folder.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medrecon.datasets import (
    KSpace,
    Sinogram,
    Volume,
    load_bart_kspace,
    load_dicom_series,
    load_fastmri,
    load_image,
    load_nifti,
    load_mrd,
    load_sinogram,
    load_twix,
    save_bart_kspace,
    save_dicom_series,
    save_fastmri,
    save_mrd,
    save_nifti,
    save_sinogram,
)
from medrecon.errors import MedreconError

PATIENT_NAME = "Fuzz^Patient"


@dataclass
class Case:
    name: str
    build: Callable[
        [Path], tuple[Callable[[], Any], str]
    ]  # tmp dir -> (action, text the message must hold)


CASES: list[Case] = []


def case(name: str):
    def deco(fn):
        CASES.append(Case(name, fn))
        return fn

    return deco


# ------------------------------------------------------------------ templates
def _series(folder: Path, n: int = 3) -> list[Path]:
    arr = np.arange(n * 36, dtype=np.float32).reshape(n, 6, 6) - 50
    meta = {"dicom": {"PatientName": PATIENT_NAME, "PatientID": "CASE-FUZZ"}}
    save_dicom_series(Volume(arr, np.diag([0.8, 0.8, 2.0, 1.0]), "CT", meta), folder, method="fuzz")
    return sorted(folder.iterdir())


def _edit(path: Path, fn: Callable[[Any], None]) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path)


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


FRACTIONS = [0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995]

# ------------------------------------------------------------------ DICOM: truncation
for _frac in FRACTIONS:
    for _which in (0, 2):

        def _b(tmp: Path, frac=_frac, which=_which):
            files = _series(tmp / "s")
            _truncate(files[which], frac)
            return (lambda: load_dicom_series(tmp / "s")), files[which].name

        case(f"dicom-truncated-{_frac}-slice{_which}")(_b)

    def _b1(tmp: Path, frac=_frac):
        files = _series(tmp / "s")
        _truncate(files[1], frac)
        return (lambda: load_dicom_series(files[1])), files[1].name

    case(f"dicom-truncated-{_frac}-single-file")(_b1)


# ------------------------------------------------------------------ DICOM: element mutations
def _set(**kw):
    def fn(ds):
        for k, v in kw.items():
            setattr(ds, k, v)

    return fn


def _delete(*names):
    def fn(ds):
        for n in names:
            delattr(ds, n)

    return fn


def _pixels(fn_arr):
    def fn(ds):
        ds.PixelData = fn_arr(ds.PixelData)

    return fn


DICOM_MUTATIONS: dict[str, tuple[Callable[[Any], None], str]] = {
    "no-pixeldata": (_delete("PixelData"), "PixelData"),
    "bits-1": (_set(BitsAllocated=1), ""),
    "bits-8": (_set(BitsAllocated=8), ""),
    "bits-12": (_set(BitsAllocated=12), ""),
    "bits-32": (_set(BitsAllocated=32), ""),
    "bits-64": (_set(BitsAllocated=64), ""),
    "bits-24": (_set(BitsAllocated=24), ""),
    "rows": (_set(Rows=7), ""),
    "columns": (_set(Columns=5), ""),
    "samples-3": (_set(SamplesPerPixel=3), ""),
    "frames-4": (_set(NumberOfFrames=4), ""),
    "pixeldata-half": (_pixels(lambda b: b[: len(b) // 2]), "PixelData"),
    "pixeldata-double": (_pixels(lambda b: b + b), "PixelData"),
    "pixeldata-empty": (_pixels(lambda b: b""), "PixelData"),
    "ipp-missing": (_delete("ImagePositionPatient"), "ImagePositionPatient"),
    "ipp-two-values": (_set(ImagePositionPatient=[1.0, 2.0]), "ImagePositionPatient"),
    "ipp-nan": (_set(ImagePositionPatient=["nan", "0", "0"]), "ImagePositionPatient"),
    "ipp-inf": (_set(ImagePositionPatient=["0", "inf", "0"]), "ImagePositionPatient"),
    "ipp-duplicate-other-pixels": (_set(ImagePositionPatient=[0, 0, 2.0]), "same position"),
    "ipp-shift-inplane": (_set(ImagePositionPatient=[5.0, 5.0, 2.0]), ""),
    "ipp-off-line": (_set(ImagePositionPatient=[9.0, -9.0, 3.0]), ""),
    "iop-missing": (_delete("ImageOrientationPatient"), "ImageOrientationPatient"),
    "iop-not-unit": (_set(ImageOrientationPatient=[2, 0, 0, 0, 1, 0]), "ImageOrientationPatient"),
    "iop-not-orthogonal": (
        _set(ImageOrientationPatient=[1, 0, 0, 1, 0, 0]),
        "ImageOrientationPatient",
    ),
    "iop-five-values": (_set(ImageOrientationPatient=[1, 0, 0, 0, 1]), "ImageOrientationPatient"),
    "iop-nan": (_set(ImageOrientationPatient=["nan", 0, 0, 0, 1, 0]), "ImageOrientationPatient"),
    "iop-other-plane": (_set(ImageOrientationPatient=[0, 1, 0, 0, 0, -1]), "orientation"),
    "spacing-zero": (_set(PixelSpacing=[0, 0.8]), "PixelSpacing"),
    "spacing-negative": (_set(PixelSpacing=[-0.8, 0.8]), "PixelSpacing"),
    "spacing-nan": (_set(PixelSpacing=["nan", 0.8]), "PixelSpacing"),
    "spacing-different": (_set(PixelSpacing=[0.5, 0.5]), "PixelSpacing"),
    "slope-nan": (_set(RescaleSlope="nan"), "RescaleSlope"),
    "slope-inf": (_set(RescaleSlope="inf"), "RescaleSlope"),
    "intercept-inf": (_set(RescaleIntercept="-inf"), "RescaleIntercept"),
    "other-series": (_set(SeriesInstanceUID="1.2.3.4.5.6.7"), "series"),
    "rows-missing": (_delete("Rows"), "Rows"),
}
FOLDER_LEVEL = {"other-series", "iop-other-plane", "ipp-off-line"}

for _mut, (_fn, _text) in DICOM_MUTATIONS.items():
    for _which in (0, 1, 2):

        def _b(tmp: Path, fn=_fn, text=_text, which=_which, mut=_mut):
            files = _series(tmp / "s")
            if mut == "ipp-duplicate-other-pixels":
                import pydicom

                pos = list(pydicom.dcmread(files[(which + 1) % 3]).ImagePositionPatient)
                fn = _set(ImagePositionPatient=pos)
            _edit(files[which], fn)
            name = "s" if mut in FOLDER_LEVEL else ""
            return (lambda: load_dicom_series(tmp / "s")), name or text

        case(f"dicom-{_mut}-slice{_which}")(_b)


for _ts in (
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.2",
):  # RLE / big endian claimed, data unchanged
    for _which in (0, 1, 2):

        def _b(tmp: Path, ts=_ts, which=_which):
            files = _series(tmp / "s")
            raw = files[which].read_bytes()
            assert raw.count(b"1.2.840.10008.1.2.1\0") == 1
            files[which].write_bytes(raw.replace(b"1.2.840.10008.1.2.1\0", ts.encode() + b"\0"))
            return (lambda: load_dicom_series(tmp / "s")), files[which].name

        case(f"dicom-transfer-syntax-{_ts}-slice{_which}")(_b)


# ------------------------------------------------------------------ NIfTI
def _nifti(tmp: Path, gz: bool = False, data=None) -> Path:
    p = tmp / ("v.nii.gz" if gz else "v.nii")
    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5) if data is None else data
    save_nifti(Volume(arr, np.diag([1.0, 2.0, 3.0, 1.0]), "MR"), p)
    return p


def _raw_header_edit(path: Path, offset: int, dtype: str, value: Any) -> None:
    b = bytearray(path.read_bytes())
    b[offset : offset + np.dtype(dtype).itemsize] = np.array(value, dtype=dtype).tobytes()
    path.write_bytes(bytes(b))


NIFTI_HEADER_EDITS = {  # offset, dtype, value (NIfTI-1 header layout)
    "dim0-zero": (40, "<i2", 0),
    "dim0-nine": (40, "<i2", 9),
    "dim0-negative": (40, "<i2", -1),
    "dim1-zero": (42, "<i2", 0),
    "dim1-negative": (42, "<i2", -4),
    "dim2-huge": (44, "<i2", 30000),
    "dim3-huge": (46, "<i2", 32767),
    "dim4-three": ((40, 48), "<i2", (4, 3)),
    "datatype-bogus": (70, "<i2", 9999),
    "bitpix-wrong": ((70, 72), "<i2", (64, 7)),
    "vox-offset-beyond": (108, "<f4", 1e6),
    "sizeof-hdr": (0, "<i4", 123),
    "sform-nan": (280, "<f4", float("nan")),
    "scl-slope-inf": (112, "<f4", float("inf")),
    "pixdim-zero-qform": ((76, 252, 254), "<f4", None),
}


def _apply_nifti_edit(p: Path, spec) -> None:
    off, dt, val = spec
    if spec == NIFTI_HEADER_EDITS["pixdim-zero-qform"]:
        for o in (80, 84, 88):
            _raw_header_edit(p, o, "<f4", 0.0)
        _raw_header_edit(p, 252, "<i2", 1)
        _raw_header_edit(p, 254, "<i2", 0)
        return
    if isinstance(off, tuple):
        for o, v in zip(off, val, strict=True):
            _raw_header_edit(p, o, dt, v)
    else:
        _raw_header_edit(p, off, dt, val)


for _k, _spec in NIFTI_HEADER_EDITS.items():
    for _gz in (False, True):

        def _b(tmp: Path, spec=_spec, gz=_gz):
            p = _nifti(tmp)
            _apply_nifti_edit(p, spec)
            if gz:
                q = tmp / "v.nii.gz"
                q.write_bytes(gzip.compress(p.read_bytes()))
                p.unlink()
                p = q
            return (lambda: load_nifti(p)), p.name

        case(f"nifti-{_k}-{'gz' if _gz else 'raw'}")(_b)

for _frac in FRACTIONS[:-1]:
    for _gz in (False, True):

        def _b(tmp: Path, frac=_frac, gz=_gz):
            p = _nifti(tmp, gz)
            _truncate(p, frac)
            return (lambda: load_nifti(p)), p.name

        case(f"nifti-truncated-{_frac}-{'gz' if _gz else 'raw'}")(_b)

for _bad in ("nan", "inf", "-inf"):
    for _where in (0, 17, 59):

        def _b(tmp: Path, bad=_bad, where=_where):
            arr = np.arange(60, dtype=np.float32)
            arr[where] = float(bad)
            p = tmp / "v.nii"
            import nibabel as nib

            nib.save(nib.Nifti1Image(arr.reshape(5, 4, 3), np.eye(4)), p)
            return (lambda: load_nifti(p)), "NaN or Inf"

        case(f"nifti-{_bad}-voxel{_where}")(_b)


# ------------------------------------------------------------------ fastMRI HDF5
def _h5(tmp: Path, **datasets) -> Path:
    import h5py

    p = tmp / "k.h5"
    with h5py.File(p, "w") as hf:
        for k, v in datasets.items():
            hf.create_dataset(k, data=v)
    return p


_K = (np.ones((2, 3, 8, 6)) + 1j).astype(np.complex64)
H5_CASES = {
    "no-kspace": ({"reconstruction_rss": np.ones((2, 8, 6), np.float32)}, "kspace"),
    "empty-file": ({}, "kspace"),
    "kspace-real": ({"kspace": np.ones((2, 3, 8, 6), np.float32)}, "complex"),
    "kspace-2d": ({"kspace": _K[0, 0]}, "kspace"),
    "kspace-5d": ({"kspace": _K[None]}, "kspace"),
    "kspace-1d": ({"kspace": _K.ravel()}, "kspace"),
    "kspace-zero-slices": ({"kspace": _K[:0]}, "kspace"),
    "kspace-int": ({"kspace": np.ones((2, 8, 6), np.int16)}, "complex"),
    "mask-wrong-length": ({"kspace": _K, "mask": np.ones(5, np.float32)}, "mask"),
    "mask-2d-wrong": ({"kspace": _K, "mask": np.ones((3, 4), np.float32)}, "mask"),
    "mask-too-long": ({"kspace": _K, "mask": np.ones(12, np.float32)}, "mask"),
}
for _k, (_ds, _text) in H5_CASES.items():

    def _b(tmp: Path, ds=_ds, text=_text):
        p = _h5(tmp, **ds)
        return (lambda: load_fastmri(p)), text

    case(f"h5-{_k}")(_b)

for _bad in ("nan", "inf"):
    for _where in (0, 100, 287):
        for _part in ("real", "imag"):

            def _b(tmp: Path, bad=_bad, where=_where, part=_part):
                k = _K.copy().ravel()
                k[where] = complex(float(bad), 0.0) if part == "real" else complex(0.0, float(bad))
                p = _h5(tmp, kspace=k.reshape(_K.shape))
                return (lambda: load_fastmri(p)), "NaN or Inf"

            case(f"h5-{_bad}-{_part}-{_where}")(_b)

for _frac in FRACTIONS[:-1]:

    def _b(tmp: Path, frac=_frac):
        p = _h5(tmp, kspace=_K, ismrmrd_header=np.bytes_(b"<xml/>"))
        _truncate(p, frac)
        return (lambda: load_fastmri(p)), "k.h5"

    case(f"h5-truncated-{_frac}")(_b)


def _b_text(tmp: Path):
    p = tmp / "k.h5"
    p.write_text("not hdf5")
    return (lambda: load_fastmri(p)), "k.h5"


case("h5-text-file")(_b_text)
case("h5-missing-file")(lambda tmp: ((lambda: load_fastmri(tmp / "none.h5")), "none.h5"))


# ------------------------------------------------------------------ BART
def _bart(tmp: Path) -> Path:
    k = KSpace(_K.transpose(1, 0, 2, 3).copy())
    save_bart_kspace(k, tmp / "ksp")
    return tmp / "ksp"


BART_HDR = {
    "no-dims-line": "# Something\n1 2 3\n",
    "empty": "",
    "non-numeric": "# Dimensions\n6 8 a 3\n",
    "negative": "# Dimensions\n6 -8 1 3\n",
    "zero": "# Dimensions\n6 0 1 3\n",
    "too-big": "# Dimensions\n6 8 2 3 1 1 1 1 1 1 1 1 1 2\n",
    "too-small": "# Dimensions\n6 8 1 2\n",
    "missing-values": "# Dimensions\n",
    "binary": "\x00\xff\xfe",
    "extra-dim": "# Dimensions\n6 8 1 3 2 1 1 1 1 1 1 1 1 1\n",
}
for _k, _txt in BART_HDR.items():

    def _b(tmp: Path, txt=_txt, k=_k):
        base = _bart(tmp)
        if k == "extra-dim":  # valid size, unsupported dimension
            data = np.fromfile(base.with_suffix(".cfl"), dtype="<c8")
            data[: data.size // 2].tofile(base.with_suffix(".cfl"))
            txt = "# Dimensions\n6 8 1 3 1 1 1 1 1 1 1 1 1 2\n".replace("1 3 1", "1 1 2")
        base.with_suffix(".hdr").write_bytes(txt.encode("latin-1"))
        return (lambda: load_bart_kspace(base)), "ksp."

    case(f"bart-hdr-{_k}")(_b)

for _frac in FRACTIONS[:-1]:

    def _b(tmp: Path, frac=_frac):
        base = _bart(tmp)
        _truncate(base.with_suffix(".cfl"), frac)
        return (lambda: load_bart_kspace(base)), "ksp.cfl"

    case(f"bart-cfl-truncated-{_frac}")(_b)

for _bad in ("nan", "inf", "-inf"):
    for _where in (0, 50):

        def _b(tmp: Path, bad=_bad, where=_where):
            base = _bart(tmp)
            data = np.fromfile(base.with_suffix(".cfl"), dtype="<c8")
            data[where] = float(bad)
            data.tofile(base.with_suffix(".cfl"))
            return (lambda: load_bart_kspace(base)), "NaN or Inf"

        case(f"bart-{_bad}-{_where}")(_b)

for _missing in (".hdr", ".cfl"):

    def _b(tmp: Path, missing=_missing):
        base = _bart(tmp)
        base.with_suffix(missing).unlink()
        return (lambda: load_bart_kspace(base)), "ksp" + missing

    case(f"bart-missing{_missing}")(_b)


# ------------------------------------------------------------------ MRD (ISMRMRD HDF5)
def _mrd_file(tmp: Path) -> Path:
    k = _K.transpose(1, 0, 2, 3).copy()  # (coils 3, Z 2, 8, 6)
    noise = np.ones((3, 40), np.complex64)
    save_mrd(KSpace(k, header={"readout_axis": -1}, noise=noise), tmp / "k.mrd")
    return tmp / "k.mrd"


for _frac in FRACTIONS[:-1]:

    def _b(tmp: Path, frac=_frac):
        p = _mrd_file(tmp)
        _truncate(p, frac)
        return (lambda: load_mrd(p)), "k.mrd"

    case(f"mrd-truncated-{_frac}")(_b)


def _mrd_edit(fn):
    def build(tmp: Path):
        import h5py

        p = _mrd_file(tmp)
        with h5py.File(p, "r+") as hf:
            fn(hf)
        return (lambda: load_mrd(p)), "k.mrd"

    return build


def _set_xml(text: bytes):
    def fn(hf):
        hf["dataset"]["xml"][0] = text

    return fn


def _head_field(field: str, value):
    def fn(hf):
        data = hf["dataset"]["data"][:]
        data["head"][field][-1] = value
        hf["dataset"]["data"][:] = data

    return fn


MRD_EDITS = {
    "xml-not-xml": _set_xml(b"not xml at all"),
    "xml-empty": _set_xml(b""),
    "xml-wrong-root": _set_xml(b"<html><body/></html>"),
    "xml-no-encoding": _set_xml(b'<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><experimentalConditions>'
                                b"<H1resonanceFrequency_Hz>1</H1resonanceFrequency_Hz></experimentalConditions>"
                                b"</ismrmrdHeader>"),
    "no-data": lambda hf: hf["dataset"].__delitem__("data"),
    "no-xml": lambda hf: hf["dataset"].__delitem__("xml"),
    "no-dataset": lambda hf: (hf.create_group("other"), hf.move("dataset", "other/inner")),
    "centre-outside": _head_field("center_sample", 999),
    "samples-too-many": _head_field("number_of_samples", 50),
    "channels-too-many": _head_field("active_channels", 9),
    "discard-all": _head_field("discard_pre", 6),
}
for _k, _fn in MRD_EDITS.items():
    case(f"mrd-{_k}")(_mrd_edit(_fn))

for _bad in ("nan", "inf"):

    def _b(tmp: Path, bad=_bad):
        import h5py

        p = _mrd_file(tmp)
        with h5py.File(p, "r+") as hf:
            data = hf["dataset"]["data"][:]
            row = data["data"][-1].copy()
            row[3] = float(bad)
            data["data"][-1] = row
            hf["dataset"]["data"][:] = data
        return (lambda: load_mrd(p)), "NaN or Inf"

    case(f"mrd-{_bad}-sample")(_b)

def _mrd_text(tmp: Path):
    p = _write(tmp / "x.mrd", b"hello")  # written before the snapshot: the reader must leave it alone
    return (lambda: load_mrd(p)), "x.mrd"


case("mrd-text-file")(_mrd_text)
def _mrd_fastmri(tmp: Path):
    p = _h5(tmp, kspace=_K)
    return (lambda: load_mrd(p)), "no MRD dataset"


case("mrd-fastmri-file")(_mrd_fastmri)


# ------------------------------------------------------------------ Siemens twix (needs the shared file)
def _twix(tmp: Path) -> Path:
    import os

    root = Path(os.environ.get("MEDRECON_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    src = root / "mri" / "raw" / "twixtools_example_gre.dat"
    if not src.is_file():
        pytest.skip(f"twix file not found at {src} (set MEDRECON_DATA)")
    p = tmp / "meas.dat"
    p.write_bytes(src.read_bytes())
    return p


for _frac in (0.0, 0.001, 0.005, 0.02, 0.2, 0.5, 0.9, 0.999):

    def _b(tmp: Path, frac=_frac):
        p = _twix(tmp)
        _truncate(p, frac)
        return (lambda: load_twix(p)), "meas.dat"

    case(f"twix-truncated-{_frac}")(_b)


def _twix_bytes(offset: int, payload: bytes):
    def build(tmp: Path):
        p = _twix(tmp)
        b = bytearray(p.read_bytes())
        b[offset : offset + len(payload)] = payload
        p.write_bytes(bytes(b))
        return (lambda: load_twix(p)), "meas.dat"

    return build


case("twix-garbage-table")(_twix_bytes(8, bytes(range(256)) * 2))
case("twix-no-measurements")(_twix_bytes(4, b"\0\0\0\0"))
case("twix-header-length")(_twix_bytes(0, (50_000_000).to_bytes(4, "little")))
def _twix_text(tmp: Path):
    p = _write(tmp / "t.dat", b"hello world " * 200)
    return (lambda: load_twix(p)), "t.dat"


case("twix-text-file")(_twix_text)
def _twix_zeros(tmp: Path):
    p = _write(tmp / "z.dat", bytes(5000))
    return (lambda: load_twix(p)), "z.dat"


case("twix-zeros")(_twix_zeros)
case("twix-missing")(lambda tmp: ((lambda: load_twix(tmp / "none.dat")), "none.dat"))


# ------------------------------------------------------------------ raw sinograms
_GEOM = {"type": "parallel", "angles_rad": [0.0, 0.5, 1.0, 1.5], "n_detectors": 5}


def _sino(tmp: Path, data=None, geometry=None, raw_json=None) -> Path:
    np.save(
        tmp / "s.npy", np.zeros((2, 4, 5), np.float32) if data is None else data, allow_pickle=True
    )
    (tmp / "s.json").write_text(raw_json if raw_json is not None else json.dumps(geometry or _GEOM))
    return tmp / "s"


SINO_CASES = {
    "nan": ({"data": np.full((2, 4, 5), np.nan, np.float32)}, "NaN or Inf"),
    "inf": ({"data": np.full((4, 5), np.inf, np.float32)}, "NaN or Inf"),
    "1d": ({"data": np.zeros(20, np.float32)}, "s.npy"),
    "4d": ({"data": np.zeros((1, 2, 4, 5), np.float32)}, "s.npy"),
    "complex": ({"data": np.zeros((2, 4, 5), np.complex64)}, "s.npy"),
    "object": ({"data": np.array([{"a": 1}], dtype=object)}, "s.npy"),
    "empty": ({"data": np.zeros((0, 4, 5), np.float32)}, "s.npy"),
    "angles-count": ({"geometry": {**_GEOM, "angles_rad": [0.0, 1.0]}}, "s.json"),
    "bins-count": ({"geometry": {**_GEOM, "n_detectors": 6}}, "s.json"),
    "type-unknown": ({"geometry": {**_GEOM, "type": "helical"}}, "s.json"),
    "type-missing": ({"geometry": {k: v for k, v in _GEOM.items() if k != "type"}}, "s.json"),
    "angles-text": ({"geometry": {**_GEOM, "angles_rad": "zero"}}, "s.json"),
    "angles-nan": ({"raw_json": json.dumps(_GEOM).replace("0.5", "NaN")}, "s.json"),
    "fan-no-distances": (
        {"geometry": {**_GEOM, "type": "fan", "detector_spacing_rad": 0.01}},
        "s.json",
    ),
    "fan-bad-detector": ({"geometry": {**_GEOM, "type": "fan", "detector": "curved"}}, "s.json"),
    "spacing-zero": ({"geometry": {**_GEOM, "detector_spacing_mm": 0}}, "s.json"),
    "spacing-string": ({"geometry": {**_GEOM, "detector_spacing_mm": "1"}}, "s.json"),
    "n-detectors-float": ({"geometry": {**_GEOM, "n_detectors": 5.0}}, "s.json"),
    "json-list": ({"raw_json": "[1, 2]"}, "s.json"),
    "json-broken": ({"raw_json": json.dumps(_GEOM)[:-7]}, "s.json"),
    "json-empty": ({"raw_json": ""}, "s.json"),
    "units-unknown": ({"geometry": {**_GEOM, "units": "HU"}}, "s.json"),
    "pixel-size-negative": ({"geometry": {**_GEOM, "pixel_size_mm": -1}}, "s.json"),
}
for _k, (_kw, _text) in SINO_CASES.items():

    def _b(tmp: Path, kw=_kw, text=_text):
        base = _sino(tmp, **kw)
        return (lambda: load_sinogram(base)), text

    case(f"sinogram-{_k}")(_b)

for _frac in FRACTIONS[:-1]:

    def _b(tmp: Path, frac=_frac):
        base = _sino(tmp)
        _truncate(tmp / "s.npy", frac)
        return (lambda: load_sinogram(base)), "s.npy"

    case(f"sinogram-npy-truncated-{_frac}")(_b)


# ------------------------------------------------------------------ images
def _image(tmp: Path, fmt: str) -> Path:
    from PIL import Image

    arr = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(64, 48)
    p = tmp / f"i.{fmt}"
    if fmt == "tif":
        import tifffile

        tifffile.imwrite(p, arr.astype(np.uint16) * 100)
    else:
        Image.fromarray(arr).save(p)
    return p


for _fmt in ("png", "jpg", "tif"):
    for _frac in (0.0, 0.05, 0.2, 0.5, 0.8, 0.95):

        def _b(tmp: Path, fmt=_fmt, frac=_frac):
            p = _image(tmp, fmt)
            _truncate(p, frac)
            return (lambda: load_image(p)), p.name

        case(f"image-{_fmt}-truncated-{_frac}")(_b)


def _tif(tmp: Path, arr: np.ndarray) -> Path:
    import tifffile

    p = tmp / "t.tif"
    tifffile.imwrite(p, arr, photometric="minisblack" if arr.ndim == 3 else None)
    return p


for _k, _arr in {
    "nan": np.full((4, 4), np.nan, np.float32),
    "inf": np.full((4, 4), np.inf, np.float32),
    "pages": np.zeros((3, 5, 6), np.uint16),
    "complex": np.zeros((4, 4), np.complex64),
    "1d": np.zeros((1, 1, 5, 5, 2), np.uint8),
}.items():

    def _b(tmp: Path, a=_arr):
        p = _tif(tmp, a)
        return (lambda: load_image(p)), "t.tif"

    case(f"image-tif-{_k}")(_b)


def _b_png_text(tmp: Path):
    p = _write(tmp / "x.png", b"hello")
    return (lambda: load_image(p)), "x.png"


case("image-text-as-png")(_b_png_text)


def _write(p: Path, b: bytes) -> Path:
    p.write_bytes(b)
    return p


# ------------------------------------------------------------------ k-space masks (in memory)
MASKS = {
    "1d": (6,),
    "wrong-ky": (1, 7, 6),
    "wrong-kx": (1, 8, 5),
    "z-3": (3, 8, 6),
    "4d": (1, 1, 8, 6),
    "transposed": (6, 8),
    "scalar": (),
    "coils": (3, 2, 8, 6),
}
for _k, _shape in MASKS.items():
    case(f"mask-{_k}")(
        lambda tmp, s=_shape: (
            (lambda: KSpace(_K.transpose(1, 0, 2, 3), mask=np.ones(s, bool))),
            "mask",
        )
    )
case("kspace-3d")(lambda tmp: ((lambda: KSpace(_K[0])), "KSpace"))
case("coil-maps-shape")(
    lambda tmp: ((lambda: KSpace(_K, coil_maps=np.ones((3, 8, 6)))), "coil_maps")
)


# ------------------------------------------------------------------ writers given NaN / Inf
_BAD = np.ones((2, 4, 5), np.float32)
_BAD[1, 2, 3] = np.nan
_WRITERS = {
    "nifti": lambda tmp, a: save_nifti(Volume(a, np.eye(4), "CT"), tmp / "o.nii.gz"),
    "nifti-std": lambda tmp, a: save_nifti(
        Volume(np.ones_like(a), np.eye(4), "CT"), tmp / "o.nii.gz", std=a
    ),
    "dicom": lambda tmp, a: save_dicom_series(Volume(a, np.eye(4), "CT"), tmp / "o", method="x"),
    "dicom-mr": lambda tmp, a: save_dicom_series(Volume(a, np.eye(4), "MR"), tmp / "o", method="x"),
    "sinogram": lambda tmp, a: save_sinogram(
        Sinogram(a, {"type": "parallel", "angles_rad": [0, 1, 2, 3], "n_detectors": 5}), tmp / "o"
    ),
    "fastmri-reference": lambda tmp, a: save_fastmri(
        tmp / "o.h5", KSpace(_K), reference=np.full((2, 8, 6), np.nan)
    ),
}
for _k, _w in _WRITERS.items():
    for _v in ("nan", "inf"):

        def _b(tmp: Path, w=_w, v=_v):
            a = _BAD.copy()
            a[1, 2, 3] = float(v)
            return (lambda: w(tmp, a)), ""

        case(f"writer-{_k}-{_v}")(_b)


# ------------------------------------------------------------------ the test
def _snapshot(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_fuzz_case_count():
    assert len(CASES) >= 300, len(CASES)
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("fuzz", CASES, ids=lambda c: c.name)
def test_fuzz(fuzz: Case, tmp_path: Path):
    action, expect = fuzz.build(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(MedreconError) as err:
        action()
    message = str(err.value)
    assert expect in message, message
    assert "Traceback" not in message and PATIENT_NAME not in message
    assert _snapshot(tmp_path) == before  # nothing written, nothing left behind
