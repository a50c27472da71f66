"""Raw sinograms: an array file plus a JSON geometry, so real scanner data can come in.

Format (``name.npy`` + ``name.json``; the ``.npy`` may also be ``.npz`` with key ``sinogram``)::

    name.npy   float32/float64, shape (Z, views, bins) or (views, bins)
    name.json  {
      "format": "medrecon-sinogram", "version": 1,
      "convention": "medrecon" | "astra",  # how angles, bins and the rotation centre are read
      "type": "parallel" | "fan",
      "angles_rad": [...],              # one per view, radians (medrecon: on [0, 2pi))
      "n_detectors": 363,               # = bins
      "detector_spacing_mm": 1.0,       # parallel, and fan with "detector": "flat"
      "detector_spacing_rad": 0.001,    # fan with "detector": "equiangular" (angle per bin)
      "detector": "flat" | "equiangular",            # fan only
      "source_to_isocenter_mm": 541.0,                # fan only
      "source_to_detector_mm": 949.0,                 # fan only (or "origin_to_detector_mm")
      "detector_offset_bins": 0.0,      # optional: centre-of-rotation offset (or "detector_offset_mm")
      "detector_flipped": false,        # optional: the bins run the other way
      "rotation_direction": "counterclockwise" | "clockwise",   # optional, as seen on screen
      "units": "image_pixel" | "attenuation",
      "pixel_size_mm": 1.0,             # optional: reconstruction pixel (needed for "attenuation")
      "mu_water_per_mm": 0.0192,        # optional: for HU <-> mu conversion of "attenuation" data
      "I0": 1e5                          # optional: incident photons (simulations, low dose)
    }

Conventions (docs/geometry.md draws both).  ``"medrecon"`` (the default) is the convention of
:mod:`medrecon.operators.ct`.  ``"astra"`` reads every key the way ASTRA's ``parallel`` and
``fanflat`` geometries do (angles, the direction of the bins, their middle at ``(n − 1)/2``, the
rotation centre at the middle of the image grid; :mod:`medrecon.operators.conventions`), and
accepts ASTRA's own names: ``"type": "fanflat"``, ``ProjectionAngles``, ``DetectorCount``,
``DetectorWidth`` (or ``DetectorSpacing``), ``DistanceOriginSource``, ``DistanceOriginDetector``
(distances and widths in mm).  ``detector_offset_bins`` is the bin, counted from the
detector's middle in the file's convention, that the ray through the rotation centre meets
(``detector_offset_mm``: the same in mm along the detector, parallel and flat fan only);
``detector_flipped`` reverses the bins; ``rotation_direction`` ``"clockwise"`` uses each angle as
its negative.  ``medrecon check-geometry`` finds these three from the data.

MATLAB.  ``name.mat`` + ``name.json`` (the same geometry) is read too: the sinogram is a real
variable named like one (:data:`SINOGRAM_NAMES`; ``"variable"`` in the JSON names it) or the
only real 2-D/3-D array.  Its MATLAB size is ``(views, bins)`` or, as MATLAB's ``radon`` returns
it, ``(bins, angles)``, with slices as a third dimension: the layout is told from the geometry's
view and bin counts, or given as ``"layout"`` in the JSON (letters ``v`` views, ``b`` bins, ``z``
slices in MATLAB's order: ``"bv"``, ``"vb"``, ``"bvz"``, ...), which a square sinogram needs.
Without its JSON a ``.mat`` file is refused with a message saying how to give the geometry.

Units.  ``"image_pixel"``: line integrals of the image in its own units (HU for CT) with path
length counted in pixels -- what medrecon's Radon operators produce.  ``"attenuation"``:
dimensionless line integrals of μ, ``-log(I / I0)``, as a scanner measures.  With
μ = μ_water (1 + HU / 1000) the two are related by
``attenuation = pixel_size_mm * mu_water_per_mm * (A·1 + A·HU / 1000)``, where ``A·1`` is the
projection of a ones image on the reconstruction grid.  Unknown keys are kept (forward
compatible); detector spacing is in mm except for the equiangular fan, where it is an angle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from medrecon.datasets._atomic import atomic_files
from medrecon.datasets.types import Sinogram
from medrecon.errors import InputError, SettingsError

__all__ = ["validate_geometry", "load_sinogram", "save_sinogram", "parallel_geometry", "is_sinogram_geometry",
           "select_views", "SINOGRAM_NAMES", "CONVENTIONS", "ASTRA_KEYS"]

FORMAT = "medrecon-sinogram"
CONVENTIONS = ("medrecon", "astra")
ROTATIONS = ("counterclockwise", "clockwise")
#: ASTRA's names of geometry keys (its proj_geom struct) and medrecon's, read with "convention": "astra"
ASTRA_KEYS = {"ProjectionAngles": "angles_rad", "DetectorCount": "n_detectors", "DetectorWidth": "detector_spacing_mm",
              "DetectorSpacing": "detector_spacing_mm", "DistanceOriginSource": "source_to_isocenter_mm",
              "DistanceOriginDetector": "origin_to_detector_mm"}
#: variable names taken for a sinogram in a MATLAB file (case-insensitive), in order of preference
SINOGRAM_NAMES = ("sinogram", "sino", "sinogram_data", "projections", "projection", "proj", "data", "p", "y")
#: MATLAB layouts tried when the geometry names none: (views, bins), MATLAB radon's (bins, angles); slices third
_MAT_LAYOUTS = ("vb", "bv", "vbz", "bvz")


def _positive(g: dict[str, Any], key: str) -> float:
    v = g.get(key)
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise SettingsError(f"geometry[{key!r}] must be a positive number; got {v!r}")
    return float(v)


def validate_geometry(
    geometry: dict[str, Any], *, n_views: int | None = None, n_bins: int | None = None
) -> dict[str, Any]:
    """Check a sinogram geometry dict and return a normalised copy.

    Parameters
    ----------
    geometry : dict
        See the module docstring.
    n_views, n_bins : int, optional
        The data's shape, checked against ``angles_rad`` and ``n_detectors``.

    Raises
    ------
    SettingsError
        Unknown type / detector / units, missing or non-positive distances or spacings,
        non-finite angles, counts that disagree with the data, fan source outside the detector.
    """
    if not isinstance(geometry, dict):
        raise SettingsError(f"geometry must be a dict; got {type(geometry).__name__}")
    g = _astra_names(dict(geometry))
    g.setdefault("format", FORMAT)
    g.setdefault("version", 1)
    g.setdefault("units", "image_pixel")
    g.setdefault("detector_offset_bins", 0.0)
    g.setdefault("detector_flipped", False)
    g.setdefault("rotation_direction", "counterclockwise")
    if not isinstance(g["detector_flipped"], bool):
        raise SettingsError(f"geometry['detector_flipped'] must be true or false; got {g['detector_flipped']!r}")
    if g["rotation_direction"] not in ROTATIONS:
        raise SettingsError(f"geometry['rotation_direction'] must be 'counterclockwise' or 'clockwise' (as seen on "
                            f"screen, row 0 at the top); got {g['rotation_direction']!r}")
    kind = g.get("type")
    if kind not in ("parallel", "fan"):
        raise SettingsError(f"geometry['type'] must be 'parallel' or 'fan'; got {kind!r}")
    if g["units"] not in ("image_pixel", "attenuation"):
        raise SettingsError(
            f"geometry['units'] must be 'image_pixel' or 'attenuation'; got {g['units']!r}"
        )
    try:
        angles = np.asarray(g.get("angles_rad"), dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise SettingsError("geometry['angles_rad'] must be a list of numbers") from err
    if angles.size == 0 or not np.all(np.isfinite(angles)):
        raise SettingsError(
            f"geometry['angles_rad'] must be non-empty and finite; got {angles.size} values"
        )
    if g["convention"] == "medrecon" and (angles.min() < 0 or angles.max() >= 2 * math.pi + 1e-9):
        raise SettingsError(f"geometry['angles_rad'] must lie in [0, 2π) radians (medrecon convention); got "
                            f"[{angles.min():.6g}, {angles.max():.6g}]" + _degrees_hint(angles))
    if np.abs(angles).max() > 4 * math.pi:
        raise SettingsError(f"geometry['angles_rad'] reach {np.abs(angles).max():.6g} radians" + _degrees_hint(angles))
    if n_views is not None and angles.size != n_views:
        raise SettingsError(f"geometry has {angles.size} angles but the data has {n_views} views")
    g["angles_rad"] = angles.tolist()
    n_det = g.get("n_detectors", n_bins)
    if not isinstance(n_det, int) or isinstance(n_det, bool) or n_det < 1:
        raise SettingsError(f"geometry['n_detectors'] must be a positive integer; got {n_det!r}")
    if n_bins is not None and n_det != n_bins:
        raise SettingsError(f"geometry['n_detectors'] = {n_det} but the data has {n_bins} bins")
    g["n_detectors"] = n_det
    if kind == "parallel":
        g.setdefault("detector_spacing_mm", 1.0)
        _positive(g, "detector_spacing_mm")
    else:
        g.setdefault("detector", "flat" if g["convention"] == "astra" else "equiangular")
        if g["detector"] not in ("flat", "equiangular"):
            raise SettingsError(
                f"geometry['detector'] must be 'flat' or 'equiangular'; got {g['detector']!r}"
            )
        if g["convention"] == "astra" and g["detector"] != "flat":
            raise SettingsError("geometry: convention 'astra' has no equiangular fan (ASTRA's fanflat is flat); "
                                f"got detector {g['detector']!r}")
        _positive(g, "detector_spacing_mm" if g["detector"] == "flat" else "detector_spacing_rad")
        sio = _positive(g, "source_to_isocenter_mm")
        if "origin_to_detector_mm" in g:
            odd = _positive(g, "origin_to_detector_mm")
            if "source_to_detector_mm" in g and not math.isclose(float(g["source_to_detector_mm"]), sio + odd,
                                                                 rel_tol=1e-9):
                raise SettingsError(f"geometry: source_to_detector_mm ({g['source_to_detector_mm']}) is not "
                                    f"source_to_isocenter_mm + origin_to_detector_mm ({sio} + {odd})")
            g["source_to_detector_mm"] = sio + odd
        sdd = _positive(g, "source_to_detector_mm")
        if sdd <= sio:
            raise SettingsError(
                f"geometry: source_to_detector_mm ({sdd}) must exceed source_to_isocenter_mm ({sio})"
            )
    _offset(g)
    for key in ("pixel_size_mm", "mu_water_per_mm", "I0"):
        if key in g and g[key] is not None:
            _positive(g, key)
    return g


def _degrees_hint(angles: np.ndarray) -> str:
    return ("; they look like degrees: give radians" if np.abs(angles).max() > 2 * math.pi + 1e-6 else "")


def _astra_names(g: dict[str, Any]) -> dict[str, Any]:
    """Read the convention and ASTRA's key names (only with ``"convention": "astra"``)."""
    g.setdefault("convention", "medrecon")
    if g["convention"] not in CONVENTIONS:
        raise SettingsError(f"geometry['convention'] must be one of {', '.join(CONVENTIONS)}; got {g['convention']!r}")
    astra_names = [k for k in ASTRA_KEYS if k in g] + (["type: fanflat"] if g.get("type") == "fanflat" else [])
    if astra_names and g["convention"] != "astra":
        raise SettingsError(f"geometry uses ASTRA's names ({', '.join(astra_names)}): add \"convention\": \"astra\" "
                            "(medrecon reads them, and angles and bins, the ASTRA way only when told)")
    for name, ours in ASTRA_KEYS.items():
        if name in g:
            value = g.pop(name)
            if ours in g and g[ours] != value:
                raise SettingsError(f"geometry gives both {name} and {ours}, and they differ")
            g[ours] = value
    if g.get("type") == "fanflat":
        if g.get("detector", "flat") != "flat":
            raise SettingsError(f"geometry: type 'fanflat' has a flat detector; got detector {g['detector']!r}")
        g["type"], g["detector"] = "fan", "flat"
    return g


