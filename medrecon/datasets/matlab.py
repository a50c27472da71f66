"""MATLAB ``.mat`` k-space: v7.3 (HDF5) files through h5py, v4–v7 files through scipy.

MATLAB stores arrays column-major.  Read in MATLAB's own index order, a k-space variable is
``(rows, columns[, slices][, coils])``: the image MATLAB shows with ``imagesc`` has ``rows``
vertical, so ``rows`` → ``ky`` and ``columns`` → ``kx`` of :class:`KSpace` ``(coils, Z, ky, kx)``.
The default layouts by number of dimensions are

====  ===========================  =====================================
dims  MATLAB size                  ``layout``
====  ===========================  =====================================
2     (rows, cols)                 ``"yx"``   (one coil, one slice)
3     (rows, cols, coils)          ``"yxc"``  (one slice)
4     (rows, cols, slices, coils)  ``"yxzc"``
====  ===========================  =====================================

MATLAB drops trailing singleton dimensions, so a one-coil stack of slices saved as
``(rows, cols, slices, 1)`` arrives as 3-D and would be read as coils: pass ``layout="yxz"``.

v7.3 files are HDF5 with a 512-byte MATLAB header: h5py sees every array with its dimensions
reversed, and complex arrays as a compound type with ``real`` and ``imag`` fields; both are undone
here.  Older files (v4, v5/v6/v7) are read with :func:`scipy.io.loadmat`.

Which variable is the k-space: ``variable=`` when given; else the complex array named like
k-space (:data:`KSPACE_NAMES`, case-insensitive); else the only complex 2-4-D array that is not
named like coil maps.  Optional companions: a sampling mask (:data:`MASK_NAMES`; real or logical,
``(rows, cols)``, ``(rows, cols, slices)``, the k-space's size, or a vector over the columns) and
coil sensitivities (:data:`MAPS_NAMES`; complex, the k-space's size).  Without a mask, the
sampled points are the non-zero ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medrecon.datasets._atomic import atomic_files
from medrecon.datasets._matlab_v5 import BrokenMatFile, check_v5
from medrecon.datasets.types import KSpace
from medrecon.errors import InputError, ShapeError

__all__ = ["load_matlab_kspace", "list_matlab_variables", "save_matlab_kspace", "load_matlab_array", "KSPACE_NAMES",
           "MASK_NAMES", "MAPS_NAMES"]

#: variable names taken for k-space (case-insensitive), in order of preference
KSPACE_NAMES = ("kspace", "k_space", "ksp", "kdata", "k_data", "raw", "raw_data", "rawdata", "data", "k")
#: variable names taken for a sampling mask
MASK_NAMES = ("mask", "sampling_mask", "samp_mask", "us_mask", "undersampling_mask")
#: variable names taken for coil sensitivity maps
MAPS_NAMES = ("sens", "sensitivities", "sensitivity", "smaps", "maps", "coil_maps", "csm", "b1")

_DEFAULT_LAYOUT = {2: "yx", 3: "yxc", 4: "yxzc"}
_V73_MAGIC = b"MATLAB 7.3 MAT-file"
_EXPECTED = ("a complex array of 2-4 dimensions, MATLAB size (rows, cols[, slices][, coils]), named "
             + ", ".join(KSPACE_NAMES[:-1]) + " or " + KSPACE_NAMES[-1] + ", or the only complex array")


class _Var:
    """A variable found in the file: its MATLAB size and class, and how to read it."""

    def __init__(self, name: str, shape: tuple[int, ...], cls: str, is_complex: bool, read: Any):
        self.name, self.shape, self.cls, self.is_complex, self.read = name, shape, cls, is_complex, read

    def __str__(self) -> str:
        size = "×".join(str(s) for s in self.shape) or "empty"
        return f"{self.name} ({size} {'complex ' if self.is_complex else ''}{self.cls})"

    @property
    def numeric(self) -> bool:
        return self.cls not in ("char", "cell", "struct", "function_handle", "empty", "sparse", "object") \
            and 0 not in self.shape and len(self.shape) >= 1


def _max_bytes() -> int:
    """Arrays larger than half the machine's memory are refused before they are read."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 1 << 34


