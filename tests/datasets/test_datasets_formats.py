"""NIfTI, BART, fastMRI, raw sinogram and image-folder readers/writers, and the atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medrecon.datasets import (
    KSpace,
    Sinogram,
    Volume,
    load_bart_kspace,
    load_fastmri,
    load_fastmri_reference,
    load_image,
    load_image_folder,
    load_nifti,
    load_sinogram,
    load_volume,
    read_cfl,
    save_bart_kspace,
    save_fastmri,
    save_nifti,
    save_sinogram,
    std_path,
    write_cfl,
)
from medrecon.datasets._atomic import atomic_files
from medrecon.errors import InputError, SettingsError, ShapeError


def _kspace(coils=3, z=2, ny=8, nx=6, seed=0) -> KSpace:
    rng = np.random.default_rng(seed)
    data = (
        rng.standard_normal((coils, z, ny, nx)) + 1j * rng.standard_normal((coils, z, ny, nx))
    ).astype(np.complex64)
    mask = np.zeros((1, ny, nx), bool)
    mask[..., ::2] = True
    mask[..., nx // 2] = True
    return KSpace(data * mask, mask=mask, header={})


# ---------------------------------------------------------------- NIfTI
def test_nifti_round_trip_with_oblique_affine_and_std(tmp_path, helpers):
    import nibabel as nib

    vol = helpers.synthetic_volume(shape=(3, 5, 4))
    std = np.abs(vol.array) / 10
    written = save_nifti(vol, tmp_path / "case.nii.gz", std=std)
    assert written == [tmp_path / "case.nii.gz", tmp_path / "case_std.nii.gz"]
    back = load_nifti(written[0])
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    assert back.modality == "CT"
    np.testing.assert_allclose(load_nifti(written[1]).array, std, rtol=1e-6)
    img = nib.load(written[0])  # RAS: nibabel sees (X, Y, Z) data with the same affine
    assert img.shape == (4, 5, 3) and img.get_fdata()[3, 1, 2] == vol.array[2, 1, 3]
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-5)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")


def test_nifti_refuses_overwrite_and_bad_names(tmp_path, helpers):
    vol = helpers.synthetic_volume(shape=(2, 3, 3))
    save_nifti(vol, tmp_path / "a.nii")
    with pytest.raises(InputError, match="already exists"):
        save_nifti(vol, tmp_path / "a.nii")
    save_nifti(vol, tmp_path / "a.nii", overwrite=True)
    with pytest.raises(InputError, match="nii"):
        save_nifti(vol, tmp_path / "a.png")
    assert std_path("x/y.nii") == std_path("x/y.nii").with_name("y_std.nii")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii"]


def test_nifti_sheared_affine_keeps_sform(tmp_path):
    aff = np.array([[1.0, 0, 0.3, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    save_nifti(Volume(np.ones((2, 2, 2)), aff, "MR"), tmp_path / "s.nii.gz")
    np.testing.assert_allclose(load_nifti(tmp_path / "s.nii.gz").affine, aff)


# ---------------------------------------------------------------- BART
def test_bart_round_trip_and_layout(tmp_path):
    k = _kspace()
    save_bart_kspace(k, tmp_path / "ksp")
    dims = (tmp_path / "ksp.hdr").read_text().splitlines()[1].split()
    assert dims[:4] == ["6", "8", "1", "3"] and dims[13] == "2"
    back = load_bart_kspace(tmp_path / "ksp.cfl")
    np.testing.assert_array_equal(back.data, k.data)
    np.testing.assert_array_equal(back.mask[0], k.mask[0])
    raw = read_cfl(tmp_path / "ksp")
    assert raw[(5, 7, 0, 2) + (0,) * 9 + (1,)] == k.data[2, 1, 7, 5]


def test_bart_3d_kspace_becomes_slices(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.standard_normal((6, 5, 4)) + 0j  # (x, y, z) image
    ksp = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol), norm="ortho"))
    write_cfl(tmp_path / "k3", ksp[..., None])
    k = load_bart_kspace(tmp_path / "k3")
    assert k.data.shape == (1, 4, 5, 6) and k.header["kz_transformed"]
    img = np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(k.data, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    np.testing.assert_allclose(img[0], vol.transpose(2, 1, 0), atol=1e-5)


# ---------------------------------------------------------------- fastMRI
@pytest.mark.parametrize("coils", [1, 4])
def test_fastmri_round_trip(tmp_path, coils):
    k = _kspace(coils=coils, z=3)
    ref = np.abs(np.random.default_rng(2).standard_normal((3, 8, 6))).astype(np.float32)
    save_fastmri(tmp_path / "f.h5", k, reference=ref, case_id="CASE-7", attrs={"acceleration": 2})
    back = load_fastmri(tmp_path / "f.h5")
    np.testing.assert_array_equal(back.data, k.data)
    np.testing.assert_array_equal(back.mask[0], k.mask[0])
    assert back.header["layout"] == ("singlecoil" if coils == 1 else "multicoil")
    assert (
        back.header["attrs"]["patient_id"] == "CASE-7" and back.header["attrs"]["acceleration"] == 2
    )
    assert "ismrmrdHeader" in back.header["ismrmrd_header"]
    np.testing.assert_array_equal(load_fastmri_reference(tmp_path / "f.h5").array, ref)
    assert load_fastmri(tmp_path / "f.h5", slices=slice(1, 2)).data.shape == (coils, 1, 8, 6)


@pytest.mark.parametrize("coils", [1, 4])
def test_fastmri_files_load_in_fastmri_slicedataset(tmp_path, coils):
    SliceDataset = pytest.importorskip(
        "fastmri.data.mri_data", reason="fastmri not installed"
    ).SliceDataset

    k = _kspace(coils=coils, z=2)
    ref = np.ones((2, 8, 6), np.float32)
    save_fastmri(tmp_path / "sim" / "a.h5", k, reference=ref)
    ds = SliceDataset(
        tmp_path / "sim",
        challenge="singlecoil" if coils == 1 else "multicoil",
        use_dataset_cache=False,
    )
    assert len(ds) == 2
    kspace, mask, target, attrs, fname, slice_num = ds[1]
    np.testing.assert_array_equal(kspace, k.data[0, 1] if coils == 1 else k.data[:, 1])
    np.testing.assert_array_equal(target, ref[1])
    assert attrs["recon_size"][:2] == (8, 6) and attrs["padding_left"] == 0


def test_fastmri_rejects_row_varying_mask(tmp_path):
    k = _kspace()
    k.mask[0, 0, 1] = True
    with pytest.raises(ShapeError):
        save_fastmri(tmp_path / "x.h5", k)
    assert not (tmp_path / "x.h5").exists()


# ---------------------------------------------------------------- sinograms
def test_sinogram_round_trip_parallel_and_fan(tmp_path):
    data = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    par = Sinogram(
        data,
        {
            "type": "parallel",
            "angles_rad": np.linspace(0, np.pi, 5, endpoint=False).tolist(),
            "n_detectors": 7,
        },
    )
    save_sinogram(par, tmp_path / "p")
    back = load_sinogram(tmp_path / "p.npy")
    np.testing.assert_array_equal(back.data, data)
    assert back.geometry["detector_spacing_mm"] == 1.0 and back.geometry["units"] == "image_pixel"
    fan = {
        "type": "fan",
        "angles_rad": list(np.linspace(0, 2 * np.pi, 5, endpoint=False)),
        "n_detectors": 7,
        "detector": "flat",
        "detector_spacing_mm": 1.2,
        "source_to_isocenter_mm": 500.0,
        "source_to_detector_mm": 950.0,
        "units": "attenuation",
        "pixel_size_mm": 0.8,
    }
    save_sinogram(Sinogram(data, fan), tmp_path / "f")
    g = json.loads((tmp_path / "f.json").read_text())
    assert g["format"] == "medrecon-sinogram" and g["source_to_detector_mm"] == 950.0
    assert load_sinogram(tmp_path / "f").geometry["detector"] == "flat"
    with pytest.raises(InputError, match="already exists"):
        save_sinogram(par, tmp_path / "p")


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "cone"},
        {"angles_rad": [0.0, float("nan"), 1, 2, 3]},
        {"angles_rad": [0.0]},
        {"n_detectors": 8},
        {"type": "fan", "source_to_isocenter_mm": 500.0},
        {
            "type": "fan",
            "source_to_isocenter_mm": 900.0,
            "source_to_detector_mm": 500.0,
            "detector_spacing_rad": 1e-3,
        },
        {"units": "furlongs"},
        {"detector_spacing_mm": -1.0},
    ],
)
def test_sinogram_geometry_validation(bad):
    geom = {"type": "parallel", "angles_rad": [0.0, 0.5, 1.0, 1.5, 2.0], "n_detectors": 7, **bad}
    with pytest.raises(SettingsError):
        Sinogram(np.zeros((5, 7)), geom)


# ---------------------------------------------------------------- image folders
def test_image_folder_png_jpg_tiff(tmp_path):
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 255, (6, 5), dtype=np.uint8)
    a16 = rng.integers(0, 65535, (6, 5), dtype=np.uint16)
    Image.fromarray(a8).save(tmp_path / "img2.png")
    Image.fromarray(a16).save(tmp_path / "img10.png")
    tifffile.imwrite(tmp_path / "img3.tif", a16)
    Image.fromarray(np.stack([a8] * 3, -1)).save(tmp_path / "img4.jpg", quality=100)
    vol = load_image_folder(tmp_path)
    assert vol.shape == (4, 6, 5)
    assert [p.rsplit("/", 1)[-1] for p in vol.meta["files"]] == [
        "img2.png",
        "img3.tif",
        "img4.jpg",
        "img10.png",
    ]
    np.testing.assert_array_equal(vol.array[0], a8)
    np.testing.assert_array_equal(vol.array[1], a16)
    np.testing.assert_array_equal(vol.array[3], a16)
    assert np.abs(vol.array[2] - a8).max() < 8  # JPEG is lossy
    assert load_volume(str(tmp_path)).shape == (4, 6, 5)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="small.png"):
        load_image_folder(tmp_path)
    assert load_image(tmp_path / "small.png").shape == (3, 3)


# ---------------------------------------------------------------- atomic writes
def test_atomic_files_leave_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_files([tmp_path / "a.npy", tmp_path / "b.json"]) as (a, b):
            a.write_bytes(b"x")
            raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(InputError, match="already exists"):
        with atomic_files([tmp_path / "a.npy", tmp_path / "b.json"]) as (a, b):
            raise AssertionError("must not be reached")
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]
