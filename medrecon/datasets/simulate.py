"""Simulate measurements from an image or volume: CT sinograms and single/multi-coil MRI k-space.

* CT (:func:`simulate_ct`): any parallel- or fan-beam geometry (a sinogram geometry dict, see
  :mod:`medrecon.datasets.sinogram`) and view set; Gaussian noise (``sigma`` in sinogram units)
  or Poisson noise with ``I0`` incident photons per ray (low dose): the HU line integrals are
  converted to attenuation with μ = μ_water (1 + HU / 1000), counts ~ Poisson(I0 e^{-p}) (at
  least 1), and converted back, so the sinogram stays in image-pixel units (HU · pixel).
* MRI (:func:`simulate_mri`): Cartesian k-space for any mask (an array or a
  :func:`medrecon.operators.mri_mask` name), one coil (uniform sensitivity) or several with SigPy
  birdcage maps normalised to unit root-sum-of-squares (or given maps, used as they are), an optional smooth random phase, and
  complex Gaussian noise (``noise_std`` per real/imaginary part; the FFT is orthonormal, so it
  is also the image-domain noise level).

Everything random comes from ``seed`` alone.  :func:`save_simulation` writes the measurement and
the ground truth in the formats of this package; ``medrecon simulate`` (:mod:`medrecon.cli.simulate`)
wraps it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon.datasets.sinogram import validate_geometry
from medrecon.datasets.types import KSpace, Sinogram, Volume
from medrecon.errors import SettingsError, ShapeError

__all__ = [
    "simulate_ct",
    "simulate_mri",
    "ct_operator",
    "birdcage_coil_maps",
    "smooth_phase",
    "save_simulation",
    "bundled_ct_slice",
]

MU_WATER_PER_MM = 0.0192  # about 70 keV


def bundled_ct_slice() -> Path:
    """Path of the bundled real CT slice (the README's default input): a 256² head CT slice at
    0.98 mm, the grid and pixel size of the shipped ``ct-256`` prior (``medrecon/data/NOTICE.md``
    says where it comes from and its licence)."""
    return Path(__file__).resolve().parents[1] / "data" / "ct_head_256.dcm"


def _image_array(image: np.ndarray | Volume) -> tuple[np.ndarray, float]:
    if isinstance(image, Volume):
        return image.array, float(image.spacing_mm[2])
    a = np.asarray(image)
    a = a[None] if a.ndim == 2 else a
    if a.ndim != 3 or 0 in a.shape:
        raise ShapeError(
            f"simulate: image must be (Y, X) or (Z, Y, X); got shape {np.asarray(image).shape}"
        )
    return a, 1.0


def ct_operator(geometry: dict[str, Any], image_shape: tuple[int, int], *, view_mask: Any = None,
                matrix_budget: int | None = None) -> Any:
    """Build the medrecon CT operator for a sinogram geometry and an image grid (H, W).

    ``pixel_size_mm`` (default 1) converts the geometry's millimetres to pixels; the geometry's
    ``convention``, ``detector_flipped``, ``rotation_direction`` and detector offset are read as
    :mod:`medrecon.datasets.sinogram` describes (:func:`medrecon.operators.conventions.ct_projector`).

    Parameters
    ----------
    geometry : dict
        A sinogram geometry (validated here).
    image_shape : (H, W)
    view_mask : array-like of bool, optional
        Measure only these of the geometry's views (the others stay in the full set ``T``).
    matrix_budget : int, optional
        Bytes the projector's sparse matrices may take before it runs matrix-free.
    """
    from medrecon.operators.conventions import ct_projector

    g = validate_geometry(geometry)
    pix = float(g.get("pixel_size_mm") or 1.0)
    if g["type"] == "parallel":
        spacing, extra = g["detector_spacing_mm"], {}
    else:
        spacing = g["detector_spacing_rad"] if g["detector"] == "equiangular" else g["detector_spacing_mm"]
        extra = {"detector": g["detector"], "source_to_isocenter": g["source_to_isocenter_mm"],
                 "source_to_detector": g["source_to_detector_mm"]}
    return ct_projector(
        g["type"], image_shape, g["angles_rad"], g["n_detectors"], spacing, convention=g["convention"],
        pixel_size=pix, detector_offset_bins=g["detector_offset_bins"], flip_detector=g["detector_flipped"],
        clockwise=g["rotation_direction"] == "clockwise", view_mask=view_mask, matrix_budget=matrix_budget, **extra,
    )


def simulate_ct(
    image: np.ndarray | Volume,
    geometry: dict[str, Any] | None = None,
    *,
    noise: str = "none",
    sigma: float = 0.0,
    I0: float = 1e5,  # noqa: N803 - the physics name
    mu_water_per_mm: float = MU_WATER_PER_MM,
    seed: int = 0,
) -> Sinogram:
    """Project an HU image (slice by slice) and add noise.

    Parameters
    ----------
    image : ndarray (Y, X) or (Z, Y, X), or Volume
        CT in HU.  A Volume's in-plane spacing becomes ``pixel_size_mm``.
    geometry : dict, optional
        Sinogram geometry (angles, detector, distances in mm).  Default: parallel beam, 180
        views on [0, π), ⌈√2·N⌉ bins of one pixel.
    noise : {"none", "gaussian", "poisson"}
    sigma : float
        Gaussian noise standard deviation in sinogram units (HU · pixel).
    I0 : float
        Incident photons per ray for Poisson noise (lower = lower dose).
    mu_water_per_mm : float
        μ of water for the HU ↔ μ conversion.
    seed : int
        Seed of the noise.

    Returns
    -------
    Sinogram
        ``data`` (Z, views, bins) float32 in image-pixel units; ``geometry`` with the settings.
    """
    arr, pix = _image_array(image)
    if not np.all(np.isfinite(arr)):
        raise ShapeError("simulate_ct(): image holds NaN or Inf values")
    if noise not in ("none", "gaussian", "poisson"):
        raise SettingsError(
            f"simulate_ct(): noise must be 'none', 'gaussian' or 'poisson'; got {noise!r}"
        )
    h, w = arr.shape[1:]
    if geometry is None:
        geometry = {
            "type": "parallel",
            "angles_rad": (np.arange(180) * math.pi / 180).tolist(),
            "n_detectors": int(math.ceil(math.sqrt(2) * max(h, w))),
            "detector_spacing_mm": pix,
        }
    g = validate_geometry({"pixel_size_mm": pix, **geometry, "units": "image_pixel"})
    op = ct_operator(g, (h, w))
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))[:, None]
    with torch.no_grad():
        y = op(x.to(torch.float32)).to(torch.float64)
        gen = torch.Generator().manual_seed(int(seed))
        if noise == "gaussian":
            if not sigma >= 0:
                raise SettingsError(f"simulate_ct(): sigma must be ≥ 0; got {sigma}")
            y = y + sigma * torch.randn(y.shape, generator=gen, dtype=y.dtype)
        elif noise == "poisson":
            if not I0 > 0 or not mu_water_per_mm > 0:
                raise SettingsError(
                    f"simulate_ct(): I0 and mu_water_per_mm must be > 0; got {I0}, {mu_water_per_mm}"
                )
            ones = op(torch.ones_like(x[:1], dtype=torch.float32)).to(torch.float64)
            scale = g["pixel_size_mm"] * mu_water_per_mm
            p = (scale * (ones + y / 1000.0)).clamp_min(0.0)  # attenuation line integrals
            counts = torch.poisson(I0 * torch.exp(-p), generator=gen).clamp_min(1.0)
            y = (-torch.log(counts / I0) / scale - ones) * 1000.0
            g.update(I0=float(I0), mu_water_per_mm=float(mu_water_per_mm))
    g.update(noise=noise, sigma=float(sigma), seed=int(seed))
    return Sinogram(y[:, 0].numpy().astype(np.float32), g)


def birdcage_coil_maps(n_coils: int, shape: tuple[int, int]) -> np.ndarray:
    """SigPy birdcage sensitivities (coils, H, W), complex64, normalised to unit RSS."""
    import sigpy.mri

    if n_coils < 1:
        raise SettingsError(f"birdcage_coil_maps(): n_coils must be ≥ 1; got {n_coils}")
    maps = sigpy.mri.birdcage_maps((n_coils, *shape)).astype(np.complex64)
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))).astype(np.complex64)


def smooth_phase(
    shape: tuple[int, int], amplitude_rad: float, seed: int, n_terms: int = 4
) -> np.ndarray:
    """Smooth random phase (H, W) in radians: a sum of low-frequency cosines, max |φ| ≈ amplitude."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    phi = np.zeros(shape)
    for _ in range(n_terms):
        fy, fx, off = rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5), rng.uniform(0, 2 * np.pi)
        phi += np.cos(np.pi * (fy * yy + fx * xx) + off)
    return amplitude_rad * phi / max(np.abs(phi).max(), 1e-12)