def _offset(g: dict[str, Any]) -> None:
    """``detector_offset_bins`` from itself or ``detector_offset_mm`` (parallel and flat fan)."""
    bins = g.get("detector_offset_bins", 0.0)
    if not isinstance(bins, int | float) or isinstance(bins, bool) or not math.isfinite(bins):
        raise SettingsError(f"geometry['detector_offset_bins'] must be a number; got {bins!r}")
    if "detector_offset_mm" not in g:
        g["detector_offset_bins"] = float(bins)
        return
    mm = g["detector_offset_mm"]
    if not isinstance(mm, int | float) or isinstance(mm, bool) or not math.isfinite(mm):
        raise SettingsError(f"geometry['detector_offset_mm'] must be a number; got {mm!r}")
    if g["type"] == "fan" and g.get("detector") == "equiangular":
        raise SettingsError("geometry['detector_offset_mm']: an equiangular detector's bins are angles; give "
                            "detector_offset_bins")
    from_mm = float(mm) / float(g["detector_spacing_mm"])
    if bins and not math.isclose(float(bins), from_mm, rel_tol=1e-6, abs_tol=1e-9):
        raise SettingsError(f"geometry gives detector_offset_bins {bins} and detector_offset_mm {mm} "
                            f"(= {from_mm:.6g} bins); give one")
    g["detector_offset_bins"] = from_mm


