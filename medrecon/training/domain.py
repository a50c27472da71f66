"""Measure a prior's training domain for its card (``card["domain"]``), read by
:func:`medrecon.priors.domain.check_domain` at inference.

What it measures from the training files: the in-plane pixel spacing range (files that record
it), and the intensity histogram of the slices' non-background pixels in normalised units,
its mean over the training slices (the reference) and the 99.5th percentile of the slices' own
distances to it (the threshold an input must stay under).  Body regions and MR contrasts are
curated (the preset's card info, ``domain``), since the training files do not record them
uniformly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medrecon.priors.domain import histogram_distance
from medrecon.training.data import _resolve, is_volume_source, load_slices

__all__ = ["HISTOGRAMS", "measure_domain"]

#: histogram layout per modality, normalised units: pixels above ``floor`` (CT: HU > −900, so
#: air outside the body and in the lungs' core is left out; MRI: 2 % of the 99.5th percentile),
#: ``bins`` equal bins from the floor to ``top`` (CT: 50 HU each)
HISTOGRAMS = {
    "ct": {"floor": 124 / 4096, "top": 1.0, "bins": 79},
    "mri": {"floor": 0.02, "top": 1.5, "bins": 74},
}


def _spacings(paths: Sequence[str]) -> list[float]:
    out: list[float] = []
    for p in paths:
        if is_volume_source(_resolve(p)):  # resliced to VOLUME_SPACING_MM: not the input's spacing
            continue
        with np.load(_resolve(p)) as z:
            if "pixel_spacing_mm" in z.files:
                out += [
                    float(v)
                    for v in np.asarray(z["pixel_spacing_mm"], dtype=np.float64).reshape(-1)
                ]
            elif "spacing_mm" in z.files:  # a volume: (z, y, x)
                out += [
                    float(v) for v in np.asarray(z["spacing_mm"], dtype=np.float64).reshape(-1)[-2:]
                ]
    return [v for v in out if np.isfinite(v) and v > 0]


def measure_domain(
    paths: Sequence[str],
    modality: str,
    curated: dict[str, Any] | None = None,
    validation: Any = None,
    *,
    slices: Any = None,
) -> dict[str, Any]:
    """The ``domain`` block of a prior trained on ``paths`` (``.npz`` training files).

    Parameters
    ----------
    paths : sequence of str
        The training files (relative to ``$MEDRECON_DATA``).
    modality : {"ct", "mri"}
    curated : dict, optional
        ``body_regions`` (DICOM BodyPartExamined terms) and, for MRI, ``contrasts``: kept as given.
    validation : Tensor or ndarray, optional
        Validation slices (normalised): their distances are recorded, to show the threshold
        holds for images the prior never saw.
    slices : Tensor or ndarray, optional
        The training slices of ``paths`` as :func:`~medrecon.training.data.load_slices` gives
        them, when the caller has them already (loaded from ``paths`` otherwise).
    """
    spec = HISTOGRAMS[modality]
    edges = np.linspace(spec["floor"], spec["top"], spec["bins"] + 1)
    if slices is None:
        slices = load_slices(paths, modality)
    x = np.asarray(slices.float() if isinstance(slices, torch.Tensor) else slices, dtype=np.float32)
    hists = []
    for s in x:
        v = s[s > spec["floor"]]
        h = np.histogram(np.clip(v, edges[0], edges[-1]), edges)[0].astype(np.float64)
        if h.sum() > 0:
            hists.append(h / h.sum())
    reference = np.mean(hists, axis=0)
    hist = {
        "floor": round(spec["floor"], 6),
        "edges": [round(float(e), 6) for e in edges],
        "reference": [round(float(r), 6) for r in reference],
    }
    d = histogram_distance(x, hist)
    d = d[np.isfinite(d)]
    hist["tvd_threshold"] = round(float(np.percentile(d, 99.5)), 4)
    hist["training_distance_percentiles"] = {
        f"p{q}": round(float(np.percentile(d, q)), 4) for q in (5, 50, 95, 99.5)
    }
    if validation is not None:
        dv = histogram_distance(np.asarray(validation, dtype=np.float64), hist)
        dv = dv[np.isfinite(dv)]
        hist["validation_distance_max"] = round(float(dv.max()), 4) if dv.size else None
    hist["how"] = (
        "total-variation distance between a slice's histogram of normalised values above the floor and "
        "the mean training histogram; an input warns above tvd_threshold (the training slices' 99.5th "
        "percentile), judged on the median over its slices"
    )
    out: dict[str, Any] = {
        "modality": {"ct": "CT", "mri": "MR"}[modality],
        **dict(curated or {}),
        "slices_measured": int(len(x)),
        "histogram": hist,
    }
    sp = _spacings(paths)
    if sp:
        out["pixel_spacing_mm"] = [round(min(sp), 4), round(max(sp), 4)]
    return out
