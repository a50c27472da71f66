"""BART ``.cfl`` / ``.hdr`` files (complex64, column-major, text header with the dimensions).

A BART array has up to 16 dimensions: 0–2 spatial (READ, PHS1, PHS2), 3 coils, 13 slices, the
others (maps, echoes, time, ...) are not used by medrecon's k-space reader.  Mapping to
:class:`~medrecon.datasets.types.KSpace` ``(coils, Z, ky, kx)``:

* the non-singleton spatial dimensions, in order, are ``kx`` then ``ky`` (BART's standard 2-D
  layout is ``kx`` = dim 0, ``ky`` = dim 1; data with dim 0 = 1, such as a readout-transformed
  3-D acquisition, uses dims 1 and 2);
* dim 3 → coils, dim 13 (SLICE) → Z;
* three non-singleton spatial dimensions are 3-D k-space: dim 2 is inverse-Fourier-transformed
  (centred, orthonormal) into Z slices, ``header["kz_transformed"] = True``.

:func:`save_bart_kspace` writes ``kx`` → dim 0, ``ky`` → dim 1, coils → dim 3, Z → dim 13.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medrecon.datasets._atomic import atomic_files
from medrecon.datasets.types import KSpace
from medrecon.errors import InputError, ShapeError

__all__ = ["read_cfl", "write_cfl", "load_bart_kspace", "save_bart_kspace"]

COIL_DIM, SLICE_DIM = 3, 13


def _base(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".cfl", ".hdr") else p


def read_cfl(path: str | Path) -> np.ndarray:
    """Read a BART array.

    Parameters
    ----------
    path : str or Path
        ``name``, ``name.cfl`` or ``name.hdr``.

    Returns
    -------
    ndarray, complex64
        Shape = the header's dimensions (trailing singletons kept), column-major like BART.

    Raises
    ------
    InputError
        Missing files, a header without dimensions, a data file of the wrong size, NaN / Inf.
    """
    base = _base(path)
    hdr, cfl = base.with_suffix(".hdr"), base.with_suffix(".cfl")
    for f in (hdr, cfl):
        if not f.is_file():
            raise InputError(f, "no such file (BART arrays need both .hdr and .cfl)")
    try:
        lines = hdr.read_text(encoding="ascii").splitlines()
        dims = [int(x) for x in lines[lines.index("# Dimensions") + 1].split()]
    except (ValueError, IndexError, UnicodeDecodeError) as err:
        raise InputError(hdr, "header has no valid '# Dimensions' line") from err
    if not dims or any(d < 1 for d in dims) or len(dims) > 32:
        raise InputError(hdr, f"impossible dimensions {dims}")
    n = int(np.prod(dims, dtype=np.int64))
    size = cfl.stat().st_size
    if size != 8 * n:
        raise InputError(cfl, f"holds {size} bytes; dimensions {dims} need {8 * n} (complex64)")
    data = np.fromfile(cfl, dtype="<c8").reshape(dims, order="F")
    if not np.all(np.isfinite(data)):
        raise InputError(cfl, "contains NaN or Inf values")
    return data


def write_cfl(path: str | Path, array: np.ndarray, *, overwrite: bool = False) -> list[Path]:
    """Write ``array`` (any shape, ≤ 16 dims, cast to complex64) as ``path.hdr`` + ``path.cfl``."""
    base = _base(path)
    a = np.asarray(array)
    if a.ndim > 16:
        raise ShapeError(f"write_cfl(): BART arrays have at most 16 dimensions; got {a.ndim}")
    dims = list(a.shape) + [1] * (16 - a.ndim)
    targets = [base.with_suffix(".hdr"), base.with_suffix(".cfl")]
    with atomic_files(targets, overwrite=overwrite) as (hdr, cfl):
        hdr.write_text("# Dimensions\n" + " ".join(str(d) for d in dims) + " \n", encoding="ascii")
        with open(cfl, "wb") as fh:
            fh.write(np.asarray(a, dtype="<c8").ravel(order="F").tobytes())
    return targets


def _ifftc(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.fft.ifftshift(x, axes=axis)
    return np.fft.fftshift(np.fft.ifft(x, axis=axis, norm="ortho"), axes=axis)


def load_bart_kspace(path: str | Path) -> KSpace:
    """Read BART k-space into a :class:`KSpace` (layout mapping in the module docstring).

    Parameters
    ----------
    path : str or Path
        ``name``, ``name.cfl`` or ``name.hdr``.

    Returns
    -------
    KSpace
        ``data`` (coils, Z, ky, kx) complex64; ``mask`` = non-zero samples of the first coil
        (BART stores unsampled points as zeros); ``header["bart_dims"]``.

    Raises
    ------
    InputError
        See :func:`read_cfl`; also data in dimensions other than space, coils and slices.
    """
    data = read_cfl(path)
    dims = list(data.shape) + [1] * (16 - data.ndim)
    data = data.reshape(dims, order="F")
    extra = [d for d in range(16) if d not in (0, 1, 2, COIL_DIM, SLICE_DIM) and dims[d] > 1]
    if extra:
        raise InputError(
            _base(path).with_suffix(".hdr"),
            f"k-space uses BART dimensions {extra} (sizes {[dims[d] for d in extra]}); "
            "only space (0-2), coils (3) and slices (13) are supported",
        )
    arr = data.reshape(dims[:4] + [dims[SLICE_DIM]], order="F")  # (d0, d1, d2, coils, slices)
    header = {"bart_dims": dims, "kz_transformed": False}
    spatial = [d for d in range(3) if dims[d] > 1]
    if len(spatial) == 3:
        if dims[SLICE_DIM] > 1:
            raise InputError(
                _base(path).with_suffix(".hdr"), "3-D k-space with several slices is not supported"
            )
        arr = _ifftc(arr, axis=2)
        header["kz_transformed"] = True
        kx, ky, z = 0, 1, 2
    else:
        while len(spatial) < 2:
            spatial.append(next(d for d in range(3) if d not in spatial))
        kx, ky = sorted(spatial)[:2]
        z = next(d for d in range(3) if d not in (kx, ky))  # size 1
    # (kx, ky, z, coils, slices) -> (coils, z*slices, ky, kx)
    arr = np.moveaxis(arr, (3, z, 4, ky, kx), (0, 1, 2, 3, 4))
    c, nz, ns, nky, nkx = arr.shape
    arr = arr.reshape(c, nz * ns, nky, nkx)
    return KSpace(
        np.ascontiguousarray(arr, dtype=np.complex64), mask=np.any(arr != 0, axis=0), header=header
    )


def save_bart_kspace(kspace: KSpace, path: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write a :class:`KSpace` as BART k-space: kx → dim 0, ky → dim 1, coils → 3, Z → 13.

    Unsampled points (``mask`` False) are written as zeros, as BART expects.
    """
    d = kspace.data * kspace.mask[None]
    c, nz, nky, nkx = d.shape
    out = np.zeros([nkx, nky, 1, c] + [1] * 9 + [nz], dtype=np.complex64)
    index = (slice(None), slice(None), 0, slice(None)) + (0,) * 9 + (slice(None),)
    out[index] = d.transpose(3, 2, 0, 1)
    return write_cfl(path, out, overwrite=overwrite)
