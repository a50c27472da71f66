"""``medrecon simulate``: simulate CT sinograms or MRI k-space from an image."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

EXAMPLES = """examples:
  medrecon simulate ct bundled sims --views 60 --noise gaussian --sigma 0.5
  medrecon simulate ct SERIES_DIR sims --geometry fan --views 360 --noise poisson --I0 1e4
  medrecon simulate mri brain.nii.gz sims --coils 8 --acceleration 4 --formats native,bart
"""


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("modality", choices=["ct", "mri"])
    p.add_argument("input", help="DICOM folder/file, NIfTI or image folder; 'bundled' = the bundled 256² head CT slice")
    p.add_argument("out_dir")
    p.add_argument("--name", default="sim", help="file stem of the outputs (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--formats", default="native", help="comma list: native, bart, dicom")
    p.add_argument("--views", type=int, default=180, help="CT: equally spaced views")
    p.add_argument("--geometry", choices=["parallel", "fan"], default="parallel")
    p.add_argument("--source-to-isocenter-mm", type=float, default=541.0)
    p.add_argument("--source-to-detector-mm", type=float, default=949.0)
    p.add_argument("--noise", choices=["none", "gaussian", "poisson"], default="none")
    p.add_argument("--sigma", type=float, default=0.0, help="CT Gaussian noise, sinogram units (HU·pixel)")
    p.add_argument("--I0", type=float, default=1e5, help="CT Poisson noise: incident photons per ray")
    p.add_argument("--mask", default="equispaced")
    p.add_argument("--acceleration", type=float, default=4.0)
    p.add_argument("--center-fraction", type=float, default=0.08)
    p.add_argument("--coils", type=int, default=1)
    p.add_argument("--phase-rad", type=float, default=0.0)
    p.add_argument("--noise-std", type=float, default=0.0, help="MRI complex noise per real/imaginary part")
    p.set_defaults(run=run)
    return p


def add_parser(sub) -> None:
    _configure(sub.add_parser("simulate", help="simulate CT sinograms or MRI k-space from an image",
                              description="Simulate CT sinograms or MRI k-space; writes the measurement "
                              "and the ground truth.", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter))


def run(a: argparse.Namespace) -> int:
    from medrecon.pipeline.simulate import SimulateConfig, run_simulation

    cfg = SimulateConfig(
        modality=a.modality, input=a.input, out_dir=a.out_dir, name=a.name, seed=a.seed, overwrite=a.overwrite,
        formats=tuple(f.strip() for f in a.formats.split(",") if f.strip()), views=a.views, geometry=a.geometry,
        source_to_isocenter_mm=a.source_to_isocenter_mm, source_to_detector_mm=a.source_to_detector_mm,
        noise=a.noise, sigma=a.sigma, I0=a.I0, mask=a.mask, acceleration=a.acceleration,
        center_fraction=a.center_fraction, coils=a.coils, phase_rad=a.phase_rad, noise_std=a.noise_std,
    )
    for f in run_simulation(cfg):
        print(f)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``medrecon simulate`` on its own."""
    a = _configure(argparse.ArgumentParser(prog="medrecon simulate")).parse_args(argv)
    return run(a)