def _bytes_of(shape: tuple[int, ...], itemsize: int) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * int(itemsize)


# ------------------------------------------------------------------ v7.3 (HDF5)
def _h5_class(obj: Any) -> str:
    cls = obj.attrs.get("MATLAB_class", b"")
    return (cls.decode("ascii", "replace") if isinstance(cls, bytes | np.bytes_) else str(cls)) or "?"


def _h5_vars(group: Any, prefix: str, depth: int, out: list[_Var]) -> None:
    import h5py

    for key in sorted(group.keys()):
        if key.startswith("#"):  # '#refs#', '#subsystem#': MATLAB's internal storage
            continue
        if isinstance(group.get(key, getlink=True), h5py.ExternalLink):  # never open other files
            continue
        obj = group.get(key)
        name = f"{prefix}{key}"
        cls = _h5_class(obj)
        if isinstance(obj, h5py.Group):
            if cls == "struct" and depth < 3:
                _h5_vars(obj, f"{name}.", depth + 1, out)
            else:
                out.append(_Var(name, (), "sparse" if "MATLAB_sparse" in obj.attrs else cls, False, None))
            continue
        if not isinstance(obj, h5py.Dataset):
            continue
        if "MATLAB_empty" in obj.attrs and obj.attrs["MATLAB_empty"]:
            out.append(_Var(name, (), "empty", False, None))
            continue
        dt = obj.dtype
        fields = dt.names or ()
        is_complex = dt.kind == "c" or {"real", "imag"} <= set(fields)
        if cls == "?" and dt.kind in "fiub":
            cls = str(dt)
        shape = tuple(int(s) for s in reversed(obj.shape))  # MATLAB order
        if dt.kind not in "fiubc" and not is_complex:
            out.append(_Var(name, shape, cls if cls != "?" else "other", False, None))
            continue

        def read(ds: Any = obj, complex_parts: bool = is_complex and dt.kind != "c") -> np.ndarray:
            a = ds[()]
            if complex_parts:
                parts = a
                a = np.empty(parts.shape, np.complex128)
                a.real, a.imag = parts["real"], parts["imag"]
            return np.asarray(a).T  # MATLAB order

        out.append(_Var(name, shape, cls, is_complex, read))


def _read_v73(p: Path, want: Any) -> tuple[list[_Var], dict[str, np.ndarray]]:
    import h5py

    try:
        with h5py.File(p, "r") as hf:
            found: list[_Var] = []
            _h5_vars(hf, "", 0, found)
            arrays = {}
            for v in want(found):
                itemsize = 16 if v.is_complex else 8
                if _bytes_of(v.shape, itemsize) > _max_bytes():
                    raise InputError(p, f"variable {v}: too large to read on this machine")
                arrays[v.name] = v.read()
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - h5py raises OSError / KeyError / ValueError / RuntimeError
        raise InputError(p, f"MATLAB v7.3 (HDF5) file cannot be read ({type(err).__name__}: {err})") from err
    return found, arrays


# ------------------------------------------------------------------ v4 - v7 (scipy)
def _np_vars(items: Any, prefix: str, depth: int, out: list[_Var]) -> None:
    for key, value in items:
        if key.startswith("__"):
            continue
        name = f"{prefix}{key}"
        a = value
        if hasattr(a, "toarray") or type(a).__module__.startswith("scipy.sparse"):
            out.append(_Var(name, tuple(a.shape), "sparse", False, None))
            continue
        a = np.asarray(a)
        if a.dtype.names:  # struct
            if a.size == 1 and depth < 3:
                rec = a.reshape(-1)[0]
                _np_vars(((f, rec[f]) for f in a.dtype.names), f"{name}.", depth + 1, out)
            else:
                out.append(_Var(name, tuple(a.shape), "struct", False, None))
            continue
        kind = a.dtype.kind
        if kind in "fiubc":
            cls = {"f": "double" if a.dtype.itemsize == 8 else "single", "b": "logical"}.get(kind, a.dtype.name)
            if kind == "c":
                cls = "double" if a.dtype.itemsize == 16 else "single"
            out.append(_Var(name, tuple(a.shape), cls, kind == "c", lambda a=a: a))
        else:
            cls = {"U": "char", "S": "char", "O": "cell"}.get(kind, "other")
            out.append(_Var(name, tuple(a.shape), cls, False, None))


