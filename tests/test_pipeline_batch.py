"""Batch pipelines: manifests, isolation of failing cases (exit 3), completion records and resume
after a real ``kill -9``, and Dask LocalCluster == local executor."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medrecon.cli.main import main
from medrecon.datasets import Volume, load_nifti, save_nifti
from medrecon.errors import InputError, SettingsError
from medrecon.pipeline.batch import BatchConfig, run_batch
from medrecon.pipeline.case import ReconstructConfig, case_seed
from medrecon.pipeline.manifest import read_cases
from medrecon.pipeline.records import read_valid_record, record_path, sha256_file

REPO = Path(__file__).resolve().parents[1]


def _phantom(path: Path, n: int = 40, shift: int = 0) -> Path:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    img = np.where((xx - shift) ** 2 + yy**2 < (0.3 * n) ** 2, 40.0, -1000.0).astype(np.float32)
    img[n // 2 - 2 : n // 2 + 2, n // 3 : n // 3 + 4] = 600.0
    save_nifti(Volume(img[None], np.diag([0.9, 0.9, 2.0, 1.0]), "CT"), path)
    return path


def _manifest(folder: Path, rows: list[dict[str, str]]) -> Path:
    path = folder / "cases.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    return path


def _good_cases(folder: Path, k: int, **extra: str) -> list[dict[str, str]]:
    return [{"case_id": f"c{i}", "input": _phantom(folder / f"p{i}.nii.gz", shift=i).name, **extra} for i in range(k)]


def _digests(out: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(out)): (sha256_file(p), p.stat().st_mtime_ns)
            for p in sorted((out / "cases").rglob("*")) if p.is_file()}


def test_manifest_columns_defaults_and_errors(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    path = _manifest(src, [*_good_cases(src, 2), {"case_id": "", "input": "p0.nii.gz", "method": "tv", "views": "30"}])
    specs = read_cases(path, ReconstructConfig(method="fbp", iters=7), tmp_path / "out")
    assert [s.case_id for s in specs][:2] == ["c0", "c1"] and specs[2].case_id.startswith("case-")
    assert specs[0].config.input == str(src / "p0.nii.gz") and specs[0].config.out == str(tmp_path / "out" / "cases" / "c0")
    assert specs[0].config.iters is None  # batch-wide --iters does not reach fbp
    assert (specs[2].config.method, specs[2].config.views, specs[2].config.iters) == ("tv", 30, 7)
    for bad, text in [({"input": "a", "colour": "x"}, "unknown manifest column"),
                      ({"input": "a", "views": "many"}, "cannot read 'many'"),
                      ({"case_id": "x"}, "needs an 'input' column")]:
        with pytest.raises(InputError, match=text):
            read_cases(_manifest(src, [bad]), ReconstructConfig(), tmp_path / "out")
    with pytest.raises(InputError, match="appears twice"):
        read_cases(_manifest(src, [{"case_id": "a", "input": "x"}, {"case_id": "a", "input": "y"}]),
                   ReconstructConfig(), tmp_path)
    with pytest.raises(InputError, match="case ID '../x'"):
        read_cases(_manifest(src, [{"case_id": "../x", "input": "x"}]), ReconstructConfig(), tmp_path)


def test_folder_source_one_case_per_file(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _good_cases(src, 2)
    specs = read_cases(src, ReconstructConfig(), tmp_path / "out")
    assert len(specs) == 2 and all(s.case_id.startswith("case-") for s in specs)


def test_case_seed_depends_on_run_seed_and_case_only():
    assert case_seed(0, "c1") == case_seed(0, "c1") != case_seed(1, "c1") != case_seed(0, "c2")


def test_batch_with_corrupt_inputs_exit_3_and_report(tmp_path, capsys):
    src = tmp_path / "Doe_John_study"  # a folder named like a patient: must not leak into reports
    src.mkdir()
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    np.save(src / "sino.npy", np.full((10, 57), np.nan, np.float32))
    (src / "sino.json").write_text(json.dumps({"type": "parallel", "angles_rad": list(np.linspace(0, 3, 10)),
                                               "n_detectors": 57}))
    rows = [*_good_cases(src, 2), {"case_id": "bad1", "input": "broken.nii.gz"},
            {"case_id": "bad2", "input": "missing.nii.gz"}, {"case_id": "bad3", "input": "sino.npy"}]
    out = tmp_path / "out"
    rc = main(["batch", str(_manifest(src, rows)), "--out", str(out), "--method", "fbp", "--views", "20"])
    text = capsys.readouterr().out
    assert rc == 3 and "5 cases: 2 done" in text and "3 failed" in text
    summary = json.loads((out / "summary.json").read_text())
    status = {r["case_id"]: r for r in summary["cases"]}
    assert [status[c]["status"] for c in ("c0", "c1", "bad1", "bad2", "bad3")] == ["done"] * 2 + ["failed"] * 3
    assert "unreadable NIfTI" in status["bad1"]["reason"] and "no such file" in status["bad2"]["reason"]
    assert "NaN" in status["bad3"]["reason"]
    with open(out / "summary.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["done", "done", "failed", "failed", "failed"]
    report = (out / "report.html").read_text()
    for cid in ("bad1", "bad2", "bad3"):
        assert cid in report
    assert report.count("<img src='cases/") == 2 and (out / status["c0"]["thumb"]).is_file()
    for f in (out / "report.html", out / "summary.csv", out / "summary.json", out / "batch.log"):
        assert "Doe_John" not in f.read_text()
    assert record_path(out, "c0").is_file() and not record_path(out, "bad1").exists()
    assert (out / "records" / "bad1.failed.json").is_file()


def test_resume_skips_valid_and_redoes_tampered(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    manifest = _manifest(src, _good_cases(src, 2))
    cfg = BatchConfig(str(manifest), str(tmp_path / "out"), ReconstructConfig(method="fbp", views=12))
    first = run_batch(cfg)
    assert not first.failed and first.reused == 0
    before = _digests(tmp_path / "out")
    nii = tmp_path / "out" / "cases" / "c1" / "c1_fbp.nii.gz"
    nii.write_bytes(nii.read_bytes()[:-10])  # corrupt a finished output
    second = run_batch(cfg)
    assert [r["reused"] for r in second.rows] == [True, False]
    after = _digests(tmp_path / "out")
    assert {k: v for k, v in after.items() if "/c0/" in k} == {k: v for k, v in before.items() if "/c0/" in k}
    assert after["cases/c1/c1_fbp.nii.gz"][0] == before["cases/c1/c1_fbp.nii.gz"][0]  # same result again
    spec = read_cases(manifest, ReconstructConfig(method="fbp", views=13), tmp_path / "out")[0]
    assert read_valid_record(tmp_path / "out", spec.config) is None  # other settings: recomputed


def test_resume_after_kill_9(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    manifest = _manifest(src, _good_cases(src, 3, method="fbp"))  # ≥ 1 s per case (figure)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medrecon.cli.main", "batch", str(manifest), "--out", str(out), "--views", "12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 90
    while not list((out / "records").glob("*.done.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    time.sleep(0.2)  # into the next case
    assert proc.poll() is None, "batch finished before it could be killed; make the cases slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = sorted(p.name.split(".")[0] for p in (out / "records").glob("*.done.json"))
    assert 1 <= len(done_before) < 3
    # every completion record matches its files; finished cases are not recomputed
    for cid in done_before:
        record = json.loads(record_path(out, cid).read_text())
        for rel, digest in record["outputs"].items():
            assert sha256_file(out / rel) == digest
    before = _digests(out)
    res = run_batch(BatchConfig(str(manifest), str(out), ReconstructConfig(views=12)))
    assert not res.failed and len(res.rows) == 3
    assert sorted(r["case_id"] for r in res.rows if r["reused"]) == done_before
    after = _digests(out)
    for key, value in before.items():
        if any(f"cases/{cid}/" in key for cid in done_before):
            assert after[key] == value, key  # untouched: same bytes, same mtime
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    for r in res.rows:  # nothing corrupt: every output opens
        assert load_nifti(out / "cases" / r["case_id"] / f"{r['case_id']}_fbp.nii.gz").shape == (1, 40, 40)


def test_dask_localcluster_matches_local(tmp_path):
    pytest.importorskip("distributed")
    src = tmp_path / "in"
    src.mkdir()
    manifest = _manifest(src, [*_good_cases(src, 2, method="fbp"), {"case_id": "bad", "input": "none.nii.gz"}])
    local = run_batch(BatchConfig(str(manifest), str(tmp_path / "local"), ReconstructConfig(views=16, noise=0.05)))
    dask = run_batch(BatchConfig(str(manifest), str(tmp_path / "dask"), ReconstructConfig(views=16, noise=0.05),
                                 workers=2))
    assert [r["status"] for r in dask.rows] == [r["status"] for r in local.rows] == ["done"] * 2 + ["failed"]
    assert dask.rows[2]["reason"] == local.rows[2]["reason"]
    for r in local.rows[:2]:
        name = f"{r['case_id']}/{r['case_id']}_fbp.nii.gz"
        a = load_nifti(tmp_path / "local" / "cases" / name).array
        b = load_nifti(tmp_path / "dask" / "cases" / name).array
        np.testing.assert_array_equal(a, b)  # same per-case seeds (noise), same result
        assert r["psnr"] == next(d["psnr"] for d in dask.rows if d["case_id"] == r["case_id"])


def test_dask_joins_an_existing_scheduler(tmp_path):
    """``--scheduler tcp://…`` joins a cluster someone else started (here a LocalCluster)."""
    distributed = pytest.importorskip("distributed")
    src = tmp_path / "in"
    src.mkdir()
    manifest = _manifest(src, _good_cases(src, 2, method="fbp"))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        res = run_batch(BatchConfig(str(manifest), str(tmp_path / "out"), ReconstructConfig(views=16),
                                    scheduler=cl.scheduler_address))
    assert [r["status"] for r in res.rows] == ["done", "done"]
    with pytest.raises(SettingsError, match="cannot connect"):
        run_batch(BatchConfig(str(manifest), str(tmp_path / "out2"), ReconstructConfig(views=16),
                              scheduler="tcp://127.0.0.1:9"))


