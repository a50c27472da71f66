"""Every file medrecon writes follows the process umask (issue 24, item 7).

Outputs used to be 0600 where a writer took its temporary file from ``tempfile.mkstemp`` (PNG,
JSON, report.html, summaries, completion records) and 0644 elsewhere (NIfTI, DICOM).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from medrecon.datasets import Volume, save_nifti
from medrecon.datasets._atomic import open_temp
from medrecon.pipeline.batch import BatchConfig, run_batch
from medrecon.pipeline.case import ReconstructConfig, run_case


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _phantom(path: Path, n: int = 32) -> Path:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    img = np.where(xx**2 + yy**2 < (0.3 * n) ** 2, 40.0, -1000.0).astype(np.float32)
    save_nifti(Volume(np.stack([img, img]), np.diag([0.9, 0.9, 2.0, 1.0]), "CT"), path)
    return path


def _modes(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = ("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode))
    return out


def _check(root: Path, mask: int) -> None:
    modes = _modes(root)
    assert modes
    wrong = {k: f"{kind} {m:04o}" for k, (kind, m) in modes.items()
             if m != (0o777 if kind == "dir" else 0o666) & ~mask}
    assert not wrong, f"umask {mask:04o}: files 0{0o666 & ~mask:03o}, folders 0{0o777 & ~mask:03o}; got {wrong}"


def test_open_temp_follows_umask(tmp_path, umask):
    fd, name = open_temp(tmp_path, ".json.tmp")
    os.close(fd)
    assert Path(name).parent == tmp_path and Path(name).name.startswith(".tmp-") and name.endswith(".json.tmp")
    assert stat.S_IMODE(os.stat(name).st_mode) == 0o666 & ~umask


def test_batch_outputs_follow_umask(tmp_path, umask):
    """Batch: NIfTI, PNG figures and thumbnails, case JSON, completion records, summary.csv/json,
    report.html, batch.log, failure records."""
    src = tmp_path / "in"
    src.mkdir()
    _phantom(src / "a.nii.gz")
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")  # a failed case: .failed.json
    os.chmod(src, 0o755)
    out = tmp_path / "out"
    res = run_batch(BatchConfig(str(src), str(out), ReconstructConfig(method="fbp", views=8)))
    assert sorted(r["status"] for r in res.rows) == ["done", "failed"]
    names = {Path(k).name for k in _modes(out)}
    assert {"summary.csv", "summary.json", "report.html", "batch.log"} <= names
    assert any(n.endswith(".done.json") for n in names) and any(n.endswith(".failed.json") for n in names)
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".nii.gz") for n in names)
    _check(out, umask)


def test_reconstruct_dicom_outputs_follow_umask(tmp_path, umask):
    """Single case with DICOM output: the series folder, its files, the figure and the record."""
    src = _phantom(tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    run_case(ReconstructConfig(input=str(src), out=str(out), method="fbp", views=8, output_format="dicom",
                               case_id="c1"))
    names = {Path(k).name for k in _modes(out)}
    assert {"c1_fbp.json", "c1_fbp.png", "c1_fbp_dicom"} <= names
    _check(out, umask)


def test_pacs_batch_report_follows_umask(tmp_path, umask):
    from medrecon.pacs.workflow import _write_report

    path = tmp_path / "report.json"
    _write_report(path, {"cases": []})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