def simulate_mri(
    image: np.ndarray | Volume,
    mask: np.ndarray | torch.Tensor | str = "equispaced",
    *,
    acceleration: float = 4.0,
    center_fraction: float = 0.08,
    n_coils: int = 1,
    coil_maps: np.ndarray | None = None,
    phase_rad: float = 0.0,
    noise_std: float = 0.0,
    seed: int = 0,
) -> KSpace:
    """Cartesian k-space of an image (slice by slice), single- or multi-coil.

    Parameters
    ----------
    image : ndarray (Y, X) or (Z, Y, X), real or complex, or Volume
    mask : ndarray (Y, X) or (Z, Y, X) bool, or a mask name (``random``, ``equispaced``,
        ``gaussian1d``, ``poisson``) drawn with ``acceleration``, ``center_fraction``, ``seed``.
    n_coils : int
        1: uniform sensitivity; more: simulated birdcage maps (ignored when ``coil_maps`` is given).
    coil_maps : ndarray (coils, Y, X) or (coils, Z, Y, X), optional
        Given sensitivities, used as they are.
    phase_rad : float
        Amplitude of a smooth random image phase (0: real image).
    noise_std : float
        Complex Gaussian noise per real / imaginary part, in k-space units.
    seed : int

    Returns
    -------
    KSpace
        ``data`` (coils, Z, Y, X) complex64 (zeros where not sampled), ``mask`` (1 or Z, Y, X),
        ``coil_maps`` (coils, Z, Y, X), ``header["simulation"]`` with the settings.
    """
    from medrecon.operators import MultiCoilMRI, mri_mask

    arr, _ = _image_array(image)
    if not np.all(np.isfinite(arr)):
        raise ShapeError("simulate_mri(): image holds NaN or Inf values")
    z, h, w = arr.shape
    if isinstance(mask, str):
        m = mri_mask(mask, (h, w), acceleration, center_fraction, seed=seed).numpy()
    else:
        m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    m = m[None] if m.ndim == 2 else m
    if m.ndim != 3 or m.shape[1:] != (h, w) or m.shape[0] not in (1, z):
        raise ShapeError(
            f"simulate_mri(): mask must be ({h}, {w}) or ({z}, {h}, {w}); got {m.shape}"
        )
    if coil_maps is None:
        single = np.ones((1, h, w), np.complex64)  # one coil: uniform sensitivity (MaskedFourier)
        maps2d = single if n_coils == 1 else birdcage_coil_maps(n_coils, (h, w))
        maps = np.broadcast_to(maps2d[:, None], (n_coils, z, h, w))
    else:
        maps = np.asarray(coil_maps, dtype=np.complex64)
        maps = np.broadcast_to(maps[:, None], (maps.shape[0], z, h, w)) if maps.ndim == 3 else maps
        if maps.shape[1:] != (z, h, w):
            raise ShapeError(
                f"simulate_mri(): coil_maps must be (coils, {h}, {w}) or (coils, {z}, {h}, {w}); "
                f"got {np.asarray(coil_maps).shape}"
            )
    x = arr.astype(np.complex64)
    if phase_rad:
        x = x * np.exp(1j * smooth_phase((h, w), phase_rad, seed + 1)).astype(np.complex64)[None]
    op = MultiCoilMRI(
        torch.from_numpy(np.array(maps.transpose(1, 0, 2, 3), dtype=np.complex64)),
        torch.from_numpy(np.broadcast_to(m, (z, h, w)).copy()),
    )
    with torch.no_grad():
        y = op(torch.from_numpy(x)[:, None])
        if noise_std:
            if noise_std < 0:
                raise SettingsError(f"simulate_mri(): noise_std must be ≥ 0; got {noise_std}")
            gen = torch.Generator().manual_seed(int(seed) + 2)
            n = torch.randn((2, *y.shape), generator=gen) * noise_std
            y = (
                y
                + torch.complex(n[0], n[1])
                * torch.from_numpy(np.broadcast_to(m, (z, h, w)).copy())[:, None]
            )
    settings = {
        "acceleration": float(acceleration),
        "center_fraction": float(center_fraction),
        "mask": mask if isinstance(mask, str) else "given",
        "n_coils": int(maps.shape[0]),
        "coil_maps": "given" if coil_maps is not None else "birdcage",
        "phase_rad": float(phase_rad),
        "noise_std": float(noise_std),
        "seed": int(seed),
    }
    data = y.numpy().transpose(1, 0, 2, 3)
    return KSpace(
        np.ascontiguousarray(data),
        mask=m.astype(bool),
        coil_maps=np.ascontiguousarray(maps),
        header={"simulation": settings},
    )


