"""Write one case's image outputs (NIfTI or DICOM) with honest labels and one study per input.

:func:`run_case` calls :func:`write_image_outputs` after the reconstruction.  What it decides:

* **Simulated or measured.**  A retrospective case reconstructs a measurement *simulated* from
  an image; its outputs say ``SIMULATED`` with the settings (views or R and mask, noise) in
  SeriesDescription, DerivationDescription and ImageComments (DICOM) or ``descrip`` (NIfTI), and
  the record holds the same text.
* **Which study.**  Simulated results go into a study of their own, not into the patient's
  examination (safe default); ``into_source_study`` puts them into the input's study.  Measured
  data go into the input's study.  An input without a StudyInstanceUID gets one study UID
  derived from its identity, so every method's series and the uncertainty series of one input
  share one study (:func:`medrecon.datasets.dicom_write.output_study_uid`).
* **Modality.**  The output is CT or MR as the input says, else as the case's ``modality``
  (a NIfTI brain image reconstructed with ``modality="mri"`` is written as MR, not Secondary
  Capture).
* **SeriesNumber.**  One per method and kind in a study (:func:`series_number`): every method's
  reconstruction and uncertainty series of one input series get numbers of their own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medrecon.pipeline.case import ReconstructConfig
    from medrecon.pipeline.problems import Problem

__all__ = ["describe_simulation", "simulation_label", "write_image_outputs", "series_number", "SERIES_METHODS"]

#: the methods in the order of their SeriesNumber blocks (:func:`series_number`); append new
#: methods at the end, never reorder (numbers already in a PACS keep their meaning)
SERIES_METHODS = ("fbp", "zero-filled", "cg", "tv", "l1-wavelet", "dds", "ccdf", "song", "dps", "score-mri",
                  "dds3d", "mbir3d")


def describe_simulation(
    modality: str, *, views: int = 23, geometry: str = "parallel",
    angles_deg: tuple[float, ...] | None = None, limited_angle_deg: float | None = None,
    acceleration: float = 4.0, mask: str = "equispaced", center_fraction: float = 0.08,
    noise: float = 0.0,
) -> str:
    """Short text of a simulated measurement's settings, e.g. ``"60 views, parallel beam, noise 0"``.

    ``modality`` "ct"/"CT" names the views (or angles, or limited angle) and the beam; "mri"/"MR"
    the acceleration R, the mask and its centre fraction.  Both end with the noise level (a
    fraction of the measurement's RMS).
    """
    if str(modality).lower() == "ct":
        if angles_deg is not None:
            what = f"{len(angles_deg)} views at given angles"
        elif limited_angle_deg is not None:
            what = f"{limited_angle_deg:g} deg limited angle"
        else:
            what = f"{views} views"
        what += f", {geometry} beam"
    else:
        what = f"R={acceleration:g} {mask}, centre {center_fraction:g}"
    return f"{what}, noise {noise:g}"


def simulation_label(cfg: ReconstructConfig) -> str | None:
    """:func:`describe_simulation` of a case; for measured data thinned retrospectively, what
    was kept (``"retrospective on measured data: …"``); None when it reconstructs measured data
    as it is."""
    from medrecon.pipeline.case import acceleration_of, thins_measured_data, views_of
    from medrecon.pipeline.problems import input_kind

    kind = input_kind(cfg.input, cfg.modality)
    if thins_measured_data(cfg):
        if kind == "kspace":
            what = f"R={acceleration_of(cfg):g} {cfg.mask}, centre {cfg.center_fraction:g}"
        else:
            parts = [f"{cfg.limited_angle_deg:g} deg limited angle"] if cfg.limited_angle_deg is not None else []
            parts += [f"{cfg.views} views"] if cfg.views is not None else []
            parts += [f"every {cfg.view_step}th view"] if cfg.view_step is not None else []
            what = ", ".join(parts)
        return f"retrospective on measured data: {what}"
    if kind != "image":
        return None
    return describe_simulation(
        cfg.modality, views=views_of(cfg), geometry=cfg.geometry, angles_deg=cfg.angles_deg,
        limited_angle_deg=cfg.limited_angle_deg, acceleration=acceleration_of(cfg), mask=cfg.mask,
        center_fraction=cfg.center_fraction, noise=cfg.noise,
    )


def series_number(source_number: Any, method: str, kind: str = "reconstruction") -> int:
    """SeriesNumber of a derived series: one per method and kind for one input series.

    ``1000 × (10 m + k) + s``: ``m`` the method's place in :data:`SERIES_METHODS` (from 1; a
    name not in it gets a block from 50 to 99 by its hash), ``k`` 0 for the reconstruction and 1
    for the uncertainty series, ``s`` the input's SeriesNumber modulo 1000 (0 when it has none).
    So input series 3 gives ``fbp`` 10003 and its uncertainty 11003, ``tv`` 40003, ``dds`` 60003
    and 61003: different methods written into one study never share a number (runs of one method
    with other settings do).

    Examples
    --------
    >>> series_number("3", "fbp"), series_number("3", "fbp", "uncertainty"), series_number("3", "tv")
    (10003, 11003, 40003)
    """
    try:
        source = int(str(source_number).strip() or 0) % 1000
    except ValueError:
        source = 0
    if method in SERIES_METHODS:
        block = SERIES_METHODS.index(method) + 1
    else:
        block = 50 + int(hashlib.sha256(str(method).encode()).hexdigest(), 16) % 50
    return 1000 * (10 * block + (kind == "uncertainty")) + source


def _modality(template_modality: str, cfg_modality: str) -> str:
    if template_modality in ("CT", "MR"):
        return template_modality
    return {"ct": "CT", "mri": "MR"}.get(cfg_modality, template_modality)


def write_image_outputs(
    cfg: ReconstructConfig, prob: Problem, mean: np.ndarray, std: np.ndarray | None, out: Path,
    stem: str, *, cautions: tuple[str, ...] | list[str] = (), std_cautions: tuple[str, ...] | list[str] = (),
) -> tuple[list[Path], dict[str, Any]]:
    """Write the reconstruction (and the uncertainty map) of one case.

    Parameters
    ----------
    cfg : ReconstructConfig
        The case's settings (format, modality, simulation settings, ``into_source_study``).
    prob : Problem
        Its problem; ``prob.template`` gives the affine, modality and meta of the outputs.
    mean, std : ndarray, shape (Z, Y, X)
        Reconstruction and pixel-wise posterior std (None for classical methods).
    out : Path
        Output folder.
    stem : str
        File stem: ``<stem>.nii.gz`` / ``<stem>_std.nii.gz`` or ``<stem>_dicom`` /
        ``<stem>_std_dicom``.
    cautions, std_cautions : sequence of str
        Lines every output (and, added to them, the uncertainty output) carries in its header:
        NIfTI ``descrip`` + extension, DICOM ImageComments.

    Returns
    -------
    files : list of Path
        What was written.
    record : dict
        For the case's JSON record: ``simulated`` (the settings text or None) and, for DICOM,
        ``study`` (which study the series went into and why).
    """
    from medrecon.datasets import Volume, save_dicom_series, save_nifti
    from medrecon.datasets.dicom_write import mr_value_scale

    tpl = prob.template
    modality = _modality(tpl.modality, cfg.modality)
    meta = dict(tpl.meta)
    if cfg.input is not None and "source" not in meta:  # measured data: the input identifies it
        meta["source"] = str(Path(cfg.input).resolve())
    simulated = simulation_label(cfg)
    result = Volume(np.asarray(mean, np.float32), tpl.affine, modality, meta)
    std_vol = None if std is None else Volume(np.asarray(std, np.float32), tpl.affine, modality, meta)
    files: list[Path] = []
    record: dict[str, Any] = {"simulated": simulated}
    if cfg.output_format == "nifti":
        files += save_nifti(result, out / f"{stem}.nii.gz", overwrite=cfg.overwrite, simulated=simulated,
                            cautions=cautions)
        if std_vol is not None:
            files += save_nifti(std_vol, out / f"{stem}_std.nii.gz", overwrite=cfg.overwrite,
                                simulated=simulated, cautions=[*cautions, *std_cautions])
        return files, record
    into_source = bool(getattr(cfg, "into_source_study", False))
    kw: dict[str, Any] = {"method": cfg.method, "overwrite": cfg.overwrite, "simulated": simulated,
                          "source_study": into_source if simulated is not None else None}
    if modality == "MR":  # the uncertainty series is stored on the reconstruction's scale
        kw["value_scale"] = mr_value_scale(result.array)
    source_number = meta.get("dicom", {}).get("SeriesNumber")
    files += save_dicom_series(result, out / f"{stem}_dicom",
                               series_number=series_number(source_number, cfg.method), cautions=cautions, **kw)
    if std_vol is not None:
        files += save_dicom_series(std_vol, out / f"{stem}_std_dicom", kind="uncertainty",
                                   series_number=series_number(source_number, cfg.method, "uncertainty"),
                                   cautions=[*cautions, *std_cautions], **kw)
    has_study = bool(str(meta.get("dicom", {}).get("StudyInstanceUID") or "").strip())
    if simulated is not None and not into_source:
        record["study"] = ("a study of its own, not the patient's (simulated data); "
                           "--into-source-study puts it into the input's study")
    elif has_study:
        record["study"] = "the input's study" + (" (--into-source-study)" if simulated is not None else "")
    else:
        record["study"] = "one study derived from the input (the input has no StudyInstanceUID)"
    return files, record
