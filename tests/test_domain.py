"""Out-of-domain warnings (issue 31 item 2) and what the uncertainty map means (item 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medrecon.priors.domain import check_domain
from medrecon.priors.registry import shipped_registry

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDRECON_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def cards():
    reg = shipped_registry()
    return {"ct": reg.card("ct-256"), "mri": reg.card("mri-256")}


def _phantom(n=256, value=700.0):
    """An asymmetric disc phantom in HU: air outside, a water-like disc with dense inserts."""
    yy, xx = np.mgrid[:n, :n] / n
    img = np.full((n, n), -1000.0)
    img[(yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.16] = value
    img[(yy - 0.35) ** 2 + (xx - 0.6) ** 2 < 0.004] = 1500.0
    img[(yy - 0.6) ** 2 + (xx - 0.3) ** 2 < 0.002] = -200.0
    return img[None]


def _brain_like(n=256):
    """An oval "head" whose values are drawn from the MRI prior's own reference histogram (so
    that only the header can put it outside the domain)."""
    hist = shipped_registry().card("mri-256")["domain"]["histogram"]
    edges, ref = np.asarray(hist["edges"]), np.asarray(hist["reference"])
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[:n, :n] / n
    head = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.35) ** 2 < 1
    k = g.choice(len(ref), size=int(head.sum()), p=ref / ref.sum())
    img = np.zeros((n, n))
    img[head] = edges[k] + g.random(k.size) * np.diff(edges)[k]
    return img[None] / 1.0


# (name, modality key, image, kwargs, words that must be in a warning, or None: no warning)
CASES = [
    ("CT input under the MRI prior", "mri", _brain_like(), {"modality": "CT"}, ["is CT", "MR only"]),
    ("abdominal MR by BodyPartExamined", "mri", _brain_like(), {"modality": "MR",
     "dicom": {"BodyPartExamined": "ABDOMEN", "SeriesDescription": "t2_haste_tra FLAIR"}}, ["ABDOMEN"]),
    ("liver MR by its description", "mri", _brain_like(), {"modality": "MR",
     "dicom": {"SeriesDescription": "liver t1_vibe_dixon"}}, ["ABDOMEN"]),
    ("brain T2 TSE: contrast", "mri", _brain_like(), {"modality": "MR",
     "dicom": {"BodyPartExamined": "BRAIN", "SeriesDescription": "t2_tse_tra"}}, ["contrast is T2"]),
    ("brain DWI: contrast", "mri", _brain_like(), {"modality": "MR",
     "dicom": {"BodyPartExamined": "BRAIN", "SeriesDescription": "ep2d_diff_3scan_trace"}}, ["contrast is DWI"]),
    ("brain T1 MPRAGE is in the widened domain", "mri", _brain_like(), {"modality": "MR",
     "dicom": {"BodyPartExamined": "BRAIN", "SeriesDescription": "t1_mprage_sag"}}, None),
    ("brain FLAIR is in the domain", "mri", _brain_like(), {"modality": "MR",
     "dicom": {"BodyPartExamined": "HEAD", "SeriesDescription": "t2_tirm_tra_dark-fluid FLAIR"}}, None),
    ("CT phantom by its intensities", "ct", _phantom(), {"modality": "CT", "spacing_mm": (1.0, 1.0)},
     ["intensities are unlike"]),
    ("CT at 5 mm pixels", "ct", _phantom(value=40.0), {"modality": "CT", "spacing_mm": (5.0, 5.0)},
     ["pixel spacing 5 mm"]),
    ("breast CT region", "ct", _phantom(), {"modality": "CT", "dicom": {"BodyPartExamined": "BREAST"}},
     ["BREAST"]),
]


@pytest.mark.parametrize(("name", "which", "image", "kw", "words"), CASES, ids=[c[0] for c in CASES])
def test_check_domain_table(cards, name, which, image, kw, words):
    rep = check_domain(cards[which], image, **kw)
    if words is None:
        assert rep.in_domain, rep.warnings
    else:
        assert not rep.in_domain
        text = " ".join(rep.warnings)
        for w in words:
            assert w in text, (w, rep.warnings)


def test_unrecorded_header_is_a_note_not_a_warning(cards):
    rep = check_domain(cards["mri"], _brain_like(), modality="MR")
    assert rep.in_domain and any("body region not recorded" in n for n in rep.notes)
    assert any("contrast not recorded" in n for n in rep.notes)


def test_a_card_without_domain_says_what_was_not_checked():
    rep = check_domain({"name": "x", "modality": "ct"}, _phantom(), modality="CT")
    assert rep.in_domain and "describes no training domain" in rep.notes[0]


@pytest.mark.skipif(not (DATA / "ct" / "val.npz").exists(), reason=f"validation data not found under {DATA} "
                    "(set MEDRECON_DATA)")
def test_validation_slices_do_not_warn(cards):
    """Every validation slice (never trained on) is inside its prior's domain: CT in HU with its
    pixel spacing, MRI FLAIR magnitudes, each slice checked on its own."""
    with np.load(DATA / "ct" / "val.npz") as z:
        hu, sp = z["images"].astype(np.float64), z["pixel_spacing_mm"]
    for k in range(len(hu)):
        rep = check_domain(cards["ct"], hu[k], modality="CT", spacing_mm=(float(np.ravel(sp[k])[0]),) * 2)
        assert rep.in_domain, (k, rep.warnings)
    with np.load(DATA / "mri" / "val.npz") as z:
        mr = z["images"].astype(np.float64) / 65535
    for k in range(0, len(mr), 4):
        rep = check_domain(cards["mri"], mr[k], modality="MR",
                           dicom={"BodyPartExamined": "BRAIN", "SeriesDescription": "FLAIR"})
        assert rep.in_domain, (k, rep.warnings)


def test_cli_phantom_warns_in_console_record_figure_and_files(tmp_path, capsys):
    """A phantom (NIfTI, 1 mm pixels) reconstructed with the CT prior: the warning is printed, in
    the record, the figure's caption and both NIfTI headers; the uncertainty says it is sampling
    spread, not error."""
    from medrecon.cli.main import main

    n = 64
    img = _phantom(n)[0].T[:, :, None].astype(np.float32)  # NIfTI (x, y, z)
    nib.save(nib.Nifti1Image(img, np.diag([4.0, 4.0, 4.0, 1.0])), tmp_path / "phantom.nii.gz")
    rc = main(["reconstruct", "--modality", "ct", "--input", str(tmp_path / "phantom.nii.gz"), "--views", "23",
               "--method", "dds", "--samples", "2", "--steps", "8", "--out", str(tmp_path / "out")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "outside the prior's training domain" in err and "intensities are unlike" in err
    rec = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert not rec["domain"]["in_domain"]
    assert any("outside the prior's training domain" in w for w in rec["warnings"])
    assert rec["uncertainty"]["meaning"].startswith("the map shows the spread of the posterior samples, not the error")
    for f in (tmp_path / "out").glob("*.nii.gz"):
        hdr = nib.load(f).header
        assert b"CAUTION" in hdr["descrip"].tobytes(), f
        ext = json.loads(hdr.extensions[0].get_content())
        cautions = next(iter(ext.values()))["cautions"]
        assert any("training domain" in c for c in cautions)
        if f.name.endswith("_std.nii.gz"):
            assert any("not the error" in c for c in cautions)


def test_uncertainty_meaning_wording():
    from medrecon.pipeline.case import uncertainty_meaning
    from medrecon.priors.domain import DomainReport

    cal = {"std_scale": 1.7, "std_calibration": "parallel-23/dds: fitted with 4 samples on 6 held-out images"}
    assert uncertainty_meaning(cal).startswith("calibrated: scaled ×1.7")
    assert "not the error" in uncertainty_meaning(cal, DomainReport(warnings=["x"]))
    assert "no calibration applies (none stored for parallel-37/dds)" in uncertainty_meaning(
        {"std_scale": 1.0, "std_calibration": "none stored for parallel-37/dds"})