def _read_v5(p: Path, want: Any, version: str = "5") -> tuple[list[_Var], dict[str, np.ndarray]]:
    import scipy.io

    if version == "5":
        try:
            check_v5(p, _max_bytes())
        except BrokenMatFile as err:
            raise InputError(p, f"broken MATLAB v5-v7 .mat file ({err})") from err
        except OSError as err:
            raise InputError(p, f"cannot read ({err.strerror or err})") from err
    try:
        content = scipy.io.loadmat(p, squeeze_me=False, struct_as_record=True, mat_dtype=False)
    except Exception as err:  # noqa: BLE001 - scipy raises ValueError / TypeError / OSError / zlib.error ...
        raise InputError(
            p,
            "not a readable MATLAB .mat file (neither v7.3/HDF5 nor v4-v7: "
            f"{type(err).__name__}: {err})",
        ) from err
    found: list[_Var] = []
    _np_vars(content.items(), "", 0, found)
    return found, {v.name: v.read() for v in want(found)}


# ------------------------------------------------------------------ layout
def _check_layout(layout: str) -> str:
    if not isinstance(layout, str) or sorted(set(layout)) != sorted(layout) or not set(layout) <= set("yxzc") \
            or not {"y", "x"} <= set(layout):
        raise ShapeError(
            f"load_matlab_kspace(): layout must name the MATLAB dimensions with 'y' (rows), 'x' (columns) and "
            f"optionally 'z' (slices), 'c' (coils), each once; got {layout!r}"
        )
    return layout


def _to_czyx(a: np.ndarray, layout: str) -> np.ndarray:
    """MATLAB-order array → (coils, Z, ky, kx); trailing singletons MATLAB dropped are restored."""
    if a.ndim < len(layout):
        a = a.reshape(a.shape + (1,) * (len(layout) - a.ndim))
    letters = layout
    for ch in "czyx":
        if ch not in letters:
            a = a[..., None]
            letters += ch
    return np.transpose(a, [letters.index(ch) for ch in "czyx"])


def _find(found: list[_Var], variable: str, p: Path) -> _Var:
    """The variable called ``variable`` (that exact name, else in any case)."""
    v = next((v for v in found if v.name == variable), None) or \
        next((v for v in found if v.name.lower() == variable.lower()), None)
    if v is None:
        raise InputError(p, f"no variable {variable!r}; found {', '.join(str(v) for v in found) or 'none'}")
    return v


def _pick(found: list[_Var], variable: str | None, p: Path) -> tuple[_Var, _Var | None, _Var | None]:
    listing = ", ".join(str(v) for v in found) or "none"
    by_name = {v.name.lower(): v for v in found}
    if variable is not None:
        v = _find(found, variable, p)
        if not (v.is_complex and v.numeric and 2 <= len(v.shape) <= 4):
            raise InputError(p, f"variable {v} is not k-space; expected {_EXPECTED}")
        kspace = v
    else:
        complex_vars = [v for v in found if v.is_complex and v.numeric and 2 <= len(v.shape) <= 4]
        named = [by_name[n] for n in KSPACE_NAMES if n in by_name and by_name[n] in complex_vars]
        others = [v for v in complex_vars if v.name.lower().split(".")[-1] not in MAPS_NAMES]
        if named:
            kspace = named[0]
        elif len(others) == 1:
            kspace = others[0]
        elif len(others) > 1:
            raise InputError(
                p,
                f"several complex arrays ({', '.join(str(v) for v in others)}) and none is named like "
                f"k-space ({', '.join(KSPACE_NAMES)}); pass variable= to pick one",
            )
        else:
            raise InputError(p, f"no recognisable k-space: found {listing}; expected {_EXPECTED}")
    mask = next((by_name[n] for n in MASK_NAMES if n in by_name and by_name[n].numeric
                 and not by_name[n].is_complex), None)
    maps = next((by_name[n] for n in MAPS_NAMES if n in by_name and by_name[n].is_complex
                 and by_name[n].numeric and by_name[n] is not kspace), None)
    return kspace, mask, maps