def save_simulation(
    out_dir: str | Path,
    name: str,
    measurement: Sinogram | KSpace,
    truth: Volume,
    *,
    formats: Sequence[str] = ("native",),
    overwrite: bool = False,
) -> list[Path]:
    """Write a simulated measurement with its ground truth.

    CT: ``name.npy`` + ``name.json`` (raw sinogram format) and ``name_truth.nii.gz``.
    MRI: ``name.h5`` (fastMRI layout with the magnitude truth as reference) and
    ``name_truth.nii.gz``; ``"bart"`` in ``formats`` adds ``name_ksp.cfl/.hdr`` and
    ``name_maps.cfl/.hdr``; ``"dicom"`` adds the truth as a DICOM series ``name_truth_dicom/``.
    """
    from medrecon.datasets.bart import save_bart_kspace, write_cfl
    from medrecon.datasets.dicom_write import save_dicom_series
    from medrecon.datasets.fastmri import save_fastmri
    from medrecon.datasets.nifti import save_nifti
    from medrecon.datasets.sinogram import save_sinogram

    out = Path(out_dir)
    written: list[Path] = []
    if isinstance(measurement, Sinogram):
        written += save_sinogram(measurement, out / name, overwrite=overwrite)
    else:
        written.append(
            save_fastmri(
                out / f"{name}.h5",
                measurement,
                reference=np.abs(truth.array),
                case_id=name,
                attrs={"simulation": json.dumps(measurement.header.get("simulation", {}))},
                write_mask=bool(np.all(measurement.mask == measurement.mask.any(axis=(0, 1)))),
                overwrite=overwrite,
            )
        )
        if "bart" in formats:
            written += save_bart_kspace(measurement, out / f"{name}_ksp", overwrite=overwrite)
            if measurement.coil_maps is not None:
                maps = measurement.coil_maps[..., None].transpose(
                    3, 2, 4, 0, 1
                )  # (kx, ky, 1, coils, Z)
                full = maps.reshape(maps.shape[:4] + (1,) * 9 + (maps.shape[4],))
                written += write_cfl(out / f"{name}_maps", full, overwrite=overwrite)
    written += save_nifti(truth, out / f"{name}_truth.nii.gz", overwrite=overwrite)
    if "dicom" in formats:
        written += save_dicom_series(
            truth, out / f"{name}_truth_dicom", method="ground truth", overwrite=overwrite
        )
    return written