def select_views(sinogram: Sinogram, views: Any) -> Sinogram:
    """The measured views ``views`` of a sinogram, each with its own geometry (retrospective thinning).

    Parameters
    ----------
    sinogram : Sinogram
    views : array-like of int or bool
        Indices of the views to keep (in order), or a mask over the views.

    Returns
    -------
    Sinogram
        ``data[:, views]`` and the geometry with those views' angles; the rest of the geometry
        (detector, distances, convention, offsets) is unchanged.

    Examples
    --------
    >>> s = Sinogram(np.arange(12.0).reshape(1, 4, 3), parallel_geometry([0.0, 0.5, 1.0, 1.5], 3))
    >>> t = select_views(s, [0, 2])
    >>> t.data[0].tolist(), t.geometry["angles_rad"]
    ([[0.0, 1.0, 2.0], [6.0, 7.0, 8.0]], [0.0, 1.0])
    """
    n = sinogram.data.shape[1]
    idx = np.asarray(views)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise SettingsError(f"select_views(): a view mask must have {n} entries; got shape {idx.shape}")
        idx = np.flatnonzero(idx)
    idx = idx.astype(np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < -n or idx.max() >= n:
        raise SettingsError(f"select_views(): view indices must lie in [0, {n}); got {idx.tolist()[:8]}")
    g = dict(sinogram.geometry)
    g["angles_rad"] = np.asarray(g["angles_rad"], dtype=np.float64)[idx].tolist()
    return Sinogram(np.ascontiguousarray(sinogram.data[:, idx]), g)


def parallel_geometry(angles_rad: Any, n_detectors: int, **extra: Any) -> dict[str, Any]:
    """Parallel-beam geometry dict (unit detector spacing, image-pixel units by default)."""
    return validate_geometry(
        {
            "type": "parallel",
            "angles_rad": np.asarray(angles_rad).tolist(),
            "n_detectors": int(n_detectors),
            **extra,
        }
    )


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    given = p.suffix if p.suffix in (".npy", ".npz", ".json", ".mat") else ""
    if given:
        p = p.with_suffix("")
    if given == ".mat" or (not p.with_suffix(".npz").exists() and not p.with_suffix(".npy").exists()
                           and p.with_suffix(".mat").exists()):
        data = p.with_suffix(".mat")
    else:
        data = p.with_suffix(".npz") if p.with_suffix(".npz").exists() else p.with_suffix(".npy")
    return data, p.with_suffix(".json")


def is_sinogram_geometry(path: str | Path) -> bool:
    """Whether ``path`` is a JSON file holding a sinogram geometry (``angles_rad`` and ``type``)."""
    try:
        g = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(g, dict) and "angles_rad" in g and "type" in g


def _how_to_give_geometry(json_path: Path) -> str:
    return (f"a MATLAB file read as a CT sinogram needs its geometry in {json_path.name} beside it, e.g. "
            '{"type": "parallel", "angles_rad": [one angle per view], "n_detectors": BINS} (fan beam, units, '
            '"layout" and "variable": docs/data.md, Raw sinograms); there is none. MATLAB k-space is read with '
            "--modality mri")


def _layout_of(a: np.ndarray, g: dict[str, Any], what: str, data_path: Path, json_path: Path) -> str:
    """The MATLAB layout of a sinogram array: the geometry's ``layout``, else the one its counts fit."""
    n_views = len(g["angles_rad"]) if isinstance(g.get("angles_rad"), list) else None
    n_bins = g.get("n_detectors") if isinstance(g.get("n_detectors"), int) else None
    given = g.get("layout")
    if given is not None:
        if not isinstance(given, str) or sorted(given) != sorted(set(given)) or not set(given) <= set("vbz") \
                or not {"v", "b"} <= set(given) or len(given) != a.ndim:
            raise InputError(json_path, f"\"layout\" must name the {a.ndim} MATLAB dimensions of {what} with 'v' "
                                        f"(views), 'b' (bins){' and z (slices)' if a.ndim == 3 else ''}, each once; "
                                        f"got {given!r}")
        return given

    def fits(lay: str) -> bool:
        size = dict(zip(lay, a.shape, strict=True))
        return (n_views is None or size["v"] == n_views) and (n_bins is None or size["b"] == n_bins)

    found = [lay for lay in _MAT_LAYOUTS if len(lay) == a.ndim and fits(lay)]
    counts = f"{n_views if n_views is not None else '?'} views, {n_bins if n_bins is not None else '?'} bins"
    if not found:
        raise InputError(data_path, f"{what} does not fit the geometry in {json_path.name} ({counts}): expected "
                                    "MATLAB size (views, bins) or (bins, views), slices third; or give \"layout\"")
    if len(found) > 1:
        raise InputError(data_path, f"{what}: cannot tell views from bins ({counts}); give \"layout\" in "
                                    f"{json_path.name}: \"bv\" for MATLAB radon's (bins, angles), \"vb\" for "
                                    "(views, bins), with a third letter \"z\" for slices")
    return found[0]


def _load_mat(data_path: Path, json_path: Path, g: dict[str, Any], variable: str | None,
              layout: str | None) -> np.ndarray:
    """The sinogram of a ``.mat`` file as (Z, views, bins)."""
    from medrecon.datasets.matlab import load_matlab_array

    name = variable if variable is not None else g.get("variable")
    a, what = load_matlab_array(data_path, names=SINOGRAM_NAMES, variable=name, what="a sinogram")
    lay = _layout_of(a, {**g, "layout": layout} if layout is not None else g, f"variable {what}", data_path,
                     json_path)
    if "z" not in lay:
        a, lay = a[..., None], lay + "z"
    return np.transpose(a, [lay.index(c) for c in "zvb"])


def load_sinogram(path: str | Path, *, variable: str | None = None, layout: str | None = None) -> Sinogram:
    """Read ``name.npy`` (or ``.npz``, or MATLAB ``.mat``) + ``name.json``.

    Parameters
    ----------
    path : str or Path
        ``name``, ``name.npy``, ``name.mat`` or ``name.json``.
    variable, layout : str, optional
        ``.mat`` only: the sinogram variable and its MATLAB layout (``"bv"``, ``"vbz"``, ...; see
        the module docstring).  Default: the JSON's ``"variable"`` / ``"layout"``, else found.

    Returns
    -------
    Sinogram
        ``data`` (Z, views, bins) float32 and the validated geometry.

    Raises
    ------
    InputError
        Missing or unreadable files (a ``.mat`` without its JSON: the message says how to give
        the geometry), wrong shape, NaN / Inf, invalid geometry (names the JSON), a ``.mat``
        variable whose layout cannot be told.
    """
    data_path, json_path = _paths(path)
    if data_path.suffix == ".mat" and data_path.is_file() and not json_path.is_file():
        raise InputError(data_path, _how_to_give_geometry(json_path))
    for f in (data_path, json_path):
        if not f.is_file():
            raise InputError(
                f, "no such file (a raw sinogram is an .npy/.npz/.mat array plus a .json geometry)"
            )
    try:
        geometry = json.loads(json_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(json_path, f"not valid JSON ({err})") from err
    if data_path.suffix == ".mat":
        if not isinstance(geometry, dict):
            raise InputError(json_path, f"geometry must be a JSON object; got {type(geometry).__name__}")
        arr = _load_mat(data_path, json_path, geometry, variable, layout)
    else:
        try:
            loaded = np.load(data_path, allow_pickle=False)
            arr = loaded["sinogram"] if data_path.suffix == ".npz" else loaded
            arr = np.asarray(arr)
        except Exception as err:  # noqa: BLE001 - numpy raises several types on broken files
            raise InputError(
                data_path, f"unreadable array ({type(err).__name__}: {str(err)[:200]})"
            ) from err
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape or arr.dtype.kind not in "fiu":
        raise InputError(
            data_path, f"expected a real (Z, views, bins) array; got shape {arr.shape} {arr.dtype}"
        )
    if not np.all(np.isfinite(arr)):
        raise InputError(data_path, "contains NaN or Inf values")
    try:
        geometry = validate_geometry(geometry, n_views=arr.shape[1], n_bins=arr.shape[2])
    except SettingsError as err:
        raise InputError(json_path, str(err)) from err
    return Sinogram(arr.astype(np.float32, copy=False), geometry)


def save_sinogram(sinogram: Sinogram, path: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write ``name.npy`` (float32, (Z, views, bins)) and ``name.json`` atomically."""
    data_path, json_path = _paths(path)
    data_path = data_path.with_suffix(".npy")
    if not np.all(np.isfinite(sinogram.data)):
        raise SettingsError("save_sinogram(): data holds NaN or Inf values")
    geometry = validate_geometry(
        sinogram.geometry, n_views=sinogram.data.shape[1], n_bins=sinogram.data.shape[2]
    )
    with atomic_files([data_path, json_path], overwrite=overwrite) as (tmp_data, tmp_json):
        with open(tmp_data, "wb") as fh:
            np.save(fh, np.asarray(sinogram.data, dtype=np.float32))
        tmp_json.write_text(json.dumps(geometry, indent=1), encoding="utf-8")
    return [data_path, json_path]
