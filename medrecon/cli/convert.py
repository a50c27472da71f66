"""``medrecon convert``: write the k-space of any file medrecon reads as a standard MRD file."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  medrecon convert meas_MID42_gre.dat gre.h5 --to mrd          # Siemens twix → MRD (ISMRMRD HDF5)
  medrecon convert file_brain.h5 brain.mrd --to mrd             # fastMRI → MRD
  medrecon convert ksp.cfl ksp.h5 --to mrd                      # BART → MRD
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert k-space to MRD (ISMRMRD HDF5)",
        description="Read k-space from any file medrecon reads (Siemens twix .dat, MRD, fastMRI .h5, "
        "BART .cfl, MATLAB .mat) and write it as an MRD file, as stored: noise scan, calibration "
        "lines and scanner geometry kept, nothing reconstructed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="k-space file")
    p.add_argument("output", help="MRD file to write (.h5 or .mrd)")
    p.add_argument("--to", choices=["mrd"], required=True, help="output format")
    p.add_argument(
        "--input-domain",
        choices=["kspace", "image"],
        default=None,
        help="what the input holds (as for reconstruct; default k-space, checked)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> int:
    from medrecon.datasets import load_kspace, save_mrd

    ksp = load_kspace(a.input, input_domain=a.input_domain)
    out = save_mrd(ksp, a.output, overwrite=a.overwrite)
    c, z, ny, nx = ksp.data.shape
    print(
        f"wrote {out}: {c} coils, {z} slices, {ny}×{nx} k-space, {int(ksp.mask.any(axis=(0, 2)).sum())} lines"
        + (f", {ksp.noise.shape[1]} noise samples" if ksp.noise is not None else "")
    )
    return 0
