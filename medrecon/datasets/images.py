"""Folders of 2-D images (PNG, JPEG, TIFF) for training data.

Images are read as single-channel float32 in their stored units (8-bit 0–255, 16-bit 0–65535,
float TIFFs as stored); colour images are converted to luminance (ITU-R 601-2 weights).  The
files carry no geometry, so a folder loaded as a Volume gets an identity affine (1 mm voxels).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medrecon.datasets.types import Volume
from medrecon.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "list_image_files", "load_image", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _natural_key(p: Path) -> list[object]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(p))]


def list_image_files(folder: str | Path, *, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` in natural order (``img2`` before ``img10``).

    Raises
    ------
    InputError
        ``folder`` is not a folder or holds no image file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(root, "no such folder")
    it = root.rglob("*") if recursive else root.iterdir()
    files = sorted(
        (
            p
            for p in it
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        ),
        key=_natural_key,
    )
    if not files:
        raise InputError(root, f"no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _check_complete(p: Path) -> None:
    """PNG must end with its IEND chunk and JPEG with EOI: decoders accept some truncated files."""
    suffix = p.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        return
    with open(p, "rb") as fh:
        fh.seek(max(0, p.stat().st_size - 64))
        tail = fh.read().rstrip(b"\0")
    if suffix == ".png" and b"IEND" not in tail[-12:]:
        raise InputError(p, "PNG file is truncated (no IEND chunk at the end)")
    if suffix != ".png" and not tail.endswith(b"\xff\xd9"):
        raise InputError(p, "JPEG file is truncated (no end-of-image marker)")


def load_image(path: str | Path) -> np.ndarray:
    """Read one image as a float32 (H, W) array in its stored units.

    Raises
    ------
    InputError
        Unreadable or truncated file, multi-page TIFF, more than 2-D after colour conversion,
        NaN / Inf values.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such file")
    _check_complete(p)
    try:
        if p.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(p) as tif:
                if len(tif.pages) != 1:
                    raise InputError(p, f"TIFF with {len(tif.pages)} pages; expected one 2-D image")
                page = tif.pages[0]
                arr = np.asarray(page.asarray())
                if arr.ndim == 3 and int(page.photometric) != 2:  # 2 = RGB
                    raise InputError(
                        p, f"TIFF holds a stack of shape {arr.shape}; expected one 2-D image"
                    )
        else:
            from PIL import Image

            with Image.open(p) as im:
                im.load()
                if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr"):
                    im = im.convert("RGB")
                arr = np.asarray(im)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL / tifffile raise many types on broken files
        raise InputError(p, f"unreadable image ({type(err).__name__}: {str(err)[:200]})") from err
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].astype(np.float32) @ _LUMA
    if arr.ndim != 2 or 0 in arr.shape:
        raise InputError(
            p, f"expected one 2-D greyscale or colour image; got array shape {arr.shape}"
        )
    if arr.dtype.kind == "c":
        raise InputError(p, "complex-valued image")
    out = arr.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise InputError(p, "contains NaN or Inf values")
    return out


def load_image_folder(
    folder: str | Path, *, modality: str = "OT", recursive: bool = True
) -> Volume:
    """Stack every image in a folder (natural order) into a Volume (Z = number of files).

    Raises
    ------
    InputError
        No images, or images of different sizes (names the first mismatching file).
    """
    files = list_image_files(folder, recursive=recursive)
    first = load_image(files[0])
    stack = [first]
    for f in files[1:]:
        a = load_image(f)
        if a.shape != first.shape:
            raise InputError(
                f, f"image size {a.shape} differs from {files[0].name}'s {first.shape}"
            )
        stack.append(a)
    return Volume(
        np.stack(stack),
        np.eye(4),
        modality,
        {"source": str(folder), "files": [str(f) for f in files]},
    )
