"""medrecon.pacs without a server: URLs, credentials, queries, derived UIDs, retries, shrinking."""

from __future__ import annotations

import os

import numpy as np
import pytest

from medrecon.errors import InputError, SettingsError
from medrecon.pacs import (
    PacsUrlError,
    RetryPolicy,
    check_uploadable,
    derived_series_uid,
    derived_sop_uid,
    load_credentials,
    parse_pacs_url,
    parse_query,
    series_case_id,
    write_derived_series,
)
from medrecon.pacs.retry import Transient, call_with_retries


def test_urls():
    u = parse_pacs_url("dicomweb+http://127.0.0.1:8042/dicom-web/")
    assert (u.protocol, u.http_url, u.server_key) == ("dicomweb", "http://127.0.0.1:8042/dicom-web", "127.0.0.1:8042")
    assert parse_pacs_url("dicomweb+https://pacs.example.org/dicom-web").port == 443
    d = parse_pacs_url("dimse://ORTHANC@10.0.0.5:104")
    assert (d.protocol, d.called_aet, d.host, d.port) == ("dimse", "ORTHANC", "10.0.0.5", 104)
    assert d.display() == "dimse://ORTHANC@10.0.0.5:104"


@pytest.mark.parametrize("bad", [
    "http://host/dicom-web", "dicomweb+http://user:pw@host:80/dicom-web", "dimse://host:104",
    "dimse://AET@host", "dimse://AET:pw@host:104", "dimse://WAYTOOLONGAETITLE17@h:1", "nonsense",
])
def test_bad_urls(bad):
    with pytest.raises(PacsUrlError) as err:
        parse_pacs_url(bad)
    assert "pw" not in str(err.value).replace("password", "")


def _env(tmp_path, **kw):
    return {"XDG_CONFIG_HOME": str(tmp_path / "none"), **kw}


def test_credentials_from_env_hide_secrets(tmp_path):
    u = parse_pacs_url("dicomweb+https://pacs:443/dicom-web")
    c = load_credentials(u, _env(tmp_path, MEDRECON_PACS_USER="alice", MEDRECON_PACS_PASSWORD="hunter2"))
    assert (c.username, c.password, c.verify) == ("alice", "hunter2", True)
    assert "hunter2" not in repr(c)
    t = load_credentials(u, _env(tmp_path, MEDRECON_PACS_TOKEN="tok-123", MEDRECON_PACS_VERIFY="0"))
    assert t.token == "tok-123" and t.verify is False and "tok-123" not in repr(t)
    with pytest.raises(SettingsError):
        load_credentials(u, _env(tmp_path, MEDRECON_PACS_PASSWORD="x"))
    with pytest.raises(SettingsError) as err:
        load_credentials(u, _env(tmp_path, MEDRECON_PACS_CA_BUNDLE=str(tmp_path / "missing.pem")))
    assert "missing.pem" in str(err.value)


def test_credentials_file_must_be_0600(tmp_path):
    u = parse_pacs_url("dimse://PACS@pacs.local:104")
    cfg = tmp_path / "pacs.toml"
    cfg.write_text('[default]\ncalling_aet = "RECON1"\n[server."pacs.local:104"]\n'
                   'username = "bob"\npassword = "s3cr3t"\n')
    os.chmod(cfg, 0o644)
    with pytest.raises(SettingsError) as err:
        load_credentials(u, {"MEDRECON_PACS_CONFIG": str(cfg)})
    assert "chmod 600" in str(err.value) and "s3cr3t" not in str(err.value)
    os.chmod(cfg, 0o600)
    c = load_credentials(u, {"MEDRECON_PACS_CONFIG": str(cfg)})
    assert (c.username, c.password, c.calling_aet) == ("bob", "s3cr3t", "RECON1")
    # environment wins over the file; other servers get only [default]
    assert load_credentials(u, {"MEDRECON_PACS_CONFIG": str(cfg), "MEDRECON_PACS_AET": "X"}).calling_aet == "X"
    other = load_credentials(parse_pacs_url("dimse://PACS@other:104"), {"MEDRECON_PACS_CONFIG": str(cfg)})
    assert other.username is None
    cfg.write_text('[default]\npasword = "typo"\n')
    with pytest.raises(SettingsError, match="unknown keys"):
        load_credentials(u, {"MEDRECON_PACS_CONFIG": str(cfg)})
    with pytest.raises(SettingsError, match="does not exist"):
        load_credentials(u, {"MEDRECON_PACS_CONFIG": str(tmp_path / "nope.toml")})