# ------------------------------------------------------------------ folder mode (issue 24, item 6)
def _dicom_series(folder: Path, seed: int, *, uid: bool = True, description: str = "", n: int = 3) -> Path:
    """A small CT series written by medrecon, then edited like an anonymised export."""
    import pydicom

    from medrecon.datasets import save_dicom_series

    rng = np.random.default_rng(seed)
    arr = rng.normal(0, 50, (n, 24, 24)).astype(np.float32)
    save_dicom_series(Volume(arr, np.diag([1.0, 1.0, 2.0, 1.0]), "CT", {"dicom": {"PatientID": f"P{seed}"}}),
                      folder, method="fixture")
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = description
        if not uid:
            del ds.SeriesInstanceUID
        ds.save_as(f)
    return folder


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "Doe_Jane_export"  # a batch folder named like a patient: only relative paths are shown
    _dicom_series(src / "with_uid", 1, description="T1 axial")
    _dicom_series(src / "anon_b", 2, uid=False, description="anon B")
    _dicom_series(src / "anon_b" / "nested", 3, uid=False, description="anon B nested")
    _dicom_series(src / "anon_c", 4, uid=False)
    _dicom_series(tmp_path / "elsewhere" / "linked", 5, description="linked series")
    (src / "link_to_series").symlink_to(tmp_path / "elsewhere" / "linked", target_is_directory=True)
    (src / "anon_b" / "loop").symlink_to(src, target_is_directory=True)  # a link loop
    _phantom(src / "image.nii.gz")
    return src


