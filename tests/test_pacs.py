"""medrecon.pacs against a real Orthanc (DICOMweb and DIMSE).

The server is started from a temporary config bound to 127.0.0.1 on free ports, with HTTP basic
auth, the DICOMweb plugin and a DICOM AE (tests/pacs/orthanc_server.py), and stopped by its pid.
Skipped with the reason where the Orthanc binary or the DICOMweb plugin is absent, or without the
shared real data.  Images are cut to a few tiny slices (--max-size/--max-slices) and reconstructed
with ``fbp`` so that the whole file runs in well under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed")
pytest.importorskip("pynetdicom", reason="pynetdicom is not installed")
sys.path.insert(0, str(Path(__file__).parent / "pacs"))
from orthanc_server import PASSWORD, Orthanc, skip_reason  # noqa: E402

from medrecon.cli.pacs import pacs_main  # noqa: E402
from medrecon.pacs import PacsUnavailableError, RetroSettings, RetryPolicy, pacs_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDRECON_DATA", REPO.parent / "shared" / "data"))
GE = DATA / "dicom_cases" / "dcmqa_GE"              # 28 CT slices, all UIDs present
NO_UIDS = DATA / "ct" / "dicom" / "totalseg_example_ct"  # files without Study/Series/SOP UIDs
TINY = ["--max-size", "32", "--max-slices", "3", "--retries", "2", "--retry-delay", "0.05"]

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pacs(orthanc, monkeypatch, tmp_path):
    """The server, emptied, with the test credentials in the environment only."""
    if not GE.is_dir():
        pytest.skip(f"real data not found at {DATA} (set MEDRECON_DATA)")
    if orthanc.proc is None:
        orthanc.start()
    orthanc.reset()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no stray credentials file
    monkeypatch.delenv("MEDRECON_PACS_CONFIG", raising=False)
    monkeypatch.delenv("MEDRECON_PACS_TOKEN", raising=False)
    for k, v in orthanc.env.items():
        monkeypatch.setenv(k, v)
    return orthanc


def _ge_study(pacs) -> tuple[str, str]:
    inst = pacs.rest("/instances")
    tags = pacs.rest(f"/instances/{inst[0]}/simplified-tags")
    return tags["StudyInstanceUID"], tags["SeriesInstanceUID"]


def _copy_with_new_uids(src: Path, dst: Path, n: int, tag: str) -> Path:
    """A second real series for the batch: ``n`` GE slices with fresh Study/Series/SOP UIDs (tmp only)."""
    import pydicom
    from pydicom.uid import generate_uid

    dst.mkdir(parents=True)
    study, series = generate_uid(entropy_srcs=[tag, "study"]), generate_uid(entropy_srcs=[tag, "series"])
    for k, f in enumerate(sorted(src.glob("*.dcm"))[:n]):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[tag, str(k)])
        ds.save_as(dst / f.name, enforce_file_format=True)
    return dst


def test_push_refuses_files_without_uids(pacs, capsys):
    if not NO_UIDS.is_dir():
        pytest.skip(f"{NO_UIDS} not found")
    rc = pacs_main(["push", pacs.dicomweb_url, str(NO_UIDS)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID; a PACS cannot file it" in err
    assert "nothing was sent" in err and pacs.rest("/instances") == []


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_batch_pacs_to_pacs(pacs, protocol, capsys, tmp_path):
    url = pacs.dicomweb_url if protocol == "dicomweb" else pacs.dimse_url
    assert pacs_main(["push", url, str(GE)]) == 0
    assert "stored 28 instances" in capsys.readouterr().out
    study_uid, series_uid = _ge_study(pacs)
    report = tmp_path / "report.json"
    assert pacs_main(["batch", url, "--method", "fbp", "--views", "12", "--report", str(report), *TINY]) == 0
    out = capsys.readouterr()
    # the derived series sits in the original study: new series, same study and patient
    series = {s["uid"]: s for s in pacs.series_in_study(study_uid)}
    derived = [s for uid, s in series.items() if uid != series_uid]
    assert len(derived) == 1 and derived[0]["n_instances"] == 3
    assert derived[0]["description"] == "medrecon fbp SIMULATED prior=none reconstruction 12 views"
    rec = json.loads(report.read_text())
    assert rec["n_ok"] == 1 and rec["cases"][0]["status"] == "stored"
    assert rec["cases"][0]["derived"]["reconstruction"] == derived[0]["uid"]
    # pull it back and check it as a DICOM object
    pulled = tmp_path / "pulled"
    assert pacs_main(["pull", url, study_uid, "--out", str(pulled)]) == 0
    import pydicom

    src = pydicom.dcmread(next(GE.glob("*.dcm")), stop_before_pixels=True)
    files = [f for d in pulled.iterdir() for f in d.iterdir()]
    mine = [pydicom.dcmread(f) for f in files if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID
            == derived[0]["uid"]]
    assert len(mine) == 3
    for ds in mine:
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.StudyInstanceUID == study_uid and ds.PatientID == src.PatientID
        assert ds.SOPInstanceUID not in {s for s in series[series_uid]["instance_uids"]}
        assert ds.pixel_array.shape == (32, 32) or max(ds.pixel_array.shape) <= 32
    if shutil.which("dciodvfy"):
        for f in files:
            if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID != derived[0]["uid"]:
                continue
            r = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
            errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
            assert errors == [], errors
    # logs and reports name cases by hash only
    text = out.out + out.err + report.read_text()
    for ident in (str(src.PatientID), study_uid, series_uid, PASSWORD):
        assert ident not in text
    # a re-run stores nothing twice
    assert pacs_main(["batch", url, "--report", str(report), "--views", "12", *TINY]) == 0
    assert json.loads(report.read_text())["cases"][0]["status"] == "already-stored"
    after = {s["uid"]: s["n_instances"] for s in pacs.series_in_study(study_uid)}
    assert after == {series_uid: 28, derived[0]["uid"]: 3}


def test_batch_with_a_prior_writes_reconstruction_and_uncertainty_series(pacs, capsys, tmp_path):
    """A diffusion method with the shipped prior (few steps, 2 samples): the reconstruction and
    its uncertainty map go back as two new series of the original study."""
    from medrecon.priors.registry import shipped_registry

    if "ct-256" not in shipped_registry().names():
        pytest.skip("the ct-256 prior is not shipped in this checkout")
    assert pacs_main(["push", pacs.dicomweb_url, str(GE)]) == 0
    study_uid, series_uid = _ge_study(pacs)
    args = ["batch", pacs.dicomweb_url, "--method", "ccdf", "--prior", "ct-256", "--steps", "6",
            "--samples", "2", "--views", "12", *TINY]
    assert pacs_main(args) == 0
    capsys.readouterr()
    derived = {s["description"]: s for s in pacs.series_in_study(study_uid) if s["uid"] != series_uid}
    assert set(derived) == {"medrecon ccdf SIMULATED prior=ct-256 reconstruction 12 views",
                            "medrecon ccdf SIMULATED prior=ct-256 uncertainty (std) 12 views"}
    assert all(s["n_instances"] == 3 for s in derived.values())
    assert pacs_main(args) == 0  # a re-run stores nothing twice
    after = {s["uid"]: s["n_instances"] for s in pacs.series_in_study(study_uid)}
    assert sorted(after.values()) == [3, 3, 28]


def test_medrecon_batch_from_pacs_to_pacs(pacs, capsys, tmp_path):
    """``medrecon batch --source URL --sink URL`` runs one case per series of the query."""
    from medrecon.cli.main import main

    assert pacs_main(["push", pacs.dicomweb_url, str(GE)]) == 0
    study_uid, series_uid = _ge_study(pacs)
    argv = ["batch", "--source", pacs.dicomweb_url, "--query", "ModalitiesInStudy=CT", "--sink", pacs.dicomweb_url,
            "--out", str(tmp_path / "run"), "--method", "fbp", "--views", "12"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 series done, 0 failed" in out and series_uid not in out
    derived = [s for s in pacs.series_in_study(study_uid) if s["uid"] != series_uid]
    assert len(derived) == 1 and derived[0]["description"] == "medrecon fbp SIMULATED prior=none reconstruction 12 views"
    rep = json.loads((tmp_path / "run" / "pacs-report.json").read_text())
    assert rep["n_ok"] == 1


def test_wrong_password_is_a_clear_error_without_the_password(pacs, monkeypatch, capsys):
    wrong = "not-the-Pa55word-42"
    monkeypatch.setenv("MEDRECON_PACS_PASSWORD", wrong)
    for argv in (["ls", pacs.dicomweb_url], ["push", pacs.dicomweb_url, str(GE)],
                 ["batch", pacs.dicomweb_url, *TINY]):
        rc = pacs_main(argv)
        out = capsys.readouterr()
        assert rc == 2, argv
        assert "refused the credentials (HTTP 401)" in out.err
        assert wrong not in out.out + out.err and PASSWORD not in out.out + out.err


def test_dimse_unknown_calling_aet_is_refused(pacs, monkeypatch, capsys):
    monkeypatch.setenv("MEDRECON_PACS_AET", "STRANGER")
    assert pacs_main(["ls", pacs.dimse_url]) == 2
    assert "rejected the association from calling AE title 'STRANGER'" in capsys.readouterr().err


def test_server_down_mid_batch_retries_then_records_failure(pacs, monkeypatch, tmp_path):
    import medrecon.pacs.workflow as wf

    second = _copy_with_new_uids(GE, tmp_path / "second", 4, "medrecon-test-second")
    assert pacs_main(["push", pacs.dicomweb_url, str(GE)]) == 0
    assert pacs_main(["push", pacs.dicomweb_url, str(second)]) == 0
    real = wf.reconstruct_study_to_pacs
    calls = []

    def flaky(*args, **kw):  # the server goes down before the first case and is back for the second
        calls.append(1)
        if len(calls) == 1:
            pacs.stop()
        elif pacs.proc is None:
            pacs.start()
        return real(*args, **kw)

    monkeypatch.setattr(wf, "reconstruct_study_to_pacs", flaky)
    import logging

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("medrecon.pacs").addHandler(handler)
    monkeypatch.setattr(logging.getLogger("medrecon.pacs"), "level", logging.INFO)
    report = tmp_path / "r.json"
    rep = pacs_batch(pacs.dicomweb_url, query="ModalitiesInStudy=CT",
                     settings=RetroSettings(max_size=32, max_slices=2), report=report,
                     retry=RetryPolicy(attempts=3, base_delay_s=0.05))
    logging.getLogger("medrecon.pacs").removeHandler(handler)
    assert [c["status"] for c in rep["cases"]] == ["failed", "stored"]
    failed = rep["cases"][0]
    assert failed["error"] == PacsUnavailableError.__name__
    assert "gave up after 3 attempts" in failed["reason"] and "cannot reach" in failed["reason"]
    assert sum("retrying in" in m for m in seen) == 2, seen
    assert json.loads(report.read_text())["n_failed"] == 1
    assert PASSWORD not in report.read_text()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import medrecon.pacs.client as c
    cls = getattr(c, sys.argv.pop(1))
    real = cls.store_files
    def store_then_die(self, paths):
        real(self, list(paths)[:1])          # one instance reaches the PACS ...
        os.kill(os.getpid(), signal.SIGKILL)  # ... then kill -9, mid-series
    cls.store_files = store_then_die
    from medrecon.cli.pacs import pacs_main
    sys.exit(pacs_main(sys.argv[1:]))
""")


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_kill9_mid_batch_then_resume_stores_each_instance_once(pacs, protocol, tmp_path, capsys):
    url, cls = (pacs.dicomweb_url, "DicomWebPacs") if protocol == "dicomweb" else (pacs.dimse_url, "DimsePacs")
    assert pacs_main(["push", pacs.dicomweb_url, str(GE)]) == 0
    study_uid, series_uid = _ge_study(pacs)
    args = ["batch", url, "--views", "12", *TINY, "--report", str(tmp_path / "r.json")]
    r = subprocess.run([sys.executable, "-c", KILLER, cls, *args], capture_output=True, text=True,
                       timeout=120, env={**os.environ})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    partial = {s["uid"]: s["n_instances"] for s in pacs.series_in_study(study_uid) if s["uid"] != series_uid}
    assert list(partial.values()) == [1]
    # resume: the missing instances are stored, nothing twice
    capsys.readouterr()
    assert pacs_main(args) == 0
    assert "2 stored, 1 already present" in capsys.readouterr().out
    final = {s["uid"]: s for s in pacs.series_in_study(study_uid)}
    assert {u: s["n_instances"] for u, s in final.items()} == {series_uid: 28, **{u: 3 for u in partial}}
    (derived,) = [s for u, s in final.items() if u != series_uid]
    assert len(set(derived["instance_uids"])) == 3
    # and once more: nothing new
    assert pacs_main(args) == 0
    assert {s["uid"]: s["n_instances"] for s in pacs.series_in_study(study_uid)} == {
        series_uid: 28, derived["uid"]: 3}