def test_parse_query():
    assert parse_query("ModalitiesInStudy=CT&StudyDate=20240101-") == {
        "ModalitiesInStudy": "CT", "StudyDate": "20240101-"}
    assert parse_query(None) == {} and parse_query("") == {}
    with pytest.raises(SettingsError, match="not a DICOM keyword"):
        parse_query("Modality=CT&Bogus=1")
    with pytest.raises(SettingsError):
        parse_query("ModalitiesInStudy")


def test_derived_uids_are_deterministic():
    a = derived_series_uid("1.2.3", "fbp", {"views": 23})
    assert a == derived_series_uid("1.2.3", "fbp", {"views": 23})
    assert a != derived_series_uid("1.2.3", "fbp", {"views": 24})
    assert a != derived_series_uid("1.2.4", "fbp", {"views": 23})
    assert a != derived_series_uid("1.2.3", "tv", {"views": 23})
    assert a != derived_series_uid("1.2.3", "fbp", {"views": 23}, kind="uncertainty")
    assert derived_sop_uid(a, 0) != derived_sop_uid(a, 1) and len(a) <= 64
    assert series_case_id("1.2.3").startswith("case-") and "1.2.3" not in series_case_id("1.2.3")


def test_write_derived_series_and_uncertainty(tmp_path):
    import pydicom

    from medrecon.datasets import Volume

    meta = {"dicom": {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1", "PatientID": "P1",
                      "PatientName": "Doe^Jane", "SeriesNumber": "3"}}
    vol = Volume(np.zeros((2, 8, 8), np.float32) - 1000, np.eye(4), "CT", meta)
    std = Volume(np.full((2, 8, 8), 3.5, np.float32), np.eye(4), "CT", meta)
    kw = dict(input_series_uid="1.2.3.4", method="song", settings={"steps": 10}, prior="ct-small")
    uid, files = write_derived_series(vol, tmp_path / "rec", **kw)
    uid_std, files_std = write_derived_series(std, tmp_path / "std", kind="uncertainty", **kw)
    again, _ = write_derived_series(vol, tmp_path / "rec2", **kw)
    assert uid == again and uid != uid_std
    ds = pydicom.dcmread(files[1])
    assert ds.SeriesInstanceUID == uid and ds.SOPInstanceUID == derived_sop_uid(uid, 1)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.1" and ds.PatientID == "P1"
    assert ds.SeriesDescription == "medrecon song prior=ct-small reconstruction"
    s = pydicom.dcmread(files_std[0])
    assert s.SeriesDescription == "medrecon song prior=ct-small uncertainty (std)"
    assert float(s.pixel_array[0, 0] * float(s.RescaleSlope) + float(s.RescaleIntercept)) == pytest.approx(3.5)
    with pytest.raises(InputError):
        write_derived_series(vol, tmp_path / "rec", **kw)


