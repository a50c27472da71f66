"""NIfTI-1/2 read and write with the affine preserved.

RAS convention: NIfTI stores voxel → world as RAS+ millimetres (+x Right, +y Anterior,
+z Superior) for the data array in ``(X, Y, Z)`` order.  ``Volume`` keeps that affine unchanged and
stores the array transposed to ``(Z, Y, X)``, so ``volume.affine @ [x, y, z, 1]`` is the position of
``volume.array[z, y, x]`` -- the same affine you would get from nibabel.  The reader takes the
sform when its code is non-zero, else the qform (nibabel's ``img.affine``).  The writer sets the
sform (code 1, scanner) and also the qform when the affine has no shear.

One affine places slices at equal steps.  When a volume's exact slice positions
(``meta["dicom"]["slice_positions_lps"]``, e.g. an unevenly spaced DICOM series or a subset of one)
are not on the affine's grid, the writer says so with a :class:`GeometryWarning` naming the file
and the spacing spread, and stores the exact positions (RAS+ mm) in a JSON header extension
(code 6, comment) that :func:`load_nifti` reads back.

Uncertainty maps go beside the image as ``<name>_std.nii.gz`` (:func:`std_path`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from medrecon.datasets._atomic import atomic_files
from medrecon.datasets.slices import slice_positions_lps, uneven_spacing
from medrecon.datasets.types import LPS_TO_RAS, GeometryWarning, Volume
from medrecon.errors import InputError, ShapeError

__all__ = ["load_nifti", "save_nifti", "std_path"]


def std_path(path: str | Path) -> Path:
    """``/a/b/case.nii.gz`` → ``/a/b/case_std.nii.gz`` (the uncertainty map's file name)."""
    p = Path(path)
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return p.with_name(name[: -len(ext)] + "_std" + ext)
    raise InputError(p, "expected a .nii or .nii.gz file name")


def load_nifti(path: str | Path, *, modality: str | None = None) -> Volume:
    """Read a 2-D or 3-D NIfTI image (a 4-D one only with a single volume).

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.
    modality : str, optional
        ``"CT"``, ``"MR"`` or ``"OT"``.  Default: what medrecon wrote into ``descrip``, else ``"OT"``.

    Returns
    -------
    Volume
        ``array`` (Z, Y, X) float32 (scl_slope / scl_inter applied), ``affine`` as in the file.

    Raises
    ------
    InputError
        Unreadable or truncated file, impossible dimensions, more than one volume, NaN / Inf.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = save_nifti(Volume(np.zeros((2, 3, 4)), np.diag([2.0, 2.0, 3.0, 1.0]), "CT"), d / "x.nii.gz")
    >>> load_nifti(d / "x.nii.gz").shape
    (2, 3, 4)
    """
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such file")
    try:
        img = nib.load(p)
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(p, f"not a NIfTI image ({type(img).__name__})")
        shape = tuple(int(s) for s in img.shape)
        if (
            not 2 <= len(shape) <= 4
            or any(s <= 0 for s in shape)
            or (len(shape) == 4 and shape[3] != 1)
        ):
            raise InputError(p, f"expected a 2-D or 3-D image; got dimensions {shape}")
        _check_header(p, _raw_header(p), len(shape))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
        descrip = img.header.get("descrip")
        extra = _read_extension(img)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel / gzip / numpy errors on broken files
        raise InputError(
            p, f"unreadable NIfTI file ({type(err).__name__}: {str(err)[:200]})"
        ) from err
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if not np.all(np.isfinite(data)):
        raise InputError(p, f"{int(np.sum(~np.isfinite(data)))} voxels are NaN or Inf")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(p, "affine is singular or not finite")
    if modality is None:
        text = (
            bytes(np.asarray(descrip).tobytes()).split(b"\0")[0].decode("latin-1")
            if descrip is not None
            else ""
        )
        modality = text.split("modality=")[1].split()[0] if "modality=" in text else "OT"
    meta: dict[str, object] = {"source": str(p)}
    ras = extra.get("slice_positions_ras_mm")
    if isinstance(ras, list) and len(ras) == data.shape[2]:
        try:
            lps = (np.asarray(ras, dtype=np.float64) * np.diag(LPS_TO_RAS)[:3]).tolist()
        except (TypeError, ValueError):
            lps = None
        if lps is not None:
            meta["dicom"] = {"slice_positions_lps": lps}
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), affine, modality, meta)


_EXTENSION_KEY = "medrecon"


def _read_extension(img: object) -> dict:
    """medrecon's JSON comment extension (``{"medrecon": {...}}``), or {}."""
    for ext in getattr(img.header, "extensions", []):  # type: ignore[attr-defined]
        if ext.get_code() != 6:
            continue
        try:
            content = json.loads(bytes(ext.get_content()).rstrip(b"\0").decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(content, dict) and isinstance(content.get(_EXTENSION_KEY), dict):
            return content[_EXTENSION_KEY]
    return {}


def _raw_header(p: Path) -> object:
    """Read the header as stored (nibabel's loaded header has already been repaired)."""
    import gzip

    import nibabel as nib

    opener = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "rb") as fh:
        head = fh.read(4)
        fh.seek(0)
        sizes = (
            {int(np.frombuffer(head, "<i4")[0]), int(np.frombuffer(head, ">i4")[0])}
            if len(head) == 4
            else set()
        )
        cls = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
        return cls.from_fileobj(fh, check=False)


