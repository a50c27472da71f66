"""Turn a case's input into a reconstruction problem: measurement ``y``, operator ``A``, reference.

* Retrospective: an image (DICOM, NIfTI, image folder) is the reference; the measurement is
  simulated from it with the case's CT geometry or MRI mask.
* Prospective: measured data is reconstructed as it is: a raw sinogram (``.npy``/``.npz`` +
  ``.json`` geometry; operator from :func:`medrecon.datasets.simulate.ct_operator`), fastMRI
  HDF5 or BART k-space (single coil → :class:`~medrecon.operators.MaskedFourier`; several coils
  → :class:`~medrecon.operators.MultiCoilMRI` with the file's maps, or ESPIRiT maps from
  :func:`~medrecon.operators.estimate_coil_maps`).  A fastMRI reference reconstruction, or a
  ``reference`` image, is used for metrics when present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from medrecon.errors import InputError, SettingsError

if TYPE_CHECKING:
    from medrecon.datasets.types import Volume
    from medrecon.pipeline.case import ReconstructConfig

__all__ = ["Problem", "input_kind", "build_problem", "parse_slices", "retrospective_operator", "simulate_measurement",
           "add_noise"]

KSPACE_SUFFIXES = (".h5", ".hdf5", ".cfl", ".hdr")
SINOGRAM_SUFFIXES = (".npy", ".npz")


@dataclass
class Problem:
    """A measurement with its operator and, when known, the reference image (Z, 1, H, W)."""

    y: Tensor
    A: Any  # noqa: N815 - the operator's maths name
    reference: Tensor | None
    template: Volume  # affine, modality and meta for the written outputs
    unit: str
    display: tuple[float, float]
    initial_method: str
    title: str
    scale: float = 1.0  # MRI magnitude scale for metrics
    notes: dict[str, Any] = field(default_factory=dict)


def input_kind(path: str | None) -> str:
    """``"image"``, ``"sinogram"`` or ``"kspace"`` from the input's name (bundled sample: image)."""
    if path is None:
        return "image"
    name = Path(path).name.lower()
    if name.endswith(KSPACE_SUFFIXES):
        return "kspace"
    if name.endswith(SINOGRAM_SUFFIXES) or (
        name.endswith(".json") and any(Path(path).with_suffix(s).exists() for s in SINOGRAM_SUFFIXES)
    ):
        return "sinogram"
    return "image"


def parse_slices(text: str | None, n: int, where: str) -> slice:
    """``"a:b"`` or ``"k"`` → a slice within ``n`` slices (``None`` = all)."""
    if not text:
        return slice(None)
    try:
        parts = [int(p) if p.strip() else None for p in str(text).split(":")]
    except ValueError as err:
        raise SettingsError(f"{where}: slices must be 'start:stop' or an index; got {text!r}") from err
    s = slice(parts[0], parts[0] + 1) if len(parts) == 1 else slice(*parts[:3])
    if not range(n)[s]:
        raise SettingsError(f"{where}: slices {text!r} select nothing of {n} slices")
    return s


