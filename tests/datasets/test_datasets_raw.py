"""Raw scanner data without the shared files: the raw-data steps on synthetic k-space, and MRD
round trips through the ``ismrmrd`` library (written with it, read with it)."""

from __future__ import annotations

import numpy as np
import pytest

from medrecon.datasets import KSpace, load_kspace, load_mrd, raw_format, save_fastmri, save_mrd, thin_measured_kspace
from medrecon.datasets.partial_fourier import fill_partial_fourier, partial_fourier_axes
from medrecon.datasets.raw_steps import (
    compress_coils,
    noise_covariance,
    prepare_raw,
    prewhiten,
    remove_readout_oversampling,
)
from medrecon.errors import InputError, SettingsError


def fft2c(x):
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def ifft2c(k):
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def known_covariance(coils: int, rng) -> np.ndarray:
    a = rng.standard_normal((coils, coils)) + 1j * rng.standard_normal((coils, coils))
    return a @ a.conj().T / coils + 0.2 * np.eye(coils)


def correlated_noise(psi: np.ndarray, n: int, rng) -> np.ndarray:
    low = np.linalg.cholesky(psi)
    z = (rng.standard_normal((psi.shape[0], n)) + 1j * rng.standard_normal((psi.shape[0], n))) / np.sqrt(2)
    return low @ z


def phantom(ny: int, nx: int, phase: bool = True) -> np.ndarray:
    yy, xx = np.mgrid[:ny, :nx]
    img = ((yy - ny / 2) ** 2 / (0.35 * ny) ** 2 + (xx - nx / 2) ** 2 / (0.3 * nx) ** 2 < 1).astype(float)
    img += 0.5 * ((yy - 0.45 * ny) ** 2 + (xx - 0.55 * nx) ** 2 < (0.06 * nx) ** 2)
    if phase:
        img = img * np.exp(1j * (0.8 * xx / nx + 0.5 * yy / ny))
    return img


def raw_kspace(coils=4, ny=32, nx=64, seed=0, noise=True, os_factor=2.0) -> tuple[KSpace, np.ndarray]:
    rng = np.random.default_rng(seed)
    psi = known_covariance(coils, rng)
    sens = np.stack([np.exp(1j * c) * np.ones((ny, nx)) * (1 + 0.1 * c) for c in range(coils)])
    img = phantom(ny, nx)
    k = fft2c(sens * img)[:, None] + correlated_noise(psi, ny * nx, rng).reshape(coils, 1, ny, nx) * 0.01
    header = {"raw": {"format": "test", "readout_oversampling": os_factor, "acceleration": [1, 1]},
              "readout_axis": -1}
    n = correlated_noise(psi, 4000, rng) * 0.01 if noise else None
    return KSpace(k.astype(np.complex64), header=header, noise=n), psi


# ----------------------------------------------------------------------------------- prewhitening
def test_prewhitening_with_the_noise_scan_makes_the_noise_covariance_the_identity():
    rng = np.random.default_rng(1)
    psi = known_covariance(8, rng)
    ksp = KSpace(np.zeros((8, 1, 16, 16), np.complex64), header={"raw": {}},
                 noise=correlated_noise(psi, 20000, rng).astype(np.complex64))
    before = noise_covariance(ksp.noise)
    assert np.abs(before - np.eye(8)).max() > 0.3  # correlated to start with
    out = prewhiten(ksp)
    assert np.allclose(noise_covariance(out.noise), np.eye(8), atol=1e-6)  # exact on the samples used
    # fresh noise with the same covariance: identity within the sampling error (1/sqrt(N))
    fresh = correlated_noise(psi, 20000, np.random.default_rng(2))
    from medrecon.datasets.raw_steps import whitening_matrix

    w = whitening_matrix(noise_covariance(ksp.noise))
    assert np.abs(noise_covariance(w @ fresh) - np.eye(8)).max() < 0.05
    assert out.header["raw_steps"][-1]["note"].startswith("noise scan (20000 samples")