def test_derived_series_of_other_methods_get_other_series_numbers(tmp_path):
    """Issue 31: one SeriesNumber per method and kind in the study the results go into."""
    import pydicom

    from medrecon.datasets import Volume

    meta = {"dicom": {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1", "SeriesNumber": "3"}}
    vol = Volume(np.zeros((1, 8, 8), np.float32), np.eye(4), "CT", meta)
    numbers = set()
    for method in ("fbp", "tv"):
        for kind in ("reconstruction", "uncertainty"):
            _, files = write_derived_series(vol, tmp_path / f"{method}-{kind}", input_series_uid="1.2.3.4",
                                            method=method, settings={}, kind=kind)
            numbers.add(int(pydicom.dcmread(files[0]).SeriesNumber))
    assert len(numbers) == 4, numbers


def test_check_uploadable_rejects_files_without_uids(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(tmp_path / "ok.dcm")
    del ds.SeriesInstanceUID
    ds.save_as(tmp_path / "bad.dcm")
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(InputError) as err:
        check_uploadable(sorted(tmp_path.iterdir()))
    assert "bad.dcm" in str(err.value) and "lacks SeriesInstanceUID" in str(err.value)
    assert "2 of 3 files are unusable; nothing was sent" in str(err.value)
    assert len(check_uploadable([tmp_path / "ok.dcm"])) == 1


def test_retries_are_bounded_with_backoff():
    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Transient("HTTP 503")
        return "ok"

    pol = RetryPolicy(attempts=4, base_delay_s=0.5, max_delay_s=1.5)
    assert call_with_retries(flaky, pol, "t", RuntimeError, sleep=waits.append) == "ok"
    assert waits == [0.5, 1.0]

    def down():
        raise Transient("cannot reach")

    waits.clear()
    with pytest.raises(RuntimeError, match="gave up after 4 attempts"):
        call_with_retries(down, pol, "t", RuntimeError, sleep=waits.append)
    assert waits == [0.5, 1.0, 1.5]
    with pytest.raises(SettingsError):
        RetryPolicy(attempts=0)


def test_shrink_keeps_geometry_exact():
    from medrecon.datasets import Volume
    from medrecon.pacs.workflow import _shrink

    aff = np.array([[0.7, 0, 0, -40], [0, 0.8, 0, 25], [0, 0, 2.5, 10], [0, 0, 0, 1.0]])
    arr = np.arange(6 * 30 * 40, dtype=np.float32).reshape(6, 30, 40)
    small = _shrink(Volume(arr, aff, "CT", {"dicom": {"pixel_spacing_mm": [0.8, 0.7]}}), 10, 2)
    assert small.shape == (2, 7, 10)
    # the centre of output voxel (0, 0, 0) is the centre of the 4x4 input block at slice 2
    assert np.allclose(small.voxel_to_ras([0, 0, 0]), Volume(arr, aff).voxel_to_ras([2, 1.5, 1.5]))
    assert np.allclose(small.voxel_to_ras([1, 2, 3]), Volume(arr, aff).voxel_to_ras([3, 9.5, 13.5]))
    assert small.array[0, 0, 0] == pytest.approx(arr[2, :4, :4].mean())
    assert small.meta["dicom"]["pixel_spacing_mm"] == pytest.approx([3.2, 2.8])
    with pytest.raises(SettingsError):
        _shrink(Volume(arr, aff), 4, None)


def test_docs_pacs_examples_run():
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "pacs.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(doc), "exec"), {})


def test_dicomweb_session_tls_and_bearer(tmp_path):
    pytest.importorskip("dicomweb_client")
    import requests

    from medrecon.pacs import Credentials, open_pacs

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    url = "dicomweb+https://pacs.example.org/dicom-web"
    client = open_pacs(url, Credentials(token="tok-xyz", ca_bundle=str(ca)))
    session = client._client._session
    assert session.verify == str(ca) and "tok-xyz" not in repr(session.auth)
    req = session.prepare_request(requests.Request("GET", "https://pacs.example.org/dicom-web/studies"))
    assert req.headers["Authorization"] == "Bearer tok-xyz"
    assert open_pacs(url, Credentials())._client._session.verify is True  # verification on by default
    assert open_pacs(url, Credentials(verify=False))._client._session.verify is False