def _mask(m: np.ndarray, data_shape: tuple[int, ...], layout: str, p: Path, var: _Var) -> np.ndarray:
    c, nz, ny, nx = data_shape
    m = np.asarray(m)
    if not np.all(np.isfinite(m.real if np.iscomplexobj(m) else m)):
        raise InputError(p, f"mask {var} contains NaN or Inf values")
    m = m != 0
    if m.size == nx and 1 in m.shape[:2] and m.ndim == 2 and (ny != nx or m.shape[0] == 1):
        return np.broadcast_to(m.reshape(1, 1, nx), (1, ny, nx)).copy()
    if m.shape[:2] == (ny, nx) and m.ndim <= 3 and (m.ndim == 2 or m.shape[2] == nz):
        return m.reshape(ny, nx, -1).transpose(2, 0, 1)
    try:
        full = _to_czyx(m, layout)
    except ValueError:
        full = None
    if full is not None and full.shape == data_shape:
        return full.any(axis=0)
    raise InputError(
        p,
        f"mask {var} does not fit the k-space (MATLAB size rows×cols = {ny}×{nx}, {nz} slices, {c} coils); "
        "expected (rows, cols), (rows, cols, slices), the k-space's size or a vector over the columns",
    )


# ------------------------------------------------------------------ public API
def _version(p: Path) -> str:
    if not p.is_file():
        raise InputError(p, "no such file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(128)
    except OSError as err:
        raise InputError(p, f"cannot read ({err.strerror or err})") from err
    if not head:
        raise InputError(p, "empty file; expected a MATLAB .mat file")
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        raise InputError(
            p, "an HDF5 file without a MATLAB header, not a MATLAB v7.3 .mat file (fastMRI k-space: name it .h5)"
        )
    if not head.startswith(b"MATLAB"):
        return "4"  # v4 files have no text header
    if head.startswith(_V73_MAGIC):
        return "7.3"
    import h5py

    try:  # some HDF5-based files say "MATLAB 7.0" in their header text
        return "7.3" if h5py.is_hdf5(str(p)) else "5"
    except Exception:  # noqa: BLE001 - not HDF5 then
        return "5"


def list_matlab_variables(path: str | Path) -> list[str]:
    """The variables of a ``.mat`` file as ``name (size [complex] class)`` (struct fields as ``s.f``).

    Raises
    ------
    InputError
        Not a readable ``.mat`` file.
    """
    p = Path(path)
    version = _version(p)
    found, _ = _read_v73(p, lambda vs: []) if version == "7.3" else _read_v5(p, lambda vs: [], version)
    return [str(v) for v in found]


def load_matlab_array(
    path: str | Path, *, names: tuple[str, ...] = (), variable: str | None = None, ndims: tuple[int, ...] = (2, 3),
    what: str = "a real array",
) -> tuple[np.ndarray, str]:
    """One real numeric array of a ``.mat`` file (v7.3/HDF5 or v4-v7), in MATLAB's index order.

    Which variable: ``variable`` when given; else the first of ``names`` (case-insensitive) that
    is a real numeric array of ``ndims`` dimensions (at least 2 × 2: vectors and scalars do not
    count); else the only such array.

    Returns
    -------
    array : ndarray
        Float64, indexed as MATLAB indexes it (``a[i, j, k]`` is MATLAB's ``a(i+1, j+1, k+1)``).
    description : str
        The variable as :func:`list_matlab_variables` shows it, e.g. ``sino (363×60 double)``.

    Raises
    ------
    InputError
        Not a readable ``.mat`` file, no (or no single) fitting variable -- the message lists
        the variables found and ``what`` was expected -- or NaN / Inf values.
    """
    p = Path(path)
    version = _version(p)
    fits = [f"{d}-D" for d in ndims]
    expected = f"{what}: a real numeric array of {' or '.join(fits)}" + (
        f" named {', '.join(names)}, or the only such array" if names else "")

    def fitting(v: _Var) -> bool:
        return (v.numeric and not v.is_complex and v.read is not None and len(v.shape) in ndims
                and min(v.shape[:2]) >= 2)  # not a vector or a scalar

    chosen: list[_Var] = []

    def want(found: list[_Var]) -> list[_Var]:
        if variable is not None:
            v = _find(found, variable, p)
            if not fitting(v):
                raise InputError(p, f"variable {v} is not {expected}")
        else:
            by_name = {v.name.lower(): v for v in found}
            named = [by_name[n] for n in names if n in by_name and fitting(by_name[n])]
            others = [v for v in found if fitting(v)]
            if named:
                v = named[0]
            elif len(others) == 1:
                v = others[0]
            else:
                why = "several such arrays" if others else "none found"
                listing = ", ".join(str(v) for v in found) or "none"
                raise InputError(p, f"no recognisable {what} ({why}): found {listing}; expected {expected}")
        chosen.append(v)
        return [v]

    _, arrays = _read_v73(p, want) if version == "7.3" else _read_v5(p, want, version)
    v = chosen[0]
    a = np.asarray(arrays[v.name], dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise InputError(p, f"variable {v} contains NaN or Inf values")
    return a, str(v)


def load_matlab_kspace(path: str | Path, *, variable: str | None = None, layout: str | None = None) -> KSpace:
    """Read Cartesian k-space from a MATLAB ``.mat`` file (v7.3/HDF5 or v4-v7).

    Parameters
    ----------
    path : str or Path
        The ``.mat`` file.
    variable : str, optional
        The k-space variable (``"s.field"`` inside a struct).  Default: see the module docstring.
    layout : str, optional
        The variable's MATLAB dimensions in order, from ``y`` (rows = ky), ``x`` (columns = kx),
        ``z`` (slices), ``c`` (coils); default ``"yx"``, ``"yxc"`` or ``"yxzc"`` by its number of
        dimensions.

    Returns
    -------
    KSpace
        ``data`` (coils, Z, ky, kx) complex64; ``mask`` from a mask variable or the non-zero
        samples; ``coil_maps`` from a sensitivity variable or None; ``header`` with ``source``,
        ``format`` (``"MATLAB v7.3"`` / ``"MATLAB v5"`` / ``"MATLAB v4"``), ``variable``,
        ``matlab_size``, ``layout`` and ``variables`` (everything found, as listed by
        :func:`list_matlab_variables`).

    Raises
    ------
    InputError
        Not a ``.mat`` file, unreadable or truncated, no recognisable k-space (the message lists
        the variables found and what was expected), a layout that does not fit, a mask or maps of
        the wrong size, NaN / Inf values.
    ShapeError
        ``layout`` is not made of ``y``, ``x``, ``z``, ``c``.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> k = KSpace(np.ones((4, 1, 8, 6), np.complex64))
    >>> path = os.path.join(tempfile.mkdtemp(), "k.mat")
    >>> _ = save_matlab_kspace(k, path)
    >>> load_matlab_kspace(path).data.shape
    (4, 1, 8, 6)
    """
    p = Path(path)
    if layout is not None:
        _check_layout(layout)
    version = _version(p)
    chosen: dict[str, Any] = {}

    def want(found: list[_Var]) -> list[_Var]:
        k, m, s = _pick(found, variable, p)
        chosen.update(kspace=k, mask=m, maps=s)
        return [v for v in (k, m, s) if v is not None]

    found, arrays = _read_v73(p, want) if version == "7.3" else _read_v5(p, want, version)
    kvar: _Var = chosen["kspace"]
    lay = layout or _DEFAULT_LAYOUT[len(kvar.shape)]
    if len(kvar.shape) > len(lay):
        raise InputError(p, f"variable {kvar} has {len(kvar.shape)} dimensions; layout {lay!r} names {len(lay)}")
    k = arrays[kvar.name]
    if not np.all(np.isfinite(k)):
        raise InputError(p, f"variable {kvar} contains NaN or Inf values")
    data = np.ascontiguousarray(_to_czyx(k, lay), dtype=np.complex64)
    if min(data.shape[2:]) < 2:
        raise InputError(p, f"variable {kvar}: k-space needs at least 2 rows and 2 columns (layout {lay!r})")
    mask = None
    if chosen["mask"] is not None:
        mask = _mask(arrays[chosen["mask"].name], data.shape, lay, p, chosen["mask"])
    maps = None
    if chosen["maps"] is not None:
        svar = chosen["maps"]
        raw = arrays[svar.name]
        for lay_maps in (lay, _DEFAULT_LAYOUT.get(raw.ndim, lay)):
            try:
                cand = _to_czyx(raw, lay_maps) if raw.ndim <= len(lay_maps) else None
            except ValueError:
                cand = None
            if cand is not None and cand.shape == data.shape:
                maps = np.ascontiguousarray(cand, dtype=np.complex64)
                break
        if maps is None:
            raise InputError(p, f"coil maps {svar} do not have the k-space's size {kvar}")
        if not np.all(np.isfinite(maps)):
            raise InputError(p, f"coil maps {svar} contain NaN or Inf values")
    header = {"source": str(p), "format": f"MATLAB v{version}", "variable": kvar.name,
              "matlab_size": list(kvar.shape), "layout": lay, "variables": [str(v) for v in found]}
    return KSpace(data, mask=mask, coil_maps=maps, header=header)


def _matlab_header() -> bytes:
    import time

    text = (f"MATLAB 7.3 MAT-file, Platform: medrecon, Created on: {time.strftime('%a %b %d %H:%M:%S %Y')} "
            "HDF5 schema 1.00 .").encode("ascii")
    return text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"


def save_matlab_kspace(kspace: KSpace, path: str | Path, *, variable: str = "kspace",
                       overwrite: bool = False) -> Path:
    """Write a :class:`KSpace` as a MATLAB v7.3 ``.mat`` file that MATLAB's ``load`` reads.

    The variable has MATLAB size ``(rows, cols, slices, coils)`` (``layout="yxzc"``), complex
    single; unsampled points are zeros.  ``mask`` (logical, rows × cols × slices) and ``sens``
    (coil maps, when present) are written beside it.

    Returns
    -------
    Path
        The written file.
    """
    import h5py

    def matlab_complex(a: np.ndarray) -> np.ndarray:
        out = np.empty(a.shape, dtype=[("real", "<f4"), ("imag", "<f4")])
        out["real"], out["imag"] = a.real, a.imag
        return out

    data = np.asarray(kspace.data * kspace.mask[None], dtype=np.complex64)
    c, nz, ny, nx = data.shape
    # MATLAB (rows, cols, slices, coils) column-major = C-order (coils, slices, cols, rows)
    k = data.transpose(0, 1, 3, 2)
    mask = np.broadcast_to(kspace.mask, (nz, ny, nx)).transpose(0, 2, 1).astype(np.uint8)
    with atomic_files([path], overwrite=overwrite) as (tmp,):
        with h5py.File(tmp, "w", userblock_size=512) as hf:
            ds = hf.create_dataset(variable, data=matlab_complex(k))
            ds.attrs["MATLAB_class"] = np.bytes_(b"single")
            m = hf.create_dataset("mask", data=mask)
            m.attrs["MATLAB_class"] = np.bytes_(b"logical")
            m.attrs["MATLAB_int_decode"] = np.int32(1)
            if kspace.coil_maps is not None:
                s = hf.create_dataset("sens", data=matlab_complex(
                    np.asarray(kspace.coil_maps, np.complex64).transpose(0, 1, 3, 2)))
                s.attrs["MATLAB_class"] = np.bytes_(b"single")
        with open(tmp, "r+b") as fh:
            fh.write(_matlab_header())
    return Path(path)