def test_prewhitening_without_a_noise_scan_uses_the_kspace_edge_and_says_so():
    rng = np.random.default_rng(3)
    psi = known_covariance(6, rng)
    ny, nx = 128, 128
    k = fft2c(np.stack([phantom(ny, nx)] * 6)[:, None]) * 0.0  # no signal: the corners are pure noise
    k = k + correlated_noise(psi, ny * nx, rng).reshape(6, 1, ny, nx)
    out = prewhiten(KSpace(k.astype(np.complex64), header={"raw": {}}))
    note = out.header["raw_steps"][-1]["note"]
    assert "k-space edge" in note and "no noise scan" in note
    whole = out.data.reshape(6, -1)  # all samples are noise: whitened everywhere, not only at the edge
    n_edge = int(note.split("k-space edge: ")[1].split()[0])  # 4 corners of 13 × 13 samples
    assert n_edge == 4 * 13 * 13
    assert np.abs(noise_covariance(whole) - np.eye(6)).max() < 4 / np.sqrt(n_edge)  # the estimate's error


def test_prewhitening_choice_is_refused_when_impossible():
    ksp, _ = raw_kspace(noise=False)
    with pytest.raises(SettingsError, match="no noise scan"):
        prewhiten(ksp, source="noise")
    with pytest.raises(SettingsError, match="source"):
        prewhiten(ksp, source="bogus")


