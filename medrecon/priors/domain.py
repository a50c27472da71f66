"""Is an input like what a prior was trained on?  The card's ``domain`` against the input.

A diffusion prior fills in what the measurement leaves open with what its training images looked
like.  On an input unlike them (a phantom under the human-CT prior, an abdominal MR under the
brain-FLAIR prior) the result can look plausible and be wrong, so every run outside the prior's
domain says so.  :func:`check_domain` compares

* the input's **modality**, **body region** and **MR contrast** (from the DICOM header where
  the input has one: ``Modality``, ``BodyPartExamined`` and the series/protocol descriptions)
  with the card's lists;
* its **pixel spacing** with the range of the training slices;
* its **intensity histogram** with the training slices' (a statistical check on the data itself):
  the total-variation distance between the histogram of the image's non-background pixels, in
  the prior's normalised units, and the mean histogram of the training slices, against the
  distance the training slices themselves reach (``tvd_threshold``, their 99.5th percentile).

The card's ``domain`` block is measured from the training data by
:func:`medrecon.training.domain.measure_domain`.  What cannot be checked (no header, no spacing)
is a note, not a warning.  The histogram check is coarse: it separates phantoms from patients,
and it does not separate one anatomy from another of the same modality (measured in
docs/benchmarks.md); the body-region check relies on the header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DomainReport",
    "check_domain",
    "histogram_distance",
    "normalised_for_domain",
    "MR_CONTRASTS",
]

#: MR contrast names recognised in SeriesDescription / ProtocolName / SequenceName (first match
#: in this order wins: "T2 FLAIR" is FLAIR)
MR_CONTRASTS = {
    "FLAIR": r"flair|\bdark[ _-]?fluid|\btirm\b",
    "DWI": r"\bdwi\b|diffusion|\bep2d_diff|\btrace\b|\badc\b",
    "SWI": r"\bswi\b|susceptib",
    "T1": r"\bt1|mprage|mp-rage|\bspgr\b|\bbravo\b|\bvibe\b|\btfl\b",
    "T2": r"\bt2|\btse\b|\bhaste\b|\bspace\b|\bciss\b",
    "PD": r"\bpd\b|proton[ _-]?density",
}

#: body-region words in descriptions, mapped to DICOM BodyPartExamined terms
_REGION_WORDS = {
    "HEAD": r"\bhead\b|\bbrain\b|\bskull\b|\bcran|\bneuro",
    "NECK": r"\bneck\b|\bcervical\b",
    "CHEST": r"\bchest\b|\bthorax\b|\blung|\bthoracic\b",
    "ABDOMEN": r"\babdom|\bliver\b|\bpancrea|\brenal\b",
    "PELVIS": r"\bpelvi|\bprostat|\bbladder\b",
    "SPINE": r"\bspine\b|\blumbar\b|\bl-spine\b",
    "KNEE": r"\bknee\b",
    "BREAST": r"\bbreast\b|\bmamm",
    "EXTREMITY": r"\barm\b|\bleg\b|\bthigh\b|\bankle\b|\bwrist\b",
}
#: BodyPartExamined synonyms folded together
_REGION_ALIASES = {
    "BRAIN": "HEAD",
    "SKULL": "HEAD",
    "THORAX": "CHEST",
    "LUNG": "CHEST",
    "ABDOMENPELVIS": "ABDOMEN",
    "WHOLEBODY": "WHOLEBODY",
    "CSPINE": "SPINE",
    "LSPINE": "SPINE",
    "TSPINE": "SPINE",
    "ARM": "EXTREMITY",
    "LEG": "EXTREMITY",
    "HAND": "EXTREMITY",
    "FOOT": "EXTREMITY",
}


@dataclass
class DomainReport:
    """What :func:`check_domain` found.

    Attributes
    ----------
    warnings : list of str
        One line per way the input is outside the prior's domain (empty: inside, as far as
        checked).
    notes : list of str
        What could not be checked, and why.
    stats : dict
        The numbers behind them (histogram distance and its threshold, spacing, header values).
    """

    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def in_domain(self) -> bool:
        return not self.warnings

    def as_record(self) -> dict[str, Any]:
        return {
            "in_domain": self.in_domain,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "stats": dict(self.stats),
        }


def normalised_for_domain(image: np.ndarray, card: dict[str, Any]) -> np.ndarray:
    """``image`` (caller units: HU for CT, magnitude for MRI) in the prior's normalised units.

    A ``window`` normaliser maps ``[low, high]`` to ``[0, 1]``; a ``percentile`` one divides by
    the image's own percentile (the 99.5th, as :func:`medrecon.api.problem_scale` does).
    """
    a = (
        np.abs(image).astype(np.float64)
        if np.iscomplexobj(image)
        else np.asarray(image, dtype=np.float64)
    )
    norm = card.get("normaliser", {})
    if norm.get("kind") == "window":
        low, high = float(norm["low"]), float(norm["high"])
        return np.clip((a - low) / (high - low), 0.0, 1.0)
    p = float(np.percentile(a, float(norm.get("percentile", 99.5)))) if a.size else 1.0
    return a / (p if p > 0 else 1.0)


def histogram_distance(slices_n: np.ndarray, hist: dict[str, Any]) -> np.ndarray:
    """Per slice, the total-variation distance (0 … 1) between the histogram of its pixels above
    ``hist["floor"]`` (normalised units) and ``hist["reference"]`` over ``hist["edges"]``; NaN
    for a slice with no such pixels."""
    edges = np.asarray(hist["edges"], dtype=np.float64)
    ref = np.asarray(hist["reference"], dtype=np.float64)
    out = []
    for s in np.asarray(slices_n, dtype=np.float64).reshape(-1, *np.shape(slices_n)[-2:]):
        v = s[s > float(hist["floor"])]
        h = np.histogram(np.clip(v, edges[0], edges[-1]), edges)[0].astype(np.float64)
        out.append(0.5 * float(np.abs(h / h.sum() - ref).sum()) if h.sum() > 0 else float("nan"))
    return np.asarray(out)


def _contrast(text: str) -> str | None:
    for name, pattern in MR_CONTRASTS.items():
        if re.search(pattern, text, re.IGNORECASE):
            return name
    return None


def _region(body_part: str, text: str) -> str | None:
    bp = re.sub(r"[^A-Z]", "", str(body_part or "").upper())
    if bp:
        return _REGION_ALIASES.get(bp, bp)
    for name, pattern in _REGION_WORDS.items():
        if re.search(pattern, text, re.IGNORECASE):
            return name
    return None


def check_domain(
    card: dict[str, Any],
    image: np.ndarray,
    *,
    modality: str | None = None,
    dicom: dict[str, Any] | None = None,
    spacing_mm: tuple[float, float] | None = None,
) -> DomainReport:
    """Compare an input with the domain its prior's card describes.

    Parameters
    ----------
    card : dict
        The prior's model card; its ``domain`` block (absent: only the modality is checked,
        and a note says so).
    image : ndarray, shape (Z, Y, X) or (Y, X)
        The image the prior is applied to, in caller units (HU, magnitude).  A case passes the
        reconstruction.
    modality : str, optional
        ``"ct"``/``"CT"`` or ``"mri"``/``"MR"``: the input's modality (the DICOM header's when
        it has one, else the case's).
    dicom : dict, optional
        Header values of the input series (``Modality``, ``BodyPartExamined``,
        ``SeriesDescription``, ``ProtocolName``, ``SequenceName``, ``StudyDescription``).
    spacing_mm : (float, float), optional
        In-plane pixel spacing of ``image``.
    """
    rep = DomainReport()
    dom = card.get("domain") or {}
    name = card.get("name", "the prior")
    dicom = dict(dicom or {})
    want = str(dom.get("modality") or card.get("modality", "")).upper().replace("MRI", "MR")
    got = str(dicom.get("Modality") or modality or "").upper().replace("MRI", "MR")
    rep.stats["modality"] = got or None
    if want and got and got != want:
        rep.warnings.append(f"the input is {got}; {name} was trained on {want} only")
    if not dom:
        rep.notes.append(
            f"{name}'s card describes no training domain: body region, contrast, spacing and "
            "intensities not checked"
        )
        return rep
    text = " ".join(
        str(dicom.get(k) or "")
        for k in ("SeriesDescription", "ProtocolName", "SequenceName", "StudyDescription")
    )
    regions = [str(r).upper() for r in dom.get("body_regions", [])]
    region = (
        _region(str(dicom.get("BodyPartExamined") or ""), text)
        if (dicom.get("BodyPartExamined") or text.strip())
        else None
    )
    rep.stats["body_region"] = region
    if region and regions and region not in regions:
        rep.warnings.append(
            f"the input's body region is {region}; {name} was trained on "
            f"{', '.join(r.lower() for r in regions)} only"
        )
    elif not region and regions:
        rep.notes.append(
            f"body region not recorded in the input: not checked ({name}: "
            f"{', '.join(r.lower() for r in regions)})"
        )
    contrasts = [str(c).upper() for c in dom.get("contrasts", [])]
    if contrasts:
        contrast = _contrast(text)
        rep.stats["contrast"] = contrast
        if contrast and contrast not in contrasts:
            rep.warnings.append(
                f"the input's MR contrast is {contrast}; {name} was trained on "
                f"{', '.join(contrasts)} only"
            )
        elif not contrast:
            rep.notes.append(
                f"MR contrast not recorded in the input: not checked ({name}: {', '.join(contrasts)})"
            )
    lo_hi = dom.get("pixel_spacing_mm")
    if lo_hi and spacing_mm is not None:
        s = float(min(spacing_mm))
        rep.stats["pixel_spacing_mm"] = round(s, 4)
        lo, hi = float(lo_hi[0]), float(lo_hi[1])
        if (
            not lo / 1.5 <= s <= hi * 1.5
        ):  # a resampled image may sit a little outside the measured range
            rep.warnings.append(
                f"the input's pixel spacing {s:.3g} mm is outside the training range "
                f"{lo:.3g}–{hi:.3g} mm of {name}"
            )
    elif lo_hi:
        rep.notes.append("pixel spacing unknown: not checked")
    hist = dom.get("histogram")
    if hist:
        img = np.asarray(image)
        img = img.reshape(-1, *img.shape[-2:])
        d = histogram_distance(normalised_for_domain(img, card), hist)
        d = d[np.isfinite(d)]
        if d.size:
            med = float(np.median(d))
            thr = float(hist["tvd_threshold"])
            rep.stats["intensity_distance"] = round(med, 4)
            rep.stats["intensity_threshold"] = round(thr, 4)
            if med > thr:
                rep.warnings.append(
                    f"the input's intensities are unlike {name}'s training images (histogram distance {med:.2f}; "
                    f"the training slices reach {thr:.2f}): a phantom or an unusual scan?"
                )
    return rep
