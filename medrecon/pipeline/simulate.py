"""``medrecon simulate``: load an image, simulate a CT sinogram or MRI k-space, save both.

The library calls are :func:`medrecon.datasets.simulate.simulate_ct`, ``simulate_mri`` and
``save_simulation``; the CT geometry comes from :func:`medrecon.pipeline.geometry.ct_geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["SimulateConfig", "run_simulation"]


@dataclass(frozen=True)
class SimulateConfig:
    """Settings of ``medrecon simulate`` (see ``medrecon simulate --help``)."""

    modality: str
    input: str  # "bundled" = the bundled 256² head CT slice (medrecon/data)
    out_dir: str
    name: str = "sim"
    seed: int = 0
    overwrite: bool = False
    formats: tuple[str, ...] = ("native",)
    views: int = 180
    geometry: str = "parallel"
    source_to_isocenter_mm: float = 541.0
    source_to_detector_mm: float = 949.0
    noise: str = "none"
    sigma: float = 0.0
    I0: float = 1e5  # noqa: N815 - the physics name
    mask: str = "equispaced"
    acceleration: float = 4.0
    center_fraction: float = 0.08
    coils: int = 1
    phase_rad: float = 0.0
    noise_std: float = 0.0


def run_simulation(cfg: SimulateConfig) -> list[Path]:
    """Simulate and save; returns the written files."""
    from medrecon.datasets import load_volume
    from medrecon.datasets.simulate import bundled_ct_slice, save_simulation, simulate_ct, simulate_mri
    from medrecon.pipeline.geometry import ct_geometry

    vol = load_volume(str(bundled_ct_slice()) if cfg.input == "bundled" else cfg.input)
    if cfg.modality == "ct":
        geom = ct_geometry(vol.shape[1:], vol.spacing_mm[2], cfg.views, kind=cfg.geometry,
                           source_to_isocenter_mm=cfg.source_to_isocenter_mm,
                           source_to_detector_mm=cfg.source_to_detector_mm)
        meas = simulate_ct(vol, geom, noise=cfg.noise, sigma=cfg.sigma, I0=cfg.I0, seed=cfg.seed)
    else:
        meas = simulate_mri(vol, cfg.mask, acceleration=cfg.acceleration, center_fraction=cfg.center_fraction,
                            n_coils=cfg.coils, phase_rad=cfg.phase_rad, noise_std=cfg.noise_std, seed=cfg.seed)
    return save_simulation(cfg.out_dir, cfg.name, meas, vol, formats=cfg.formats, overwrite=cfg.overwrite)
