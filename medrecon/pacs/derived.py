r"""Derived series with deterministic UIDs, so that storing a result twice stores nothing new.

The Series Instance UID of a result is derived from the input SeriesInstanceUID, the method and
its settings (and the kind: reconstruction or uncertainty); each SOP Instance UID from that series
UID and the slice index — with pydicom's ``generate_uid(entropy_srcs=[...])`` (a UUID-5 style
hash under pydicom's root).  Re-running a case therefore writes the same UIDs, a PACS files them
as the same instances, and :class:`medrecon.pacs.PacsSink` skips those already present.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from medrecon.datasets import Volume, save_dicom_series
from medrecon.datasets.dicom_write import fit_lo
from medrecon.errors import InputError
from medrecon.pipeline.outputs import series_number

__all__ = ["settings_key", "derived_series_uid", "derived_sop_uid", "derived_description",
           "write_derived_series"]

_VERSION = "medrecon-derived-v1"  # bump only if the meaning of a derived series changes


def settings_key(method: str, settings: Mapping[str, Any]) -> str:
    """Canonical JSON of the method and settings (what makes two results "the same")."""
    return json.dumps({"method": method, **dict(settings)}, sort_keys=True, separators=(",", ":"),
                      default=str)


def derived_series_uid(input_series_uid: str, method: str, settings: Mapping[str, Any],
                       kind: Literal["reconstruction", "uncertainty"] = "reconstruction") -> str:
    """The SeriesInstanceUID of the result of ``method`` with ``settings`` on an input series."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[_VERSION, input_series_uid, settings_key(method, settings), kind]))


def derived_sop_uid(series_uid: str, index: int) -> str:
    """The SOPInstanceUID of slice ``index`` (0-based) of a derived series."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[_VERSION, series_uid, str(index)]))


def derived_description(method: str, prior: str | None, kind: str = "reconstruction",
                        simulated: str | None = None) -> str:
    """SeriesDescription (≤ 64 characters) naming the method and the prior, and ``SIMULATED``
    (right after the method, so it is never cut off) with the settings for a simulated measurement."""
    text = f"medrecon {method}" + (" SIMULATED" if simulated else "") + f" prior={prior or 'none'}"
    text += " uncertainty (std)" if kind == "uncertainty" else " reconstruction"
    if simulated:
        text += f" {simulated}"
    return fit_lo(text)


def write_derived_series(
    volume: Volume, folder: str | Path, *, input_series_uid: str, method: str,
    settings: Mapping[str, Any], prior: str | None = None,
    kind: Literal["reconstruction", "uncertainty"] = "reconstruction",
    simulated: str | None = None,
) -> tuple[str, list[Path]]:
    """Write ``volume`` as a derived series into ``folder`` (which must not exist) with
    deterministic Series/SOP Instance UIDs; returns ``(series_uid, files)``.

    The patient and study modules come from ``volume.meta["dicom"]`` (as
    :func:`medrecon.datasets.load_dicom_series` leaves them), so the series joins the original
    study; ImageType is ``DERIVED\\SECONDARY`` (see :func:`medrecon.datasets.save_dicom_series`).
    ``simulated`` (the settings of a measurement simulated from the images, see
    :func:`medrecon.pipeline.outputs.describe_simulation`) labels the series ``SIMULATED`` in
    SeriesDescription, DerivationDescription and ImageComments.  The series goes into the input's
    study even then: this is the PACS workflow's stated purpose (results beside the original).
    """
    import pydicom

    folder = Path(folder)
    if folder.exists():
        raise InputError(folder, "already exists")
    series_uid = derived_series_uid(input_series_uid, method, settings, kind)
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    number = series_number(volume.meta.get("dicom", {}).get("SeriesNumber"), method, kind)  # one per method
    files = save_dicom_series(volume, staging, method=method, kind=kind, simulated=simulated,
                              source_study=True, series_number=number)
    description = derived_description(method, prior, kind, simulated)
    for k, f in enumerate(files):
        f = staging / f.name
        ds = pydicom.dcmread(f)
        sop = derived_sop_uid(series_uid, k)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SeriesDescription = description
        what = ds.DerivationDescription if simulated else description  # the writer's SIMULATED text
        ds.DerivationDescription = (f"{what}; settings {settings_key(method, settings)}")[:1024]
        tmp = f.with_suffix(".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, f)
    os.replace(staging, folder)
    return series_uid, [folder / f.name for f in files]
