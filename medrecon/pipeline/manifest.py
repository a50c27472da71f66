"""Batch manifests: a CSV (one row per study) or a folder (one case per series or file).

CSV columns: ``input`` (required; relative paths are relative to the CSV's folder), ``case_id``
(optional; default: a hash of the input path), and any :class:`ReconstructConfig` field
(``modality``, ``method``, ``views``, ``iters``, ``acceleration``, ``slices``, …; dashes or
underscores).  Empty cells take the batch defaults.

A folder is searched through its sub-folders, following symbolic links (each real folder is
visited once, so a link loop ends; hidden folders and the batch's own output folder are skipped).
It gives one case per DICOM series and one per NIfTI file, raw sinogram, fastMRI ``.h5``, BART
``.cfl`` or MATLAB ``.mat`` (an MRI k-space case, or a CT sinogram case when a sinogram geometry
``.json`` of the same name lies beside it).  DICOM files are grouped by SeriesInstanceUID; files without one
are grouped by the folder that holds them (one case per folder).  A series whose files lie in
several folders (two copies of an export, a link to a copy) is one case read from their nearest
common folder; the DICOM reader then reads each instance (SOPInstanceUID) once, from an intact
copy, and names the broken copies it drops.  The case's description says in how many folders the
series lies and how many files are duplicates.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medrecon.errors import InputError
from medrecon.pipeline.case import ReconstructConfig, case_id_for

__all__ = ["CaseSpec", "read_cases", "MANIFEST_FIELDS"]

#: config fields a manifest may set per case (the rest belong to the batch)
MANIFEST_FIELDS = tuple(
    f.name for f in dataclasses.fields(ReconstructConfig)
    if f.name not in ("out", "overwrite", "progress", "thumbnails")
)


@dataclass(frozen=True)
class CaseSpec:
    """One case of a batch: its ID and its full configuration (``out`` = the case's folder).

    ``label`` is the input as the user knows it (relative to the batch folder or as written in
    the manifest) and ``description`` says what it is (a DICOM series' modality, size and
    SeriesDescription; the file type otherwise).  Both go to the summary, log and report; neither
    holds patient names.
    """

    case_id: str
    config: ReconstructConfig
    label: str = ""
    description: str = ""


def _coerce(name: str, text: str, where: str) -> Any:
    kind = {f.name: str(f.type) for f in dataclasses.fields(ReconstructConfig)}[name]
    try:
        if "tuple" in kind:
            return tuple(float(v) for v in text.replace(";", ",").split(",") if v.strip())
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("bool"):
            return text.strip().lower() in ("1", "true", "yes")
    except ValueError as err:
        raise InputError(where, f"column {name!r}: cannot read {text!r} as {kind}") from err
    return text


def _csv_cases(path: Path, defaults: ReconstructConfig) -> list[_Raw]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(path, f"cannot read the manifest ({err})") from err
    columns = {c: (c or "").strip().replace("-", "_") for c in header}
    if "input" not in columns.values():
        raise InputError(path, f"manifest needs an 'input' column; found {sorted(columns.values())}")
    unknown = sorted(v for v in columns.values() if v not in MANIFEST_FIELDS)
    if unknown:
        raise InputError(path, f"unknown manifest column(s) {', '.join(unknown)}; known: {', '.join(MANIFEST_FIELDS)}")
    cases = []
    for i, row in enumerate(rows, start=2):
        where = f"{path}:{i}"
        values = {columns[k]: (v or "").strip() for k, v in row.items() if k is not None}
        if not values.get("input"):
            raise InputError(where, "empty 'input'")
        settings: dict[str, Any] = {}
        for name, text in values.items():
            if text:
                settings[name] = _coerce(name, text, where)
        label = settings["input"]
        inp = Path(settings["input"]).expanduser()
        settings["input"] = str(inp if inp.is_absolute() else (path.parent / inp))
        what = _kind(Path(settings["input"]))
        if settings.get("series_uid"):
            what += f", SeriesInstanceUID {settings['series_uid']}"
        cases.append((settings.pop("case_id", None), settings, label, what))
    return cases


_Raw = tuple[str | None, dict[str, Any], str, str]  # (case ID or None, settings, label, description)


def _kind(path: Path) -> str:
    """What an input file is, from its name (and, for ``.mat``, a sinogram geometry beside it)."""
    from medrecon.datasets.sinogram import is_sinogram_geometry

    name = path.name.lower()
    if name.endswith(".mat") and is_sinogram_geometry(path.with_suffix(".json")):
        return f"MATLAB sinogram (+ {path.with_suffix('.json').name} geometry)"
    from medrecon.datasets import raw_format

    raw = {"twix": "Siemens twix raw data", "mrd": "MRD raw data"}.get(raw_format(path) or "")
    if raw:
        return raw
    kinds = {(".nii", ".nii.gz"): "NIfTI image", (".h5", ".hdf5"): "fastMRI k-space",
             (".cfl", ".hdr"): "BART k-space", (".mat",): "MATLAB k-space", (".npy", ".npz"): "raw sinogram"}
    for ends, what in kinds.items():
        if name.endswith(ends):
            return what
    if name.endswith(".json"):
        return "raw sinogram"
    return "folder (DICOM series or images)" if path.is_dir() else "DICOM file"


def _walk(root: Path, skip: Path | None) -> Iterator[tuple[Path, list[Path]]]:
    """``(folder, files)`` under ``root``, sorted, following symbolic links.

    Each real folder is visited once (the first path that reaches it), so links that loop back
    end there; hidden entries and ``skip`` (the batch output) are left out.
    """
    seen: set[str] = set()
    skip_real = os.path.realpath(skip) if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or real == skip_real:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(dirpath), [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]


def _dicom_description(info: Any, n_images: int, grouped_by_folder: bool, *, folders: list[str] | None = None,
                       duplicates: int = 0) -> str:
    text = f"DICOM {info.modality or '?'}, {n_images} images"
    if info.series_number:
        text += f", series {info.series_number}"
    if info.description:
        text += f" {info.description!r}"
    if grouped_by_folder:
        text += ", no SeriesInstanceUID (grouped by folder)"
    if folders and len(folders) > 1:
        text += f"; one series in {len(folders)} folders ({', '.join(folders)}), read as one case"
    if duplicates:
        text += (f"; {duplicates} duplicate file{'s' if duplicates != 1 else ''} of the same instances "
                 "(SOPInstanceUID), one intact copy of each read")
    return text


def _folder_cases(folder: Path, out_dir: Path | None = None) -> list[_Raw]:
    """The cases of a folder (module docstring): DICOM series by SeriesInstanceUID or by folder,
    and one case per other input file, in the order they are found."""
    from medrecon.datasets import list_dicom_series
    from medrecon.datasets.sinogram import is_sinogram_geometry
    from medrecon.pipeline.problems import input_kind

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p, folder)).as_posix()

    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    order: list[tuple[str, Any]] = []  # ("uid", uid) or ("raw", _Raw), in the order found
    by_uid: dict[str, list[tuple[Path, Any]]] = {}
    for here, files in _walk(folder, out_dir):
        other = []
        for f in files:
            name = f.name.lower()
            if not f.is_file():
                continue
            if name.endswith((".nii", ".nii.gz")):
                order.append(("raw", (None, {"input": str(f)}, rel(f), _kind(f))))
            elif name.endswith(".mat") and is_sinogram_geometry(f.with_suffix(".json")):  # a MATLAB sinogram
                order.append(("raw", (None, {"input": str(f), "modality": "ct"}, rel(f), _kind(f))))
            elif name.endswith((".h5", ".hdf5", ".cfl", ".mat", ".dat", ".mrd")):
                order.append(("raw", (None, {"input": str(f), "modality": "mri"}, rel(f), _kind(f))))
            elif name.endswith(".json") and input_kind(str(f)) == "sinogram" and not f.with_suffix(".mat").is_file():
                order.append(("raw", (None, {"input": str(f), "modality": "ct"}, rel(f), _kind(f))))
            elif not name.endswith((".hdr", ".npy", ".npz", ".json", ".csv", ".txt", ".md")):
                other.append(f)
        if not other:
            continue
        try:
            series = list_dicom_series(here, recursive=False)
        except InputError as err:
            if "no DICOM image objects" in err.problem:
                continue
            # a broken file that claims to be DICOM: a case that fails with this reason
            order.append(("raw", (f"series-{key('folder:' + rel(here))}", {"input": str(here), "series_uid": ""},
                                  rel(here), f"unreadable DICOM folder ({err.problem})")))
            continue
        for info in series:
            if info.series_uid:
                if info.series_uid not in by_uid:
                    order.append(("uid", info.series_uid))
                by_uid.setdefault(info.series_uid, []).append((here, info))
            else:
                modality = "mri" if info.modality.upper() == "MR" else "ct"
                order.append(("raw", (f"series-{key('folder:' + rel(here))}",
                                      {"input": str(here), "series_uid": "", "modality": modality}, rel(here),
                                      _dicom_description(info, info.n_images, True,
                                                         duplicates=max(0, info.n_files - info.n_images)))))
    cases: list[_Raw] = []
    for what, item in order:
        if what == "raw":
            cases.append(item)
            continue
        uid, places = item, by_uid[item]
        first = places[0][1]
        modality = "mri" if first.modality.upper() == "MR" else "ct"
        top = Path(os.path.commonpath([str(d) for d, _ in places]))  # the reader follows links below it
        instances = frozenset().union(*(i.instance_uids for _, i in places))
        n = len(instances) or sum(i.n_images for _, i in places)
        duplicates = sum(i.n_files or i.n_images for _, i in places) - n
        cases.append((f"series-{key(uid)}", {"input": str(top), "series_uid": uid, "modality": modality},
                      rel(top), _dicom_description(first, n, False, folders=[rel(d) for d, _ in places],
                                                   duplicates=duplicates)))
    return cases


#: batch-wide settings that only some methods take (classical methods reject the others)
_METHOD_SETTINGS = {"iters": "iters", "prior": None, "samples": None, "steps": None}


def _drop_foreign_defaults(cfg: ReconstructConfig, row: dict[str, Any]) -> ReconstructConfig:
    """Batch-wide ``--iters`` / ``--prior`` / ``--samples`` / ``--steps`` apply to the cases whose
    method takes them; a value set in the case's own row is always kept (and checked)."""
    from medrecon.api import METHODS

    if cfg.method not in METHODS:  # diffusion methods: pass everything through
        return cfg
    drop = {}
    for name, key in _METHOD_SETTINGS.items():
        if name not in row and getattr(cfg, name) is not None and (key is None or key not in METHODS[cfg.method]):
            drop[name] = None
    return dataclasses.replace(cfg, **drop) if drop else cfg


def read_cases(source: str | Path, defaults: ReconstructConfig, out_dir: str | Path) -> list[CaseSpec]:
    """The cases of a batch, in manifest order.

    Parameters
    ----------
    source : str or Path
        A manifest CSV or a folder.
    defaults : ReconstructConfig
        Settings for what the manifest leaves empty.
    out_dir : str or Path
        Batch output folder; case ``c`` writes into ``out_dir/cases/c``.

    Raises
    ------
    InputError
        Missing source, unreadable manifest, unknown columns, bad values, duplicate case IDs,
        or a folder without cases.
    """
    src = Path(source)
    if src.is_dir():
        raw = _folder_cases(src, Path(out_dir))
        if not raw:
            raise InputError(src, "no DICOM series, NIfTI, sinogram, fastMRI, BART or MATLAB files found "
                                  "(sub-folders and linked folders included)")
    elif src.is_file():
        raw = _csv_cases(src, defaults)
        if not raw:
            raise InputError(src, "manifest has no cases")
    else:
        raise InputError(src, "no such file or folder")
    specs: list[CaseSpec] = []
    seen: set[str] = set()
    for case_id, settings, label, description in raw:
        cid = case_id or case_id_for(settings["input"], settings.get("series_uid"))
        if cid in seen:
            raise InputError(src, f"case ID {cid!r} appears twice")
        if not cid.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise InputError(src, f"case ID {cid!r}: use letters, digits, '-', '_' and '.' only")
        seen.add(cid)
        cfg = dataclasses.replace(defaults, **settings, case_id=cid, out=str(Path(out_dir) / "cases" / cid),
                                  thumbnails=True)
        cfg = _drop_foreign_defaults(cfg, settings)
        specs.append(CaseSpec(cid, cfg, label, description))
    return specs
