"""fastMRI HDF5 files: read single- and multi-coil k-space, write the same layout from simulations.

fastMRI layout (one file per volume):

* ``kspace``: complex64, ``(slices, height, width)`` single-coil or ``(slices, coils, height,
  width)`` multi-coil; height = readout, width = phase encoding;
* ``ismrmrd_header``: the ISMRMRD XML header (bytes);
* ``reconstruction_esc`` (single-coil) / ``reconstruction_rss`` (multi-coil): float32
  ``(slices, H, W)`` reference images (absent in test / challenge files);
* ``mask`` (optional, test files): ``(width,)`` sampled phase-encode lines;
* attributes ``acquisition``, ``max``, ``norm``, ``patient_id`` (plus ``acceleration`` and
  ``num_low_frequency`` in test files).

:class:`KSpace` keeps the array layout: ``data[c, z] = kspace[z, c]`` (``ky`` = height rows,
``kx`` = width columns), so the fastMRI mask is along the last axis.  The attributes and the
XML header go to ``KSpace.header`` (``header["attrs"]``, ``header["ismrmrd_header"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medrecon.datasets._atomic import atomic_files
from medrecon.datasets.types import KSpace, Volume
from medrecon.errors import InputError, ShapeError

__all__ = ["load_fastmri", "load_fastmri_reference", "save_fastmri", "ismrmrd_header"]

_RECON_KEYS = ("reconstruction_rss", "reconstruction_esc")


def _open(path: str | Path) -> Any:
    import h5py

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such file")
    try:
        return h5py.File(p, "r")
    except Exception as err:  # noqa: BLE001 - h5py raises OSError / ValueError on broken files
        raise InputError(
            p, f"not a readable HDF5 file ({type(err).__name__}: {str(err)[:200]})"
        ) from err


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def load_fastmri(path: str | Path, *, slices: slice | None = None) -> KSpace:
    """Read the k-space of a fastMRI file.

    Parameters
    ----------
    path : str or Path
        fastMRI ``.h5`` file.
    slices : slice, optional
        Read only these slices (default: all).

    Returns
    -------
    KSpace
        ``data`` (coils, Z, height, width) complex64 (coils = 1 for single-coil files); ``mask``
        from the ``mask`` dataset when present, else the non-zero phase-encode columns;
        ``header`` with ``attrs``, ``ismrmrd_header`` (str or None) and ``layout``
        (``"singlecoil"`` / ``"multicoil"``).

    Raises
    ------
    InputError
        Not HDF5, no ``kspace`` dataset, wrong dimensions or dtype, a mask of the wrong shape,
        NaN / Inf values.
    """
    p = Path(path)
    with _open(p) as hf:
        if "kspace" not in hf:
            raise InputError(p, f"no 'kspace' dataset (found {sorted(hf.keys())})")
        ds = hf["kspace"]
        if ds.ndim not in (3, 4) or 0 in ds.shape:
            raise InputError(
                p, f"'kspace' must be (slices, [coils,] height, width); got shape {ds.shape}"
            )
        if ds.dtype.kind != "c":
            raise InputError(p, f"'kspace' must be complex; got {ds.dtype}")
        try:
            k = np.asarray(ds[slices if slices is not None else slice(None)], dtype=np.complex64)
            mask = np.asarray(hf["mask"][()]) if "mask" in hf else None
            xml = hf["ismrmrd_header"][()] if "ismrmrd_header" in hf else None
            attrs = {key: _attr(v) for key, v in hf.attrs.items()}
        except Exception as err:  # noqa: BLE001
            raise InputError(
                p, f"cannot read datasets ({type(err).__name__}: {str(err)[:200]})"
            ) from err
    if not np.all(np.isfinite(k.view(np.float32))):
        raise InputError(p, "'kspace' contains NaN or Inf values")
    layout = "multicoil" if k.ndim == 4 else "singlecoil"
    data = k.transpose(1, 0, 2, 3) if k.ndim == 4 else k[None]
    width = data.shape[-1]
    if mask is not None:
        mask = mask.astype(bool).reshape(-1) if mask.size == width else None
        if mask is None:
            raise InputError(p, f"'mask' must have {width} entries (one per phase-encode column)")
        mask2d = np.broadcast_to(mask[None, None, :], (1, data.shape[2], width))
    else:
        mask2d = np.broadcast_to(
            np.any(data != 0, axis=(0, 1, 2))[None, None, :], (1, data.shape[2], width)
        )
    if isinstance(xml, bytes | np.bytes_):
        xml = xml.decode("utf-8", "replace")
    header = {"attrs": attrs, "ismrmrd_header": xml, "layout": layout, "source": str(p)}
    return KSpace(np.ascontiguousarray(data), mask=mask2d.copy(), header=header)


def load_fastmri_reference(path: str | Path, *, slices: slice | None = None) -> Volume | None:
    """Read the reference reconstruction (``reconstruction_rss`` or ``_esc``), or None if absent.

    Returns
    -------
    Volume or None
        ``array`` (slices, H, W) float32 magnitude, identity affine, modality ``"MR"``.
    """
    p = Path(path)
    with _open(p) as hf:
        key = next((k for k in _RECON_KEYS if k in hf), None)
        if key is None:
            return None
        arr = np.asarray(hf[key][slices if slices is not None else slice(None)], dtype=np.float32)
    if arr.ndim != 3 or not np.all(np.isfinite(arr)):
        raise InputError(p, f"'{key}' must be finite (slices, H, W); got shape {arr.shape}")
    return Volume(arr, np.eye(4), "MR", {"source": str(p), "fastmri_key": key})


def ismrmrd_header(
    height: int,
    width: int,
    *,
    fov_mm: tuple[float, float] = (220.0, 220.0),
    recon_size: tuple[int, int] | None = None,
) -> str:
    """Minimal ISMRMRD XML header that fastMRI's ``SliceDataset`` can parse.

    ``encodedSpace`` is (x = height readout, y = width phase encoding); the phase-encode
    limits are centred.  ``recon_size`` (H, W) defaults to the encoded size.
    """
    rh, rw = recon_size if recon_size is not None else (height, width)
    fx, fy = fov_mm
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
        "<encoding><trajectory>cartesian</trajectory>"
        f"<encodedSpace><matrixSize><x>{height}</x><y>{width}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{fx}</x><y>{fy}</y><z>1</z></fieldOfView_mm></encodedSpace>"
        f"<reconSpace><matrixSize><x>{rh}</x><y>{rw}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{fx}</x><y>{fy}</y><z>1</z></fieldOfView_mm></reconSpace>"
        "<encodingLimits>"
        f"<kspace_encoding_step_1><minimum>0</minimum><maximum>{width - 1}</maximum>"
        f"<center>{width // 2}</center></kspace_encoding_step_1>"
        "</encodingLimits></encoding>"
        "<acquisitionSystemInformation><systemVendor>medrecon simulation</systemVendor>"
        "</acquisitionSystemInformation></ismrmrdHeader>"
    )


def save_fastmri(
    path: str | Path,
    kspace: KSpace,
    *,
    reference: np.ndarray | Volume | None = None,
    case_id: str = "simulated",
    acquisition: str = "SIMULATED",
    attrs: dict[str, Any] | None = None,
    write_mask: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``kspace`` as a fastMRI-style ``.h5`` file.

    Parameters
    ----------
    path : str or Path
        Output ``.h5`` file.
    kspace : KSpace
        One coil → single-coil layout with ``reconstruction_esc``; several → multi-coil with
        ``reconstruction_rss``.  The mask must be the same for every row (fastMRI masks columns).
    reference : ndarray (Z, H, W) or Volume, optional
        Ground-truth magnitude images.
    case_id : str
        Stored as the ``patient_id`` attribute: a case ID, never a patient name.
    acquisition : str
        ``acquisition`` attribute.
    attrs : dict, optional
        Extra attributes (e.g. ``acceleration``, ``num_low_frequency``, ``seed``).
    write_mask : bool
        Store the ``mask`` dataset (as fastMRI test files do).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        The written file.
    """
    import h5py

    data = kspace.data * kspace.mask[None]
    c, nz, h, w = data.shape
    col_mask = kspace.mask.any(axis=(0, 1))
    if write_mask and not np.array_equal(kspace.mask, np.broadcast_to(col_mask, kspace.mask.shape)):
        raise ShapeError(
            "save_fastmri(): fastMRI masks select whole columns; this mask varies along rows"
        )
    ref = reference.array if isinstance(reference, Volume) else reference
    if ref is not None:
        ref = np.asarray(ref, dtype=np.float32)
        if ref.ndim != 3 or ref.shape[0] != nz:
            raise ShapeError(f"save_fastmri(): reference must be ({nz}, H, W); got {ref.shape}")
    k = data[0] if c == 1 else data.transpose(1, 0, 2, 3)
    recon_size = ref.shape[1:] if ref is not None else None
    with atomic_files([path], overwrite=overwrite) as (tmp,):
        with h5py.File(tmp, "w") as hf:
            hf.create_dataset("kspace", data=np.ascontiguousarray(k, dtype=np.complex64))
            hf.create_dataset(
                "ismrmrd_header", data=np.bytes_(ismrmrd_header(h, w, recon_size=recon_size))
            )
            if write_mask:
                hf.create_dataset("mask", data=col_mask.astype(np.float32))
            if ref is not None:
                hf.create_dataset(
                    "reconstruction_esc" if c == 1 else "reconstruction_rss", data=ref
                )
                hf.attrs["max"] = float(ref.max())
                hf.attrs["norm"] = float(np.linalg.norm(ref))
            hf.attrs["acquisition"] = acquisition
            hf.attrs["patient_id"] = case_id
            for key, v in (attrs or {}).items():
                hf.attrs[key] = v
    return Path(path)