def test_folder_mode_groups_by_uid_or_folder_and_follows_links(tmp_path):
    src = _tree(tmp_path)
    specs = read_cases(src, ReconstructConfig(method="fbp"), tmp_path / "out")
    by_label = {s.label: s for s in specs}
    assert sorted(by_label) == ["anon_b", "anon_b/nested", "anon_c", "image.nii.gz", "link_to_series", "with_uid"]
    assert len({s.case_id for s in specs}) == 6 and "series-e3b0c44298" not in {s.case_id for s in specs}
    assert by_label["anon_b"].config.series_uid == "" and "grouped by folder" in by_label["anon_b"].description
    assert "'anon B'" in by_label["anon_b"].description and "3 images" in by_label["anon_b"].description
    assert "'T1 axial'" in by_label["with_uid"].description and by_label["with_uid"].config.series_uid
    assert by_label["link_to_series"].config.input == str(src / "link_to_series")
    assert by_label["image.nii.gz"].description == "NIfTI image"
    # a batch output folder inside the source is not read back as input
    res = run_batch(BatchConfig(str(src), str(src / "out"), ReconstructConfig(method="fbp", views=8)))
    assert [r["status"] for r in res.rows] == ["done"] * 6, [r["reason"] for r in res.rows]
    assert len(read_cases(src, ReconstructConfig(), src / "out")) == 6
    for r in res.rows:  # every series gives its own 3 slices (no mixing of folders)
        if r["input"] != "image.nii.gz":
            assert load_nifti(src / "out" / "cases" / r["case_id"] / f"{r['case_id']}_fbp.nii.gz").shape == (3, 24, 24)
    with open(src / "out" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["input"] for r in rows} == set(by_label) and all(r["description"] for r in rows)
    log = (src / "out" / "batch.log").read_text()
    report = (src / "out" / "report.html").read_text()
    for text in (log, report):
        assert "anon_b/nested" in text and "anon B nested" in text and "Doe_Jane" not in text


