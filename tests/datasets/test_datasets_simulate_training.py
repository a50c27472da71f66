"""Simulation (CT sinograms, MRI k-space, saving, CLI) and the training slice cache / Dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medrecon.cli.simulate import main
from medrecon.datasets import (
    Volume,
    load_bart_kspace,
    load_fastmri,
    load_nifti,
    load_sinogram,
    save_nifti,
)
from medrecon.datasets.simulate import (
    birdcage_coil_maps,
    save_simulation,
    simulate_ct,
    simulate_mri,
)
from medrecon.datasets.training import SliceCache, SliceDataset, find_sources, split_sources
from medrecon.errors import SettingsError, ShapeError


def _phantom(n=32, z=2) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    disc = np.where(xx**2 + yy**2 < (0.35 * n) ** 2, 40.0, -1000.0)
    return np.stack([disc + 10 * k for k in range(z)]).astype(np.float32)


# ---------------------------------------------------------------- CT
def test_ct_parallel_matches_skimage_radon_and_is_deterministic():
    from skimage.transform import radon

    img = _phantom(z=1)
    angles = np.linspace(0, np.pi, 12, endpoint=False)
    geom = {
        "type": "parallel",
        "angles_rad": angles.tolist(),
        "n_detectors": math.ceil(math.sqrt(2) * 32),
    }
    sino = simulate_ct(img, geom)
    assert sino.data.shape == (1, 12, 46) and sino.geometry["units"] == "image_pixel"
    ref = radon(img[0].astype(np.float64), np.degrees(angles), circle=False).T
    assert np.corrcoef(sino.data[0].ravel(), ref.ravel())[0, 1] > 0.99
    a = simulate_ct(img, geom, noise="poisson", I0=1e4, seed=5)
    b = simulate_ct(img, geom, noise="poisson", I0=1e4, seed=5)
    c = simulate_ct(img, geom, noise="poisson", I0=1e4, seed=6)
    np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data)


def test_ct_poisson_noise_grows_as_dose_drops():
    img = _phantom(z=1)
    clean = simulate_ct(img)
    err = [
        np.abs(simulate_ct(img, noise="poisson", I0=i0).data - clean.data).mean()
        for i0 in (1e6, 1e4)
    ]
    assert err[0] < err[1]
    g = simulate_ct(img, noise="gaussian", sigma=2.0, seed=1)
    assert abs(np.std(g.data - clean.data) - 2.0) < 0.2


def test_ct_fan_beam_and_bad_settings():
    img = _phantom(z=1)
    fan = {
        "type": "fan",
        "angles_rad": np.linspace(0, 2 * np.pi, 16, endpoint=False).tolist(),
        "n_detectors": 48,
        "detector": "equiangular",
        "detector_spacing_rad": 0.02,
        "source_to_isocenter_mm": 60.0,
        "source_to_detector_mm": 120.0,
    }
    sino = simulate_ct(img, fan)
    assert sino.data.shape == (1, 16, 48) and np.all(np.isfinite(sino.data))
    with pytest.raises(SettingsError):
        simulate_ct(img, noise="salt")
    with pytest.raises(ShapeError):
        simulate_ct(np.full((4, 4), np.nan))


# ---------------------------------------------------------------- MRI
def test_mri_single_coil_matches_masked_fft():
    img = np.abs(_phantom(z=1))
    mask = np.zeros((32, 32), bool)
    mask[:, ::3] = True
    k = simulate_mri(img, mask)
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img[0]), norm="ortho")) * mask
    assert k.data.shape == (1, 1, 32, 32)
    np.testing.assert_allclose(k.data[0, 0], ref, atol=1e-4 * np.abs(ref).max())


def test_mri_multicoil_birdcage_phase_noise_deterministic():
    img = np.abs(_phantom(z=2))
    k1 = simulate_mri(
        img, "equispaced", acceleration=4, n_coils=4, phase_rad=1.0, noise_std=0.1, seed=3
    )
    k2 = simulate_mri(
        img, "equispaced", acceleration=4, n_coils=4, phase_rad=1.0, noise_std=0.1, seed=3
    )
    assert k1.data.shape == (4, 2, 32, 32) and k1.coil_maps.shape == (4, 2, 32, 32)
    np.testing.assert_array_equal(k1.data, k2.data)
    assert np.all(k1.data[:, :, ~k1.mask[0]] == 0)
    maps = birdcage_coil_maps(4, (32, 32))
    np.testing.assert_allclose(np.sqrt((np.abs(maps) ** 2).sum(0)), 1.0, atol=1e-5)
    with pytest.raises(ShapeError):
        simulate_mri(img, np.ones((31, 32), bool))


def test_save_simulation_formats(tmp_path):
    vol = Volume(_phantom(z=2), np.diag([0.8, 0.8, 2.0, 1.0]), "CT")
    sino = simulate_ct(vol, noise="poisson", I0=1e5, seed=0)
    files = save_simulation(tmp_path, "ct", sino, vol, formats=["native", "dicom"])
    assert {f.name for f in files} >= {"ct.npy", "ct.json", "ct_truth.nii.gz"}
    back = load_sinogram(tmp_path / "ct")
    np.testing.assert_array_equal(back.data, sino.data)
    assert back.geometry["I0"] == 1e5 and back.geometry["pixel_size_mm"] == pytest.approx(0.8)
    np.testing.assert_array_equal(load_nifti(tmp_path / "ct_truth.nii.gz").array, vol.array)
    mr = Volume(np.abs(vol.array), vol.affine, "MR")
    k = simulate_mri(mr, "random", n_coils=3, seed=1)
    save_simulation(tmp_path, "mr", k, mr, formats=["native", "bart"])
    np.testing.assert_array_equal(load_fastmri(tmp_path / "mr.h5").data, k.data)
    np.testing.assert_array_equal(load_bart_kspace(tmp_path / "mr_ksp").data, k.data)


def test_simulate_cli_on_bundled_ct(tmp_path, capsys):
    assert (
        main(["ct", "bundled", str(tmp_path), "--views", "20", "--noise", "poisson", "--I0", "1e4"])
        == 0
    )
    sino = load_sinogram(tmp_path / "sim")
    assert sino.data.shape == (1, 20, 363)  # the bundled slice is 256²: ⌈√2·256⌉ bins
    assert main(["mri", "bundled", str(tmp_path / "m"), "--coils", "2", "--acceleration", "4"]) == 0
    assert load_fastmri(tmp_path / "m" / "sim.h5").data.shape == (2, 1, 256, 256)
    assert "sim.h5" in capsys.readouterr().out


# ---------------------------------------------------------------- training
def _sources(tmp_path, make_series):
    from PIL import Image

    make_series(shape=(3, 12, 10), folder=tmp_path / "in" / "dcm")
    save_nifti(Volume(np.abs(_phantom(16, 4)), np.eye(4), "MR"), tmp_path / "in" / "a.nii.gz")
    (tmp_path / "in" / "png").mkdir()
    for k in range(2):
        Image.fromarray((np.arange(20 * 20).reshape(20, 20) % 256).astype(np.uint8)).save(
            tmp_path / "in" / "png" / f"{k}.png"
        )
    return find_sources([tmp_path / "in"])


def test_slice_cache_builds_once_and_datasets_stream(tmp_path, make_series, monkeypatch):
    from medrecon.datasets import training
    from medrecon.priors.normalise import ct_normaliser

    sources = _sources(tmp_path, make_series)
    assert sorted(s.kind for s in sources) == ["dicom", "images", "nifti"]
    cache = SliceCache.build(sources, tmp_path / "cache", normaliser=ct_normaliser(), size=(16, 16))
    assert (
        len(cache) == 3 + 4 + 2
        and cache.data.dtype == np.uint16
        and isinstance(cache.data, np.memmap)
    )
    assert 0.0 <= cache[0].min() and cache[0].max() <= 1.0

    def fail(source):
        raise AssertionError("decoded again")

    monkeypatch.setattr(training, "_load", fail)  # a second build must reuse the cache
    again = SliceCache.build(sources, tmp_path / "cache", normaliser=ct_normaliser(), size=(16, 16))
    assert again.folder == cache.folder
    ds = SliceDataset(again, patch_size=8, flips=True, rot90=True, seed=1)
    x = ds[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(
        ds[3], SliceDataset(again, patch_size=8, flips=True, rot90=True, seed=1)[3]
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    assert next(iter(loader)).shape == (4, 1, 8, 8)


def test_percentile_normaliser_and_splits_by_group(tmp_path, make_series):
    from medrecon.datasets.training import Source
    from medrecon.priors.normalise import mri_normaliser

    sources = _sources(tmp_path, make_series)
    cache = SliceCache.build(sources, tmp_path / "c", normaliser=mri_normaliser(), size=(16, 16))
    assert max(float(cache[i].max()) for i in range(len(cache))) == pytest.approx(1.0)
    many = [Source(f"/x/{i}", "nifti", f"patient{i // 3}") for i in range(60)]
    splits = split_sources(many, {"train": 0.7, "val": 0.3}, seed=0)
    assert sum(len(v) for v in splits.values()) == 60 and len(splits["val"]) > 0
    train_groups = {s.group for s in splits["train"]}
    assert not train_groups & {s.group for s in splits["val"]}
    assert (
        split_sources(many[::-1], {"train": 0.7, "val": 0.3}, seed=0)["val"] == splits["val"][::-1]
    )
    with pytest.raises(SettingsError):
        split_sources(many, {"train": 0.7})
