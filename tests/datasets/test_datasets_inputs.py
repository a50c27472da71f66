"""Inputs checked for what they are (issue 31, item 4), at the reader level: k-space versus coil
images by the energy at the centre of k-space, coil images converted on request, and CT
sinograms in MATLAB ``.mat`` files with their JSON geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medrecon.datasets import KSpace, load_kspace, load_sinogram, save_matlab_kspace
from medrecon.errors import InputError


def _fft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _ifft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def coil_images(n: int = 64, coils: int = 4) -> np.ndarray:
    """(coils, n, n) complex coil images of an elliptic phantom with smooth coil sensitivities."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    img = ((xx / (0.38 * n)) ** 2 + (yy / (0.45 * n)) ** 2 < 1).astype(np.float64)
    img[n // 2 - 4 : n // 2 + 4, n // 3 : n // 3 + 5] = 2.0
    angles = np.linspace(0, 2 * np.pi, coils, endpoint=False)
    maps = np.stack([np.exp(-((xx - 0.6 * n * np.cos(a)) ** 2 + (yy - 0.6 * n * np.sin(a)) ** 2) / (0.6 * n) ** 2
                            + 1j * 0.02 * (xx + yy)) for a in angles])
    return (maps * img).astype(np.complex64)


def test_kspace_and_coil_images_are_told_apart():
    from medrecon.datasets.kspace_domain import kspace_domain

    images = coil_images()[:, None]  # (coils, Z, ky, kx)
    k = _fft2c(images)
    assert kspace_domain(k)["looks_like"] == "kspace"
    report = kspace_domain(images)
    assert report["looks_like"] == "images" and report["centre_energy"] < 0.3
    assert report["centre_energy_transformed"] > 0.8
    noise = np.random.default_rng(0).normal(size=(2, 1, 64, 64)) + 0j  # no structure: not called images
    assert kspace_domain(noise)["looks_like"] == "kspace"
    undersampled = k.copy()
    undersampled[..., ::2] = 0
    undersampled[..., 28:36] = k[..., 28:36]
    assert kspace_domain(undersampled)["looks_like"] == "kspace"


def test_coil_images_are_refused_or_converted(tmp_path):
    import scipy.io

    images = coil_images()
    path = tmp_path / "coils.mat"
    scipy.io.savemat(path, {"data": np.moveaxis(images, 0, -1)})  # MATLAB (rows, cols, coils)
    with pytest.raises(InputError) as info:
        load_kspace(str(path))
    msg = str(info.value)
    assert "coils.mat" in msg and "data (64×64×4 complex" in msg and "coil images" in msg
    assert "input_domain='image'" in msg and "--input-domain image" in msg and "%" in msg
    got = load_kspace(str(path), input_domain="image")
    np.testing.assert_allclose(got.data[:, 0], _fft2c(images), atol=1e-4)
    assert bool(got.mask.all()) and got.header["input_domain"] == "image"
    as_is = load_kspace(str(path), input_domain="kspace")  # told it is k-space: read as it is
    np.testing.assert_allclose(as_is.data[:, 0], images)
    with pytest.raises(ValueError, match="input_domain"):
        load_kspace(str(path), input_domain="coils")


def test_real_kspace_passes_and_converting_it_warns(tmp_path):
    k = _fft2c(coil_images()[:, None])
    path = save_matlab_kspace(KSpace(k), tmp_path / "k.mat")
    np.testing.assert_allclose(load_kspace(str(path)).data, k, atol=1e-4)
    with pytest.warns(UserWarning, match="looks like k-space"):
        load_kspace(str(path), input_domain="image")


def test_the_measured_multicoil_files_are_kspace_and_their_coil_images_are_not(shared_data):
    from medrecon.datasets.kspace_domain import kspace_domain

    for rel in ("mri/multicoil/chiew_sense_tutorial_brain_16ch/raw_data.mat",
                "mri/multicoil/bart_ismrm2016_pics_brain/ksp.cfl"):
        path = shared_data / rel
        if not path.is_file():
            pytest.skip(f"{path} not found")
        k = load_kspace(str(path)).data  # the check passes
        assert kspace_domain(k)["centre_energy"] > 0.8, rel
        assert kspace_domain(_ifft2c(k))["looks_like"] == "images", rel


# ------------------------------------------------------------------ CT sinograms in .mat files
def _geometry(n_views: int, n_bins: int, **extra) -> dict:
    return {"type": "parallel", "angles_rad": np.linspace(0, np.pi, n_views, endpoint=False).tolist(),
            "n_detectors": n_bins, **extra}


def test_mat_sinogram_with_json_geometry(tmp_path):
    import scipy.io

    sino = np.random.default_rng(0).random((2, 30, 45)).astype(np.float32)  # (Z, views, bins)
    # MATLAB's radon gives (bins, angles); a stack of slices is the third dimension
    scipy.io.savemat(tmp_path / "scan.mat", {"sino": np.transpose(sino, (2, 1, 0))})
    (tmp_path / "scan.json").write_text(json.dumps(_geometry(30, 45)))
    for name in ("scan.mat", "scan.json", "scan"):
        got = load_sinogram(tmp_path / name)
        np.testing.assert_allclose(got.data, sino, rtol=1e-6)
    scipy.io.savemat(tmp_path / "two.mat", {"sinogram": sino[0], "note": np.ones(3)})  # (views, bins)
    (tmp_path / "two.json").write_text(json.dumps(_geometry(30, 45)))
    np.testing.assert_allclose(load_sinogram(tmp_path / "two.mat").data[0], sino[0], rtol=1e-6)


def test_mat_sinogram_without_geometry_says_how_to_give_it(tmp_path):
    import scipy.io

    scipy.io.savemat(tmp_path / "scan.mat", {"sino": np.ones((45, 30))})
    with pytest.raises(InputError) as info:
        load_sinogram(tmp_path / "scan.mat")
    msg = str(info.value)
    assert "scan.mat" in msg and "scan.json" in msg and "angles_rad" in msg and "n_detectors" in msg


def test_mat_sinogram_layout_must_be_clear(tmp_path):
    import scipy.io

    square = np.random.default_rng(1).random((40, 40))
    scipy.io.savemat(tmp_path / "sq.mat", {"sino": square})
    (tmp_path / "sq.json").write_text(json.dumps(_geometry(40, 40)))
    with pytest.raises(InputError, match="layout"):
        load_sinogram(tmp_path / "sq.mat")
    (tmp_path / "sq.json").write_text(json.dumps(_geometry(40, 40, layout="bv")))
    np.testing.assert_allclose(load_sinogram(tmp_path / "sq.mat").data[0], square.T, rtol=1e-6)
    (tmp_path / "sq.json").write_text(json.dumps(_geometry(30, 40)))
    with pytest.raises(InputError, match="30 views"):
        load_sinogram(tmp_path / "sq.mat")