def test_failure_reasons_are_never_cut(tmp_path):
    """A reason longer than 400 characters (a folder with many series) reaches the summary, log
    and report whole."""
    src = tmp_path / "in"
    for i in range(6):
        _dicom_series(src / "many" / f"s{i}", 10 + i, description=f"long series description {i} " * 2)
    out = tmp_path / "out"
    res = run_batch(BatchConfig(str(_manifest(src, [{"case_id": "many", "input": "many"}])), str(out),
                                ReconstructConfig(method="fbp", views=8)))
    reason = res.rows[0]["reason"]
    assert res.rows[0]["status"] == "failed" and len(reason) > 400 and "holds 6 series" in reason
    assert reason.rstrip(")").endswith("long series description 5 long series description 5'")
    assert json.loads((out / "summary.json").read_text())["cases"][0]["reason"] == reason
    with open(out / "summary.csv") as fh:
        assert next(csv.DictReader(fh))["reason"] == reason
    assert reason in (out / "batch.log").read_text()
    import html

    assert html.escape(reason) in (out / "report.html").read_text()


def test_folder_with_a_broken_dicom_file_is_a_failed_case(tmp_path):
    src = tmp_path / "in"
    _dicom_series(src / "good", 1)
    bad = _dicom_series(src / "bad", 2)
    first = sorted(bad.iterdir())[0]
    first.write_bytes(first.read_bytes()[:400])  # truncated inside its header
    specs = read_cases(src, ReconstructConfig(), tmp_path / "out")
    assert sorted(s.label for s in specs) == ["bad", "good"]
    res = run_batch(BatchConfig(str(src), str(tmp_path / "out"), ReconstructConfig(method="fbp", views=8)))
    status = {r["input"]: r for r in res.rows}
    assert status["good"]["status"] == "done" and status["bad"]["status"] == "failed"
    assert first.name in status["bad"]["reason"]


# ------------------------------------------------------------------ issue 31 item 5: duplicate series
def _second_copy(src: Path, dst: Path) -> list[Path]:
    import shutil

    dst.mkdir(parents=True)
    return [Path(shutil.copy(f, dst / f.name)) for f in sorted(src.iterdir())]


def test_two_copies_of_a_series_with_a_truncated_file_are_one_case_from_the_intact_files(tmp_path, capsys):
    """The trial: a second copy of a series (same SeriesInstanceUID) with one truncated file.
    Both folders become one case, the summary says so, the truncated copy is named and dropped,
    and the series reconstructs from the intact files."""
    src = tmp_path / "in"
    _dicom_series(src / "export1", 7, description="chest")
    copies = _second_copy(src / "export1", src / "export2")
    copies[1].write_bytes(copies[1].read_bytes()[:-300])  # cut short in its pixel data
    (spec,) = read_cases(src, ReconstructConfig(), tmp_path / "out")
    assert "3 images" in spec.description and "2 folders (export1, export2)" in spec.description
    assert "3 duplicate files" in spec.description, spec.description
    out = tmp_path / "out"
    rc = main(["batch", str(src), "--out", str(out), "--method", "fbp", "--views", "8"])
    assert rc == 0, capsys.readouterr()
    (row,) = json.loads((out / "summary.json").read_text())["cases"]
    assert row["status"] == "done" and "2 folders" in row["description"]
    assert any(copies[1].name in w and "export2" in w and "intact copy" in w for w in row["warnings"]), row["warnings"]
    assert load_nifti(out / "cases" / row["case_id"] / f"{row['case_id']}_fbp.nii.gz").shape == (3, 24, 24)
    with open(out / "summary.csv") as fh:
        assert "2 folders (export1, export2)" in next(csv.DictReader(fh))["description"]
    assert copies[1].name in (out / "report.html").read_text()


def test_a_copy_reached_through_a_link_joins_the_same_case(tmp_path):
    src = tmp_path / "in"
    _dicom_series(src / "export1", 8)
    _second_copy(src / "export1", tmp_path / "elsewhere" / "copy")
    (src / "linked").symlink_to(tmp_path / "elsewhere" / "copy", target_is_directory=True)
    (spec,) = read_cases(src, ReconstructConfig(), tmp_path / "out")
    assert "2 folders (export1, linked)" in spec.description
    res = run_batch(BatchConfig(str(src), str(tmp_path / "out"), ReconstructConfig(method="fbp", views=8)))
    assert [r["status"] for r in res.rows] == ["done"], res.rows