def _check_header(p: Path, hdr: object, ndim: int) -> None:
    """Reject what nibabel would silently repair: wrong header size, ±Inf scaling, zero voxels."""
    size = int(hdr["sizeof_hdr"])  # type: ignore[index]
    if size not in (348, 540):
        raise InputError(
            p, f"sizeof_hdr is {size}; a NIfTI header has 348 (NIfTI-1) or 540 (NIfTI-2)"
        )
    for key in ("scl_slope", "scl_inter"):
        v = float(hdr[key])  # type: ignore[index]
        if np.isinf(v):
            raise InputError(p, f"{key} is {v}")
    pixdim = np.asarray(hdr["pixdim"], dtype=np.float64)[1 : min(ndim, 3) + 1]  # type: ignore[index]
    if int(hdr["sform_code"]) == 0 and (np.any(pixdim == 0) or not np.all(np.isfinite(pixdim))):  # type: ignore[index]
        raise InputError(
            p, f"voxel sizes (pixdim) {pixdim.tolist()} include zero or non-finite values"
        )


def _image(volume: Volume, path: Path, simulated: str | None, cautions: tuple[str, ...] = ()) -> object:
    import nibabel as nib

    arr = np.asarray(volume.array, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ShapeError("save_nifti(): volume holds NaN or Inf values")
    img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), volume.affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(volume.affine, code=1)
    m = volume.affine[:3, :3]
    gram = m.T @ m
    if np.allclose(gram, np.diag(np.diag(gram)), atol=1e-6 * np.max(np.abs(gram))):
        img.set_qform(volume.affine, code=1)
    else:
        img.set_qform(None, code=0)
    descrip = f"medrecon modality={volume.modality}"
    extra: dict[str, object] = {}
    if simulated is not None:
        descrip += f" SIMULATED {simulated}"
        extra["simulated"] = f"reconstruction of a measurement simulated from images ({simulated})"
    if cautions:
        descrip += " CAUTION: see header extension"
        extra["cautions"] = list(cautions)
    img.header["descrip"] = descrip.encode("ascii", "replace")[:79]
    spread = uneven_spacing(volume)
    if spread is not None:
        pos, _ = slice_positions_lps(volume)
        extra["slice_positions_ras_mm"] = (pos * np.diag(LPS_TO_RAS)[:3]).round(4).tolist()
        warnings.warn(
            f"{path}: unevenly spaced slices (gaps {spread['gap_min_mm']:.3f}-"
            f"{spread['gap_max_mm']:.3f} mm); a NIfTI affine holds one step "
            f"({spread['step_mm']:.3f} mm), so slices between the first and last are up to "
            f"{spread['max_offset_mm']:.2f} mm from their true positions.  The exact positions are "
            "in the file's header extension; DICOM output writes them per slice.",
            GeometryWarning,
            stacklevel=3,
        )
    if extra:
        text = json.dumps({_EXTENSION_KEY: extra}).encode()
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, text))
    return img


def save_nifti(
    volume: Volume,
    path: str | Path,
    *,
    std: Volume | np.ndarray | None = None,
    overwrite: bool = False,
    simulated: str | None = None,
    cautions: tuple[str, ...] | list[str] = (),
) -> list[Path]:
    """Write ``volume`` (and optionally its uncertainty map) as float32 NIfTI-1.

    Parameters
    ----------
    volume : Volume
        Image (Z, Y, X) with its RAS+ affine.
    path : str or Path
        ``.nii`` or ``.nii.gz`` file name.
    std : Volume or ndarray (Z, Y, X), optional
        Pixel-wise posterior standard deviation, written to :func:`std_path` with the same affine.
    overwrite : bool
        Replace existing files (otherwise :class:`InputError` before anything is written).
    simulated : str, optional
        The image is a reconstruction of a measurement simulated from images; this text names
        the settings and goes into ``descrip`` (after ``SIMULATED``) and the header extension.
    cautions : sequence of str
        Lines a reader of the file must see (the input is outside the prior's domain; the map is
        sampling spread, not error): ``descrip`` says ``CAUTION`` and the header extension holds
        them.

    Returns
    -------
    list of Path
        The written files.

    Warns
    -----
    GeometryWarning
        The exact slice positions are not on the affine's grid (uneven spacing); the message
        names the file and the spacing spread.
    """
    import nibabel as nib

    p = Path(path)
    targets = [p] if std is None else [p, std_path(p)]
    if std is None:
        std_path(p)  # validates the extension
    images = [_image(volume, p, simulated, tuple(cautions))]
    if std is not None:
        s = std.array if isinstance(std, Volume) else np.asarray(std)
        if s.shape != volume.shape:
            raise ShapeError(
                f"save_nifti(): std must have the volume's shape {volume.shape}; got {s.shape}"
            )
        images.append(
            _image(Volume(s, volume.affine, volume.modality, volume.meta), std_path(p), simulated, tuple(cautions))
        )
    with atomic_files(targets, overwrite=overwrite) as temps:
        for img, tmp in zip(images, temps, strict=True):
            nib.save(img, tmp)
    return targets
