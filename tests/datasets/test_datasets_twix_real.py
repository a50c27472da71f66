"""Evidence on the real Siemens twix files of ``$MEDRECON_DATA/mri/raw`` (skipped without them).

The k-space medrecon reads is checked against an independent reconstruction written here in plain
NumPy from ``twixtools``' own arrays, and the raw-data steps against what the headers say.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medrecon.datasets import load_mrd, load_twix, prepare_raw, save_mrd
from medrecon.datasets.readouts import image_affine
from medrecon.errors import InputError

INVIVO = "pulseq_flash2d_invivo_16ch_2024-02-06-164128.dat"
GRE = "twixtools_example_gre.dat"
SEVEN_T = "twixtools_test_singlechannel_7T.dat"
EPI = "twixtools_example_epi.dat"


@pytest.fixture(scope="module")
def raw_dir():
    # the rule of conftest.data_root (MEDRECON_DATA, else <repo>/../shared/data), for a module-wide fixture
    root = Path(os.environ.get("MEDRECON_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    folder = root / "mri" / "raw"
    if not (folder / GRE).is_file():
        pytest.skip(f"real twix files not found in {folder} (set MEDRECON_DATA)")
    return folder


@pytest.fixture(scope="module")
def loaded(raw_dir):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_twix(raw_dir / name)
        return cache[name]

    return get


def ifft2c(k):
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def numpy_rss(path) -> np.ndarray:
    """Independent reconstruction: twixtools' MDBs stacked by their line counter, 2-D inverse FFT, RSS."""
    import contextlib
    import io

    import twixtools

    with contextlib.redirect_stdout(io.StringIO()):
        scan = twixtools.read_twix(str(path), verbose=False)[-1]
    lines = {int(m.cLin): np.asarray(m.data) for m in scan["mdb"] if m.is_image_scan()}
    k = np.stack([lines[i] for i in sorted(lines)], axis=1)  # (coils, lines, samples)
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(1, 2))), axes=(1, 2))
    return np.sqrt((np.abs(img) ** 2).sum(0))


def test_pulseq_invivo_16ch_rss_matches_an_independent_numpy_reconstruction(raw_dir, loaded):
    ksp = loaded(INVIVO)
    assert ksp.data.shape == (16, 1, 128, 128) and ksp.mask.all() and ksp.noise is None
    raw = ksp.header["raw"]
    assert "protocol matrix 64×64" in raw["header_mismatch"]  # Pulseq's placeholder protocol
    assert raw["centre_line"]["line"] == 64 and raw["centre_line"]["how"].startswith("middle")
    ready = prepare_raw(ksp, prewhitening="off")
    ours = np.sqrt((np.abs(ifft2c(ready.data[:, 0])) ** 2).sum(0))
    ref = numpy_rss(raw_dir / INVIVO)
    ours, ref = ours / ours.max(), ref / ref.max()
    assert np.abs(ours - ref).max() < 1e-4
    # prewhitening (k-space edge: no noise scan) changes the coil mixing, not the anatomy
    white = prepare_raw(ksp)
    rss = np.sqrt((np.abs(ifft2c(white.data[:, 0])) ** 2).sum(0))
    assert np.corrcoef(rss.ravel(), ref.ravel())[0, 1] > 0.95
    assert "no noise scan" in white.header["raw_steps"][0]["note"]


def test_gre_oversampling_removed_160x160_phantom_centred(raw_dir, loaded):
    ksp = loaded(GRE)
    assert ksp.data.shape == (2, 1, 160, 320) and ksp.header["raw"]["readout_oversampling"] == 2.0
    ready = prepare_raw(ksp)
    assert ready.data.shape == (2, 1, 160, 160)
    rss = np.sqrt((np.abs(ifft2c(ready.data[:, 0])) ** 2).sum(0))
    inside = rss > 0.3 * rss.max()
    cy, cx = (np.argwhere(inside).mean(axis=0) - 80) / 160
    assert abs(cy) < 0.05 and abs(cx) < 0.05, (cy, cx)  # centred within 5 % of the FOV
    cols = np.flatnonzero(inside.any(0))
    assert cols[0] > 0 and cols[-1] < 159  # the phantom fits into the FOV: the oversampled margin is gone
    ref = numpy_rss(raw_dir / GRE)[:, 80:240]  # independent: the central half of the oversampled image
    unwhite = np.sqrt((np.abs(ifft2c(prepare_raw(ksp, prewhitening="off").data[:, 0])) ** 2).sum(0))
    assert np.abs(unwhite / unwhite.max() - ref / ref.max()).max() < 1e-4
    affine = image_affine(ready.header["raw"], (1, 160, 160))
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), [1.25, 1.25, 4.0], atol=1e-3)  # 200 mm / 160
    normal_lps = np.array([0.0, 0.0383878015, 0.9992629886])  # sSliceArray sNormal of the protocol
    assert abs(abs((affine[:3, 2] / 4.0) @ (normal_lps * [-1, -1, 1]))) > 0.999


def test_7t_localizer_asymmetric_echo(loaded):
    ksp = loaded(SEVEN_T)
    readout = ksp.header["raw"]["readout"]
    assert readout["samples"] == [428] and readout["centre_sample"] == [172] and readout["grid_columns"] == 512
    zf = prepare_raw(ksp)
    assert zf.data.shape == (1, 1, 256, 256)
    cols = np.flatnonzero(zf.mask[0].any(0))
    assert cols[0] == 42 and cols[-1] == 255  # 86 of 128 pre-echo samples measured after oversampling removal
    peak = np.unravel_index(np.argmax(np.abs(zf.data[0, 0])), (256, 256))
    assert abs(peak[0] - 128) <= 2 and abs(peak[1] - 128) <= 2  # the echo sits at the grid centre
    base = np.abs(ifft2c(zf.data[0, 0]))
    for method in ("homodyne", "pocs"):
        filled = prepare_raw(ksp, partial_fourier=method)
        assert filled.mask.all()
        img = np.abs(ifft2c(filled.data[0, 0]))
        assert np.corrcoef(img.ravel(), base.ravel())[0, 1] > 0.95
        # the filled-in side carries energy now (zero-filling leaves it empty)
        assert np.abs(filled.data[0, 0, :, :42]).sum() > 0.01 * np.abs(filled.data[0, 0]).sum()


def test_epi_is_refused_in_one_line(raw_dir):
    with pytest.raises(InputError) as err:
        load_twix(raw_dir / EPI)
    message = str(err.value)
    assert EPI in message and "EPI" in message and "not built" in message and "\n" not in message


def test_twix_to_mrd_round_trip(tmp_path, loaded):
    import ismrmrd

    ksp = loaded(GRE)
    path = save_mrd(ksp, tmp_path / "gre.h5")
    with ismrmrd.File(str(path), "r") as fh:
        assert len(fh["dataset"].acquisitions) == 160
        assert fh["dataset"].header.acquisitionSystemInformation.systemModel == "Skyra"
    back = load_mrd(path)
    assert np.array_equal(back.data, ksp.data) and np.array_equal(back.mask, ksp.mask)
    assert back.header["raw"]["readout_oversampling"] == 2.0
    for key in ("position_lps_mm", "read_dir", "phase_dir", "slice_dir"):
        assert np.allclose(back.header["raw"]["slices"][0][key], ksp.header["raw"]["slices"][0][key], atol=1e-5)
