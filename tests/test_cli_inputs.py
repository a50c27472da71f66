"""``medrecon reconstruct`` / ``batch`` take inputs for what they are (issue 31, item 4): coil images
given as MRI k-space are refused, or converted with ``--input-domain image``; a CT sinogram in a
MATLAB ``.mat`` file is read with its JSON geometry, or refused with a message that says how to
give the geometry."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from medrecon.cli.main import main
from medrecon.datasets import Volume, load_nifti, save_nifti
from medrecon.pipeline.batch import BatchConfig, run_batch
from medrecon.pipeline.case import ReconstructConfig, run_case
from test_cli_reconstruct import _err_line

sys.path.insert(0, str(Path(__file__).parent / "datasets"))
from test_datasets_inputs import coil_images  # noqa: E402


def _coil_mat(path: Path) -> tuple[Path, np.ndarray]:
    import scipy.io

    images = coil_images()
    scipy.io.savemat(path, {"data": np.moveaxis(images, 0, -1)})  # MATLAB (rows, cols, coils), like the trial's
    return path, images


def test_coil_images_are_refused_with_a_message(tmp_path, capsys):
    path, _ = _coil_mat(tmp_path / "coils.mat")
    argv = ["reconstruct", "--modality", "mri", "--input", str(path), "--method", "zero-filled",
            "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = _err_line(capsys)
    assert "coils.mat" in err and "coil images, not k-space" in err and "--input-domain image" in err, err


def test_input_domain_image_converts_coil_images(tmp_path, capsys):
    path, images = _coil_mat(tmp_path / "coils.mat")
    out = tmp_path / "o"
    assert main(["reconstruct", "--modality", "mri", "--input", str(path), "--method", "cg", "--iters", "5",
                 "--input-domain", "image", "--out", str(out), "--case-id", "c"]) == 0
    rec = json.loads((out / "c_cg.json").read_text())
    assert rec["config"]["input_domain"] == "image" and "coil images" in rec["problem"]
    assert rec["notes"]["input_domain"].startswith("image")
    got = np.abs(load_nifti(out / "c_cg.nii.gz").array[0])
    rss = np.sqrt((np.abs(images) ** 2).sum(0))
    assert np.corrcoef(got.ravel(), rss.ravel())[0, 1] > 0.95
    # the Python API path: the same setting on ReconstructConfig
    rec = run_case(ReconstructConfig(modality="mri", input=str(path), out=str(tmp_path / "api"),
                                     method="zero-filled", input_domain="image", case_id="c"))
    assert "coil images" in rec["problem"]
    # the option does nothing for an image input: refused like any other
    img = tmp_path / "mr.nii.gz"
    save_nifti(Volume(np.abs(images[0])[None], np.eye(4), "MR"), img)
    capsys.readouterr()
    assert main(["reconstruct", "--modality", "mri", "--input", str(img), "--method", "zero-filled",
                 "--input-domain", "image", "--out", str(tmp_path / "o2")]) == 2
    assert "--input-domain image: only for" in _err_line(capsys)


def _mat_sinogram(tmp_path: Path, *, geometry: bool = True) -> tuple[Path, Path]:
    """A CT phantom's 60-view sinogram written as MATLAB's radon lays it out (bins, angles)."""
    import scipy.io

    yy, xx = np.mgrid[:48, :48] - 23.5
    img = np.where(xx**2 + yy**2 < 17**2, 40.0, -1000.0).astype(np.float32)
    img[20:26, 16:22] = 700.0
    save_nifti(Volume(img[None], np.diag([0.8, 0.8, 2.0, 1.0]), "CT"), tmp_path / "img.nii.gz")
    assert main(["simulate", "ct", str(tmp_path / "img.nii.gz"), str(tmp_path / "sim"), "--views", "60"]) == 0
    sino = np.load(tmp_path / "sim" / "sim.npy")[0]  # (views, bins)
    scipy.io.savemat(tmp_path / "scan.mat", {"sino": sino.T})
    if geometry:
        (tmp_path / "scan.json").write_text((tmp_path / "sim" / "sim.json").read_text())
    return tmp_path / "scan.mat", tmp_path / "sim" / "sim_truth.nii.gz"


def test_a_mat_sinogram_with_its_geometry_is_read_as_a_sinogram(tmp_path, capsys):
    mat, truth = _mat_sinogram(tmp_path)
    out = tmp_path / "o"
    assert main(["reconstruct", "--modality", "ct", "--input", str(mat), "--method", "fbp", "--reference", str(truth),
                 "--out", str(out), "--case-id", "s"]) == 0, capsys.readouterr().err
    rec = json.loads((out / "s_fbp.json").read_text())
    assert rec["problem"] == "CT measured sinogram, parallel beam, 60 views"
    assert rec["shape"] == [1, 48, 48] and rec["metrics"]["psnr"] > 25


def test_a_mat_sinogram_without_geometry_is_refused_saying_how_to_give_it(tmp_path, capsys):
    mat, _ = _mat_sinogram(tmp_path, geometry=False)
    capsys.readouterr()
    assert main(["reconstruct", "--modality", "ct", "--input", str(mat), "--method", "fbp",
                 "--out", str(tmp_path / "o")]) == 2
    err = _err_line(capsys)
    assert "scan.mat" in err and "scan.json" in err and "angles_rad" in err and "--modality mri" in err, err
    assert "is kspace data" not in err


def test_batch_folder_reads_a_mat_sinogram_beside_its_geometry(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    mat, _ = _mat_sinogram(src)
    (src / "sim").rename(tmp_path / "sim")  # keep only scan.mat + scan.json (and the image) in the folder
    (src / "img.nii.gz").unlink()
    res = run_batch(BatchConfig(str(src), str(tmp_path / "out"), ReconstructConfig(method="fbp")))
    assert [(r["input"], r["description"], r["modality"], r["status"]) for r in res.rows] == [
        ("scan.mat", "MATLAB sinogram (+ scan.json geometry)", "ct", "done")], res.rows