# ----------------------------------------------------------------------------------- oversampling
def test_readout_oversampling_removal_keeps_the_central_field_of_view():
    ny, nx = 32, 64
    img = np.zeros((ny, nx), complex)
    img[:, nx // 4: 3 * nx // 4] = phantom(ny, nx // 2)  # the object fills the central half
    ksp = KSpace(fft2c(img)[None, None].astype(np.complex64), header={"raw": {"readout_oversampling": 2.0}})
    out = remove_readout_oversampling(ksp)
    assert out.data.shape == (1, 1, ny, nx // 2) and out.header["raw"]["readout_oversampling"] == 1.0
    assert np.allclose(ifft2c(out.data[0, 0]), img[:, nx // 4: 3 * nx // 4], atol=1e-5)
    assert out.mask.all()


def test_oversampling_removal_maps_an_asymmetric_echo_onto_the_new_grid():
    ny, nx = 16, 64
    k = fft2c(phantom(ny, nx))[None, None].astype(np.complex64)
    mask = np.ones((1, ny, nx), bool)
    mask[..., :20] = False  # 20 pre-echo samples missing (12 of 32 before the centre measured)
    ksp = KSpace(k * mask, mask=mask, header={"raw": {"readout_oversampling": 2.0}})
    out = remove_readout_oversampling(ksp)
    cols = np.flatnonzero(out.mask[0, 0])
    assert cols[0] == 16 // 2 * 2 - (32 - 20) // 2 and cols[-1] == 31  # measured from k = -6 to the edge
    assert np.all(out.data[..., : cols[0]] == 0)


# ----------------------------------------------------------------------------------- partial Fourier
@pytest.mark.parametrize("axis", [-1, -2])
def test_homodyne_and_pocs_beat_zero_filling_on_an_asymmetric_echo(axis):
    n = 64
    img = phantom(n, n)  # smooth phase: what partial Fourier assumes
    k = fft2c(img)[None, None].astype(np.complex64)
    mask = np.ones((1, n, n), bool)
    if axis == -1:
        mask[..., : n // 4 - 4] = False
    else:
        mask[:, : n // 4 - 4] = False
    ksp = KSpace(k * mask, mask=mask, header={})
    assert list(partial_fourier_axes(ksp.mask)) == [axis]
    err = {}
    for method in ("zero-fill", "homodyne", "pocs"):
        out = fill_partial_fourier(ksp, method)
        rec = np.abs(ifft2c(out.data[0, 0]))
        err[method] = np.linalg.norm(rec - np.abs(img)) / np.linalg.norm(img)
        assert out.header["raw_steps"][-1]["step"] == "partial Fourier"
        if method != "zero-fill":
            assert out.mask.all()
    assert err["homodyne"] < 0.8 * err["zero-fill"] and err["pocs"] < 0.6 * err["zero-fill"], err
    pocs = fill_partial_fourier(ksp, "pocs")
    assert np.allclose(pocs.data[:, :, mask[0]], k[:, :, mask[0]])  # measured samples kept


def test_homodyne_refuses_undersampled_kspace():
    ksp, _ = raw_kspace(os_factor=1.0)
    mask = np.ones((1, 32, 64), bool)
    mask[:, ::2] = False  # every other line: parallel imaging
    mask[:, 14:18] = True
    mask[..., :20] = False
    ksp = KSpace(ksp.data * mask, mask=mask, header=ksp.header)
    assert fill_partial_fourier(ksp, "zero-fill").mask is not None
    with pytest.raises(SettingsError, match="undersampled"):
        fill_partial_fourier(ksp, "pocs")


# ----------------------------------------------------------------------------------- coil compression
def test_coil_compression_keeps_low_rank_signal():
    rng = np.random.default_rng(4)
    base = fft2c(np.stack([phantom(24, 24), phantom(24, 24, phase=False)]))  # 2 independent coil images
    mix = rng.standard_normal((8, 2)) + 1j * rng.standard_normal((8, 2))
    k = np.einsum("cv,vyx->cyx", mix, base)[:, None].astype(np.complex64)
    out = compress_coils(KSpace(k, header={}), 2)
    assert out.data.shape == (2, 1, 24, 24)
    assert "100.00% of the energy" in out.header["raw_steps"][-1]["note"]
    rss = lambda d: np.sqrt((np.abs(ifft2c(d)) ** 2).sum(0))  # noqa: E731
    assert np.allclose(rss(out.data), rss(k), rtol=1e-3, atol=1e-4 * rss(k).max())
    with pytest.raises(SettingsError):
        compress_coils(KSpace(k, header={}), 9)


def test_prepare_raw_runs_the_steps_in_order():
    ksp, _ = raw_kspace()
    out = prepare_raw(ksp, partial_fourier="zero-fill", coils=2)
    assert [s["step"] for s in out.header["raw_steps"]] == ["prewhiten", "readout oversampling", "partial Fourier",
                                                             "coil compression"]
    assert out.data.shape == (2, 1, 32, 32) and out.noise.shape[0] == 2


def test_thinning_keeps_whole_phase_encode_lines():
    ksp, _ = raw_kspace(os_factor=1.0)
    thin = thin_measured_kspace(ksp, 4, "equispaced", 0.125, seed=0)
    lines = thin.mask[0].any(axis=1)
    assert np.array_equal(thin.mask[0], np.broadcast_to(lines[:, None], thin.mask[0].shape))  # rows: phase
    assert 6 <= lines.sum() <= 12 and lines[14:18].all()
    assert thin.header["thinning"]["how"] == "retrospective on measured data"
    with pytest.raises(SettingsError, match="fully sampled"):
        thin_measured_kspace(thin, 2)


# ----------------------------------------------------------------------------------- MRD
def full_featured_kspace() -> KSpace:
    """2 slices, 3 coils, asymmetric echo, calibration lines, noise scan and geometry."""
    rng = np.random.default_rng(5)
    c, z, ny, nx = 3, 2, 16, 24
    data = (rng.standard_normal((c, z, ny, nx)) + 1j * rng.standard_normal((c, z, ny, nx))).astype(np.complex64)
    mask = np.zeros((1, ny, nx), bool)
    mask[:, ::2, 4:] = True  # R = 2, 4 pre-echo samples missing
    mask[:, 6:10, 4:] = True
    calib = np.zeros_like(data)
    calib[:, :, 5:11, 4:] = data[:, :, 5:11, 4:] * 0.5
    geo = [{"position_lps_mm": [1.0, 2.0, 3.0 + 4 * s], "read_dir": [1.0, 0.0, 0.0], "phase_dir": [0.0, 1.0, 0.0],
            "slice_dir": [0.0, 0.0, 1.0]} for s in range(z)]
    raw = {"vendor": "Test", "model": "Unit", "field_T": 1.5, "recon_fov_mm": [240.0, 160.0, 4.0],
           "readout_oversampling": 1.0, "acceleration": [2, 1], "slices": geo, "protocol": "t1"}
    return KSpace(data * mask, mask=mask, header={"raw": raw, "readout_axis": -1},
                  noise=(rng.standard_normal((c, 700)) + 0j).astype(np.complex64), calibration=calib)


def test_mrd_round_trip_through_the_ismrmrd_library(tmp_path):
    import ismrmrd

    ksp = full_featured_kspace()
    path = save_mrd(ksp, tmp_path / "scan.h5")
    assert raw_format(path) == "mrd"
    with ismrmrd.File(str(path), "r") as fh:  # the library itself reads what we wrote
        container = fh["dataset"]
        header = container.header
        acqs = container.acquisitions[:]
    assert header.encoding[0].encodedSpace.matrixSize.x == 24 and header.acquisitionSystemInformation.receiverChannels == 3
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    calib_only = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)]
    both = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)]
    assert sum(a.number_of_samples for a in noise) == 700
    assert len(calib_only) == 2 * 1 and len(both) == 2 * 5  # per slice: line 5 / lines 6..10
    assert {a.center_sample for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)} == {8}
    back = load_mrd(path)
    assert np.array_equal(back.data, ksp.data) and np.array_equal(back.mask, ksp.mask)
    assert np.array_equal(back.noise, ksp.noise)
    measured_calib = np.any(back.calibration != 0, axis=(0, 1, 3))
    assert np.array_equal(np.flatnonzero(measured_calib), np.arange(5, 11))
    raw = back.header["raw"]
    assert raw["vendor"] == "Test" and raw["acceleration"] == [2.0, 1.0] and raw["recon_fov_mm"][:2] == [240.0, 160.0]
    assert np.allclose(raw["slices"][1]["position_lps_mm"], [1.0, 2.0, 7.0])
    with pytest.raises(InputError, match="already exists"):
        save_mrd(ksp, path)


def test_mrd_from_fastmri_layout_keeps_the_readout(tmp_path):
    rng = np.random.default_rng(6)
    k = (rng.standard_normal((2, 1, 12, 10)) + 1j * rng.standard_normal((2, 1, 12, 10))).astype(np.complex64)
    cols = np.zeros(10, bool)
    cols[::2] = True
    cols[4:6] = True
    save_fastmri(tmp_path / "f.h5", KSpace(k, mask=np.broadcast_to(cols, (1, 12, 10)).copy()))
    fast = load_kspace(str(tmp_path / "f.h5"), input_domain="kspace")
    save_mrd(fast, tmp_path / "f.mrd")
    back = load_kspace(str(tmp_path / "f.mrd"))  # read by its ending: MRD
    assert back.header["raw"]["format"] == "mrd"
    # MRD rows are the phase lines (fastMRI columns), columns the readout (fastMRI rows)
    assert np.array_equal(back.data, np.swapaxes(fast.data * fast.mask[None], -1, -2))


def _mrd(tmp_path, trajectory="cartesian", z=1, flags=(), contrast=0, traj_dims=0):
    import ismrmrd
    from ismrmrd import xsd

    space = xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=16, y=8, z=z),
                                  fieldOfView_mm=xsd.fieldOfViewMm(x=100.0, y=100.0, z=5.0))
    enc = xsd.encodingType(encodedSpace=space, reconSpace=space, trajectory=xsd.trajectoryType(trajectory),
                           encodingLimits=xsd.encodingLimitsType(
                               kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=7, center=4)))
    hdr = xsd.ismrmrdHeader(encoding=[enc], experimentalConditions=xsd.experimentalConditionsType(
        H1resonanceFrequency_Hz=63_000_000))
    acqs = []
    for line in range(8):
        a = ismrmrd.Acquisition.from_array(np.ones((2, 16), np.complex64), center_sample=8,
                                           trajectory=np.zeros((16, traj_dims), np.float32) if traj_dims else None)
        a.idx.kspace_encode_step_1 = line
        a.idx.contrast = contrast * (line % 2)
        for f in flags:
            a.set_flag(f)
        acqs.append(a)
    path = tmp_path / "x.mrd"
    with ismrmrd.File(str(path), "w") as fh:
        fh["dataset"].header = hdr
        fh["dataset"].acquisitions = acqs
    return path


@pytest.mark.parametrize("kind, kw, text", [
    ("epi", {"trajectory": "epi"}, "EPI"),
    ("radial", {"trajectory": "radial"}, "radial trajectory (non-Cartesian)"),
    ("reverse", {"flags": (22,)}, "EPI (8 reversed lines"),
    ("3d", {"z": 4}, "3-D encoding (4 partitions"),
    ("echoes", {"contrast": 1}, "2 echoes / contrasts"),
    ("trajectory-points", {"traj_dims": 2}, "trajectory points"),
])
def test_mrd_unsupported_kinds_are_refused_in_one_line(tmp_path, kind, kw, text):
    path = _mrd(tmp_path, **kw)
    with pytest.raises(InputError) as err:
        load_mrd(path)
    message = str(err.value)
    assert text in message and "x.mrd" in message and "\n" not in message


def test_a_plain_cartesian_mrd_file_reads(tmp_path):
    ksp = load_mrd(_mrd(tmp_path))
    assert ksp.data.shape == (2, 1, 8, 16) and ksp.mask.all() and ksp.noise is None
