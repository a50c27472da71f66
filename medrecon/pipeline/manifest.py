"""Batch manifests: a CSV (one row per study) or a folder (one case per series or file).

CSV columns: ``input`` (required; relative paths are relative to the CSV's folder), ``case_id``
(optional; default: a hash of the input path), and any :class:`ReconstructConfig` field
(``modality``, ``method``, ``views``, ``iters``, ``acceleration``, ``slices``, …; dashes or
underscores).  Empty cells take the batch defaults.  A folder gives one case per DICOM series
(SeriesInstanceUID) and one per NIfTI file, raw sinogram, fastMRI ``.h5`` or BART ``.cfl``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
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
    """One case of a batch: its ID and its full configuration (``out`` = the case's folder)."""

    case_id: str
    config: ReconstructConfig


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


def _csv_cases(path: Path, defaults: ReconstructConfig) -> list[tuple[str | None, dict[str, Any]]]:
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
        inp = Path(settings["input"]).expanduser()
        settings["input"] = str(inp if inp.is_absolute() else (path.parent / inp))
        cases.append((settings.pop("case_id", None), settings))
    return cases


def _folder_cases(folder: Path) -> list[tuple[str | None, dict[str, Any]]]:
    from medrecon.datasets import list_dicom_series
    from medrecon.pipeline.problems import input_kind

    cases: list[tuple[str | None, dict[str, Any]]] = []
    try:
        series = list_dicom_series(folder)
    except InputError:
        series = []
    for s in series:
        uid_hash = hashlib.sha256(s.series_uid.encode()).hexdigest()[:10]
        modality = "mri" if s.modality.upper() == "MR" else "ct"
        cases.append((f"series-{uid_hash}", {"input": str(folder), "series_uid": s.series_uid, "modality": modality}))
    for f in sorted(folder.rglob("*")):
        name = f.name.lower()
        if not f.is_file():
            continue
        if name.endswith((".nii", ".nii.gz")):
            cases.append((None, {"input": str(f)}))
        elif name.endswith((".h5", ".cfl")):
            cases.append((None, {"input": str(f), "modality": "mri"}))
        elif name.endswith(".json") and input_kind(str(f)) == "sinogram":
            cases.append((None, {"input": str(f), "modality": "ct"}))
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
        raw = _folder_cases(src)
        if not raw:
            raise InputError(src, "no DICOM series, NIfTI, sinogram, fastMRI or BART files found")
    elif src.is_file():
        raw = _csv_cases(src, defaults)
        if not raw:
            raise InputError(src, "manifest has no cases")
    else:
        raise InputError(src, "no such file or folder")
    specs: list[CaseSpec] = []
    seen: set[str] = set()
    for case_id, settings in raw:
        cid = case_id or case_id_for(settings["input"], settings.get("series_uid"))
        if cid in seen:
            raise InputError(src, f"case ID {cid!r} appears twice")
        if not cid.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise InputError(src, f"case ID {cid!r}: use letters, digits, '-', '_' and '.' only")
        seen.add(cid)
        cfg = dataclasses.replace(defaults, **settings, case_id=cid, out=str(Path(out_dir) / "cases" / cid),
                                  thumbnails=True)
        cfg = _drop_foreign_defaults(cfg, settings)
        specs.append(CaseSpec(cid, cfg))
    return specs
