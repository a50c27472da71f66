"""``medrecon reconstruct`` and ``medrecon batch`` on MATLAB ``.mat`` k-space (issue 24, item 14)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medrecon.cli.main import main
from medrecon.datasets import KSpace, load_nifti, save_matlab_kspace
from medrecon.pipeline.batch import BatchConfig, run_batch
from medrecon.pipeline.case import ReconstructConfig, run_case

REPO = Path(__file__).resolve().parents[1]
CHIEW = "mri/multicoil/chiew_sense_tutorial_brain_16ch/raw_data.mat"


def _data_root() -> Path:
    return Path(os.environ.get("MEDRECON_DATA", REPO.parent / "shared" / "data"))


def _phantom_kspace(n: int = 32, coils: int = 4) -> tuple[KSpace, np.ndarray]:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    img = ((xx / (0.35 * n)) ** 2 + (yy / (0.42 * n)) ** 2 < 1).astype(np.float32)
    img[n // 2 - 3: n // 2 + 3, n // 3: n // 3 + 4] = 2.0
    angles = np.linspace(0, 2 * np.pi, coils, endpoint=False)
    maps = np.stack([np.exp(-((xx - 0.6 * n * np.cos(a)) ** 2 + (yy - 0.6 * n * np.sin(a)) ** 2) / (0.5 * n) ** 2)
                     for a in angles]).astype(np.complex64)
    coil_imgs = maps * img
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_imgs, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    mask = np.zeros((1, n, n), bool)
    mask[..., ::2] = True
    mask[..., n // 2 - 4: n // 2 + 4] = True
    return KSpace(k[:, None].astype(np.complex64) * mask[None], mask=mask, coil_maps=maps[:, None]), img


def test_reconstruct_a_mat_file(tmp_path):
    ksp, truth = _phantom_kspace()
    path = save_matlab_kspace(ksp, tmp_path / "scan.mat")
    record = run_case(ReconstructConfig(modality="mri", input=str(path), out=str(tmp_path / "o"), method="cg",
                                        case_id="m1"))
    assert "multi-coil k-space" in record["problem"] and record["notes"] == {"coils": 4, "coil_maps": "from file"}
    out = load_nifti(tmp_path / "o" / "m1_cg.nii.gz").array[0]
    assert out.shape == truth.shape
    # with the true maps (the file's `sens`), cg recovers the object from 2x-undersampled data
    assert np.corrcoef(np.abs(out).ravel(), truth.ravel())[0, 1] > 0.98


def test_bad_mat_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "notes.mat"
    bad.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    rc = main(["reconstruct", "--modality", "mri", "--input", str(bad), "--method", "cg", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "notes.mat" in err[0] and "MATLAB" in err[0], err
    import scipy.io

    scipy.io.savemat(tmp_path / "image.mat", {"img": np.ones((8, 8))})
    rc = main(["reconstruct", "--modality", "mri", "--input", str(tmp_path / "image.mat"), "--method", "cg",
               "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "no recognisable k-space" in err and "img (8×8 double)" in err


def test_batch_folder_takes_mat_files(tmp_path):
    ksp, _ = _phantom_kspace(n=24, coils=2)
    src = tmp_path / "in"
    save_matlab_kspace(ksp, src / "a.mat")
    res = run_batch(BatchConfig(str(src), str(tmp_path / "out"), ReconstructConfig(method="zero-filled")))
    assert [(r["input"], r["description"], r["status"], r["modality"]) for r in res.rows] == [
        ("a.mat", "MATLAB k-space", "done", "mri")]


@pytest.mark.data
def test_reconstruct_the_16_coil_v73_file(tmp_path):
    """The trial's command on the real file: cg with ESPIRiT maps on fully sampled 16-coil data
    gives the coil-combined image (compared with the root-sum-of-squares of the coil images)."""
    path = _data_root() / CHIEW
    if not path.is_file():
        pytest.skip(f"{path} not found (set MEDRECON_DATA)")
    out = tmp_path / "o"
    rc = main(["reconstruct", "--modality", "mri", "--input", str(path), "--method", "cg", "--out", str(out),
               "--case-id", "chiew"])
    assert rc == 0
    record = json.loads((out / "chiew_cg.json").read_text())
    assert record["notes"] == {"coils": 16, "coil_maps": "ESPIRiT"} and record["shape"] == [1, 96, 96]
    rec = np.abs(load_nifti(out / "chiew_cg.nii.gz").array[0])
    from medrecon.datasets import load_kspace

    k = load_kspace(str(path)).data[:, 0]
    coil = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    rss = np.sqrt((np.abs(coil) ** 2).sum(0))
    head = rss > 0.1 * rss.max()
    assert np.corrcoef(rec[head], rss[head])[0, 1] > 0.95