def _subset(vol: Volume, cfg: ReconstructConfig) -> Volume:
    """Select slices and block-average in-plane by ``cfg.downsample`` (affine follows)."""
    from medrecon.datasets.types import Volume

    s = parse_slices(cfg.slices, vol.shape[0], "input")
    arr = vol.array[s].astype(np.float32)
    affine = vol.affine.copy()
    start = range(vol.shape[0])[s][0]
    affine[:3, 3] += start * affine[:3, 2]
    f = int(cfg.downsample)
    if f < 1:
        raise SettingsError(f"downsample must be ≥ 1; got {cfg.downsample}")
    if f > 1:
        z, h, w = arr.shape
        if h < f or w < f:
            raise SettingsError(f"downsample {f} is larger than the image ({h}×{w})")
        arr = arr[:, : h // f * f, : w // f * f].reshape(z, h // f, f, w // f, f).mean(axis=(2, 4))
        affine[:3, 3] += (f - 1) / 2 * (affine[:3, 0] + affine[:3, 1])
        affine[:3, :2] *= f
    return Volume(arr, affine, vol.modality, dict(vol.meta))


def add_noise(y: Tensor, fraction: float, gen: torch.Generator) -> Tensor:
    """Gaussian measurement noise of std ``fraction`` × the measurement's RMS (complex: per part /√2)."""
    if fraction <= 0:
        return y
    rms = y.abs().pow(2).mean().sqrt()
    noise = torch.randn(y.shape, generator=gen, dtype=y.real.dtype)
    if y.is_complex():
        noise = torch.complex(noise, torch.randn(y.shape, generator=gen, dtype=y.real.dtype)) / math.sqrt(2)
    return y + fraction * rms * noise


def _retrospective(cfg: ReconstructConfig, seed: int) -> Problem:
    from medrecon.datasets import load_volume
    from medrecon.datasets.simulate import bundled_ct_slice
    from medrecon.metrics import SOFT_TISSUE_HU

    src = str(bundled_ct_slice()) if cfg.input is None else cfg.input
    kw = {"series_uid": cfg.series_uid} if cfg.series_uid else {}
    vol = _subset(load_volume(src, **kw), cfg)
    x = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[:, None]  # (Z, 1, H, W)
    A = retrospective_operator(  # noqa: N806
        x.shape[-2:], cfg.modality, seed=seed, views=cfg.views, geometry=cfg.geometry,
        angles_deg=cfg.angles_deg, limited_angle_deg=cfg.limited_angle_deg, pixel_mm=vol.spacing_mm[2],
        source_to_isocenter_mm=cfg.source_to_isocenter_mm, source_to_detector_mm=cfg.source_to_detector_mm,
        mask=cfg.mask, acceleration=cfg.acceleration, center_fraction=cfg.center_fraction,
    )
    if cfg.modality == "ct":
        n = int(np.count_nonzero(A.mask.cpu().numpy())) if hasattr(A, "mask") else cfg.views
        what = f"{n} views" if cfg.limited_angle_deg is None else f"{cfg.limited_angle_deg:g}° limited angle"
        title = f"CT {cfg.geometry} beam, {what}"
        unit, display, initial, scale = "HU", SOFT_TISSUE_HU, "fbp", 1.0
    else:
        scale = float(np.percentile(np.abs(vol.array), 99.5)) or 1.0
        title = f"MRI {cfg.acceleration:g}x {cfg.mask} mask"
        unit, display, initial = "a.u.", (0.0, scale), "zero-filled"
    y = simulate_measurement(x, A, cfg.noise, seed)
    return Problem(y, A, x, vol, unit, display, initial, title, scale)


def retrospective_operator(
    shape: tuple[int, int], modality: str, *, seed: int, views: int = 23, geometry: str = "parallel",
    angles_deg: tuple[float, ...] | None = None, limited_angle_deg: float | None = None,
    pixel_mm: float = 1.0, source_to_isocenter_mm: float = 541.0, source_to_detector_mm: float = 949.0,
    mask: str = "equispaced", acceleration: float = 4.0, center_fraction: float = 0.08,
) -> Any:
    """The operator that simulates a measurement from an image of ``shape`` (H, W).

    ``modality`` "ct" (also DICOM's "CT"): :func:`~medrecon.pipeline.geometry.ct_case_operator`
    with the geometry arguments; "mri" (also "MR"): a :class:`~medrecon.operators.MaskedFourier`
    with an ``mri_mask(mask, shape, acceleration, center_fraction, seed=seed)``.  The one place
    where the batch pipeline, the CLI and the PACS workflow choose a retrospective operator.
    """
    from medrecon.operators import MaskedFourier, mri_mask
    from medrecon.pipeline.geometry import ct_case_operator

    h, w = (int(v) for v in shape)
    kind = {"ct": "ct", "mri": "mri", "mr": "mri"}.get(str(modality).lower())
    if kind == "ct":
        if angles_deg is None and limited_angle_deg is None and views < 1:
            raise SettingsError(f"views must be >= 1, got {views}")
        return ct_case_operator(
            (h, w), kind=geometry, views=views, angles_deg=angles_deg, limited_angle_deg=limited_angle_deg,
            pixel_mm=pixel_mm, source_to_isocenter_mm=source_to_isocenter_mm,
            source_to_detector_mm=source_to_detector_mm,
        )
    if kind == "mri":
        return MaskedFourier(mri_mask(mask, (h, w), acceleration, center_fraction, seed=seed))
    raise SettingsError(f"modality {modality!r}: only CT and MR(I) images can be reconstructed")


def simulate_measurement(x: Tensor, A: Any, noise: float, seed: int) -> Tensor:  # noqa: N803
    """``A x`` plus :func:`add_noise` of relative level ``noise``, seeded."""
    with torch.no_grad():
        return add_noise(A(x), noise, torch.Generator().manual_seed(seed))


def _sinogram_problem(cfg: ReconstructConfig) -> Problem:
    from medrecon.datasets import Volume, load_sinogram
    from medrecon.datasets.simulate import MU_WATER_PER_MM, ct_operator
    from medrecon.metrics import SOFT_TISSUE_HU

    sino = load_sinogram(cfg.input)
    g = sino.geometry
    s = parse_slices(cfg.slices, sino.data.shape[0], str(cfg.input))
    data = np.asarray(sino.data[s], dtype=np.float32)
    n_det = int(g["n_detectors"])
    if cfg.image_size:
        size = int(cfg.image_size)
    elif g.get("image_size"):
        size = int(g["image_size"])
    else:  # the default parallel detector is ⌈√2·N⌉ bins of one pixel
        bin_px = float(g.get("detector_spacing_mm", 1.0)) / float(g.get("pixel_size_mm") or 1.0)
        size = int(math.floor(n_det * (bin_px if g["type"] == "parallel" else 1.0) / math.sqrt(2)))
    try:
        A = ct_operator(g, (size, size))  # noqa: N806
    except SettingsError as err:
        raise InputError(Path(cfg.input).with_suffix(".json"), str(err)) from err
    y = torch.from_numpy(data)[:, None]
    if g.get("units", "image_pixel") == "attenuation":
        pix = float(g.get("pixel_size_mm") or 1.0)
        mu = float(g.get("mu_water_per_mm") or MU_WATER_PER_MM)
        with torch.no_grad():
            ones = A(torch.ones(1, 1, size, size))
        y = (y / (pix * mu) - ones) * 1000.0  # HU · pixel line integrals
    pix = float(g.get("pixel_size_mm") or 1.0)
    template = Volume(np.zeros((data.shape[0], size, size), np.float32), np.diag([pix, pix, pix, 1.0]), "CT")
    n_views = len(g["angles_rad"])
    return Problem(y, A, None, template, "HU", SOFT_TISSUE_HU, "fbp",
                   f"CT measured sinogram, {g['type']} beam, {n_views} views")


def _kspace_problem(cfg: ReconstructConfig) -> Problem:
    from medrecon.datasets import Volume, load_bart_kspace, load_fastmri, load_fastmri_reference
    from medrecon.operators import MaskedFourier, MultiCoilMRI, estimate_coil_maps

    path = Path(cfg.input)
    is_h5 = path.suffix.lower() in (".h5", ".hdf5")
    ksp = load_fastmri(path) if is_h5 else load_bart_kspace(path)
    s = parse_slices(cfg.slices, ksp.data.shape[1], str(path))
    data = ksp.data[:, s]  # (coils, Z, H, W)
    mask = ksp.mask if ksp.mask.shape[0] == 1 else ksp.mask[s]
    y = torch.from_numpy(np.ascontiguousarray(data.transpose(1, 0, 2, 3)))  # (Z, coils, H, W)
    m = torch.from_numpy(np.ascontiguousarray(mask if mask.shape[0] > 1 else mask[0]))
    notes: dict[str, Any] = {"coils": int(data.shape[0])}
    if data.shape[0] == 1:
        A = MaskedFourier(m)  # noqa: N806
    else:
        if ksp.coil_maps is not None:
            maps = torch.from_numpy(np.ascontiguousarray(ksp.coil_maps[:, s].transpose(1, 0, 2, 3)))
            notes["coil_maps"] = "from file"
        else:
            maps = torch.stack([estimate_coil_maps(y[z], calib_width=min(24, *y.shape[-2:]))
                                for z in range(y.shape[0])])
            notes["coil_maps"] = "ESPIRiT"
        A = MultiCoilMRI(maps, m)  # noqa: N806
    with torch.no_grad():
        zf = A.adjoint(y).abs()
    scale = float(torch.quantile(zf.flatten()[:: max(1, zf.numel() // 100000)], 0.995)) or 1.0
    reference = None
    if is_h5:
        ref = load_fastmri_reference(path, slices=s)
        if ref is not None:
            reference = torch.from_numpy(ref.array)[:, None]
            notes["reference"] = "fastMRI reconstruction"
    template = Volume(np.zeros((y.shape[0], *y.shape[-2:]), np.float32), np.eye(4), "MR")
    layout = "multi-coil" if data.shape[0] > 1 else "single-coil"
    return Problem(y, A, reference, template, "a.u.", (0.0, scale), "zero-filled",
                   f"MRI measured {layout} k-space, {float(mask.mean()):.0%} sampled", scale, notes)


def build_problem(cfg: ReconstructConfig, seed: int) -> Problem:
    """The problem of one case (see the module docstring for the input kinds).

    Raises
    ------
    SettingsError
        A mode or modality that does not fit the input.
    InputError
        Unreadable input (from the readers).
    """
    if cfg.input is not None and not Path(cfg.input).exists():
        raise InputError(cfg.input, "no such file or folder")
    kind = input_kind(cfg.input)
    mode = cfg.mode
    if mode == "auto":
        mode = "retrospective" if kind == "image" else "prospective"
    if mode == "retrospective" and kind != "image":
        raise SettingsError(f"retrospective mode needs an image input; {Path(str(cfg.input)).name} is a {kind}")
    if mode == "prospective" and kind == "image":
        raise SettingsError("prospective mode needs measured data (a raw sinogram, fastMRI .h5 or BART .cfl)")
    want = {"sinogram": "ct", "kspace": "mri"}.get(kind)
    if want and cfg.modality != want:
        raise SettingsError(f"{Path(str(cfg.input)).name} is {kind} data; use --modality {want}")
    if kind == "sinogram":
        prob = _sinogram_problem(cfg)
    elif kind == "kspace":
        prob = _kspace_problem(cfg)
    else:
        return _retrospective(cfg, seed)
    if cfg.reference:
        from medrecon.datasets import load_volume

        ref = load_volume(cfg.reference).array[parse_slices(cfg.slices, prob.y.shape[0], cfg.reference)]
        prob.reference = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))[:, None]
        prob.notes["reference"] = "file"
    return prob
