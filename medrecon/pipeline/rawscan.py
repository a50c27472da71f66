"""The reconstruction problem of a raw scanner file (Siemens twix, MRD).

:func:`raw_problem` takes what :func:`medrecon.datasets.load_kspace` read and

1. runs the raw-data steps (:func:`medrecon.datasets.prepare_raw`: prewhitening, readout
   oversampling, partial Fourier, coil compression) with the case's settings;
2. with ``--acceleration`` on a fully sampled scan, thins it retrospectively
   (:func:`medrecon.datasets.thin_measured_kspace`); the coil-combined image of the full scan
   is then the reference;
3. estimates ESPIRiT coil maps from the calibration region (the fully sampled centre, with the
   file's reference lines filled in: :func:`medrecon.datasets.raw_steps.calibration_kspace`) and
   builds the SENSE operator on the measured mask (one coil: the masked Fourier operator);
4. takes the image geometry from the scanner header
   (:func:`medrecon.datasets.readouts.image_affine`) for the NIfTI / DICOM outputs.

``Problem.notes["raw"]`` holds the one-line summary (scanner, sequence, matrix, coils, R, noise
scan) and the steps, which the CLI prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import warnings

import numpy as np
import torch

from medrecon.errors import InputError

if TYPE_CHECKING:
    from medrecon.datasets.types import KSpace
    from medrecon.pipeline.case import ReconstructConfig
    from medrecon.pipeline.problems import Problem

__all__ = ["raw_problem", "MIN_CALIBRATION"]

#: the smallest calibration square ESPIRiT is run on
MIN_CALIBRATION = 8


def _maps(ksp: KSpace, where: str) -> tuple[torch.Tensor, int]:
    """ESPIRiT maps per slice (Z, coils, H, W) from the calibration region, and its width."""
    from medrecon.datasets.raw_steps import calibration_kspace, calibration_width
    from medrecon.operators import estimate_coil_maps

    width = calibration_width(ksp)
    if width < MIN_CALIBRATION:
        raise InputError(
            where,
            f"the fully sampled k-space centre (calibration region) is {width} samples wide; "
            f"ESPIRiT coil maps need at least {MIN_CALIBRATION}",
        )
    calib = calibration_kspace(ksp)
    maps = [
        estimate_coil_maps(np.ascontiguousarray(calib[:, z]), calib_width=width)
        for z in range(calib.shape[1])
    ]
    return torch.stack(maps), width


#: share of the object (pixels where the root-sum-of-squares of the zero-filled coil images
#: exceeds 10 % of its maximum) that the coil maps must cover before a warning
MIN_COVERAGE = 0.9


def map_coverage(maps: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the object that the coil maps cover: pixels with ``Σ|S|² ≥ 0.5`` among those
    where the RSS of the zero-filled coil images exceeds 10 % of its maximum (all slices)."""
    from medrecon.operators import MaskedFourier

    z, c, h, w = y.shape
    with torch.no_grad():
        coil = MaskedFourier(mask).adjoint(y.reshape(z * c, 1, h, w)).abs().reshape(z, c, h, w)
    rss = coil.pow(2).sum(1).sqrt()
    obj = rss > 0.1 * rss.amax(dim=(-2, -1), keepdim=True)
    covered = maps.abs().pow(2).sum(1) >= 0.5
    return float((obj & covered).sum()) / max(1, int(obj.sum()))


def raw_problem(cfg: ReconstructConfig, ksp: KSpace, seed: int) -> Problem:
    """The problem of one raw-scanner case (module docstring).

    Raises
    ------
    InputError
        A calibration region too small for ESPIRiT.
    SettingsError
        ``--acceleration`` on a scan that is not fully sampled; homodyne / POCS on an
        undersampled scan.
    """
    from medrecon.datasets import Volume, prepare_raw, thin_measured_kspace
    from medrecon.datasets.readouts import image_affine, raw_summary
    from medrecon.operators import MaskedFourier, MultiCoilMRI
    from medrecon.pipeline.case import acceleration_of, thins_raw_scan
    from medrecon.pipeline.problems import Problem, parse_slices

    where = str(cfg.input)
    found = raw_summary(ksp.header["raw"], ksp)
    ready = prepare_raw(
        ksp,
        prewhitening=cfg.prewhiten,
        partial_fourier=cfg.partial_fourier,
        coils=cfg.compress_coils,
    )
    s = parse_slices(cfg.slices, ready.data.shape[1], where)
    first = range(ready.data.shape[1])[s][0]
    full = ready
    if ready.data.shape[1] != len(range(ready.data.shape[1])[s]):
        from dataclasses import replace

        full = replace(
            ready,
            data=ready.data[:, s],
            mask=ready.mask if ready.mask.shape[0] == 1 else ready.mask[s],
            calibration=None if ready.calibration is None else ready.calibration[:, s],
        )
    raw = full.header["raw"]
    thin = thins_raw_scan(cfg)
    measured = (
        thin_measured_kspace(full, acceleration_of(cfg), cfg.mask, cfg.center_fraction, seed)
        if thin
        else full
    )
    coils = measured.n_coils
    y = torch.from_numpy(
        np.ascontiguousarray(measured.data.transpose(1, 0, 2, 3))
    )  # (Z, coils, H, W)
    mask = measured.mask
    m = torch.from_numpy(np.ascontiguousarray(mask if mask.shape[0] > 1 else mask[0]))
    notes: dict[str, Any] = {
        "coils": coils,
        "raw": found,
        "raw_steps": [f"{st['step']}: {st['note']}" for st in full.header.get("raw_steps", [])],
    }
    if raw.get("header_mismatch"):
        notes["header_mismatch"] = raw["header_mismatch"]
    if coils == 1:
        A = MaskedFourier(m)  # noqa: N806
    else:
        maps, width = _maps(measured, where)
        A = MultiCoilMRI(maps, m)  # noqa: N806
        notes["coil_maps"] = f"ESPIRiT from the {width}×{width} calibration region"
        cover = map_coverage(maps, y, m)
        notes["coil_map_coverage"] = round(cover, 3)
        if cover < MIN_COVERAGE:
            warnings.warn(
                f"{where}: the ESPIRiT coil maps from the {width}×{width} calibration region cover only "
                f"{100 * cover:.0f} % of the object (the coil images' support): the reconstruction is cut to "
                "them; give more calibration lines (a larger --center-fraction when thinning)",
                UserWarning, stacklevel=2,
            )
    reference = None
    if thin:
        full_y = torch.from_numpy(np.ascontiguousarray(full.data.transpose(1, 0, 2, 3)))
        full_m = torch.from_numpy(
            np.ascontiguousarray(full.mask if full.mask.shape[0] > 1 else full.mask[0])
        )
        A_full = MaskedFourier(full_m) if coils == 1 else MultiCoilMRI(A.maps, full_m)  # noqa: N806
        with torch.no_grad():
            reference = A_full.adjoint(full_y).abs().float()
        notes["reference"] = (
            "the full scan, coil-combined with the same maps (retrospective on measured data)"
        )
        notes["thinning"] = measured.header["thinning"]
    with torch.no_grad():
        zf = A.adjoint(y).abs()
    scale_src = reference if reference is not None else zf
    scale = (
        float(
            torch.quantile(
                scale_src.flatten()[:: max(1, scale_src.numel() // 100000)].float(), 0.995
            )
        )
        or 1.0
    )
    z, h, w = y.shape[0], y.shape[-2], y.shape[-1]
    affine = image_affine(raw, (z, h, w))
    if affine is None:
        notes["geometry"] = "none in the header: identity affine (1 mm pixels)"
        affine = np.eye(4)
    else:
        notes["geometry"] = "from the scanner header (slice position and orientation, recon FOV)"
    meta = {
        "source": where,
        "raw": {
            k: raw.get(k)
            for k in (
                "format",
                "vendor",
                "model",
                "field_T",
                "sequence",
                "protocol",
                "patient_position",
            )
        },
    }
    template = Volume(np.zeros((z, h, w), np.float32), affine, "MR", meta)
    r_meas = h / max(1, int(np.any(np.broadcast_to(mask, (z, h, w)), axis=2).any(axis=0).sum()))
    what = (
        f"R={acceleration_of(cfg):g} {cfg.mask} (retrospective on measured data)"
        if thin
        else f"R≈{r_meas:.2g} as measured"
    )
    title = (
        f"MRI raw {raw.get('format')} {raw.get('sequence') or ''}, {coils} coils, {what}".replace(
            "  ", " "
        )
    )
    return Problem(
        y,
        A,
        reference,
        template,
        "a.u.",
        "zero-filled",
        title,
        scale,
        notes,
        first_slice=first,
        display_affine=None if notes["geometry"].startswith("none") else affine,
    )
