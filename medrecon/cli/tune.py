"""``medrecon tune``: diffusion settings for one prior and one measurement setting."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  medrecon tune --prior ct-256 --input val_ct.nii.gz --modality ct --views 23 --method ccdf \\
      --slices 0:6 --budget 24 --steps 100 --json tune-ct23.json --store
  medrecon tune --prior mri-256 --input val_mr.nii.gz --modality mri --acceleration 8 --method song
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune", help="tune diffusion settings for a prior and a measurement setting",
        description="Search a diffusion method's settings (λ, snr, ζ, t₀, steps) by successive halving "
        "on validation images, objective PSNR; the current defaults are always a candidate. --store "
        "writes the winner to the prior's model card (per operator and method).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prior", required=True, help="registry name or path of NAME.json")
    p.add_argument("--input", required=True, help="validation images (NIfTI, DICOM series, image folder)")
    p.add_argument("--modality", choices=["ct", "mri"], default="ct")
    p.add_argument("--method", default="ccdf", help="diffusion method (default %(default)s)")
    p.add_argument("--geometry", choices=["parallel", "fan"], default="parallel")
    p.add_argument("--views", type=int, default=23)
    p.add_argument("--limited-angle", type=float, metavar="DEG")
    p.add_argument("--acceleration", type=float, default=4.0)
    p.add_argument("--center-fraction", type=float, default=0.08)
    p.add_argument("--mask", default="equispaced")
    p.add_argument("--slices", help="START:STOP of the validation slices")
    p.add_argument("--downsample", type=int, default=1)
    p.add_argument("--budget", type=int, default=24, help="reconstructions to spend (default %(default)s)")
    p.add_argument("--samples", type=int, default=1, help="posterior samples per reconstruction")
    p.add_argument("--steps", type=int, help="hold the step count fixed")
    p.add_argument("--noise", type=float, default=0.0, help="measurement noise, fraction of its RMS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", action="store_true", help="write the winner to the prior's card")
    p.add_argument("--json", dest="out", help="write the full result (all trials) here")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> int:
    from medrecon.pipeline.tune import TuneConfig, run_tune

    cfg = TuneConfig(
        prior=a.prior, input=a.input, modality=a.modality, method=a.method, geometry=a.geometry, views=a.views,
        limited_angle_deg=a.limited_angle, acceleration=a.acceleration, center_fraction=a.center_fraction,
        mask=a.mask, slices=a.slices, downsample=a.downsample, budget=a.budget, samples=a.samples,
        steps=a.steps, noise=a.noise, seed=a.seed, store=a.store, out=a.out,
    )
    res = run_tune(cfg, log=lambda s: print(s, file=sys.stderr) if sys.stderr.isatty() else None)
    print(f"{res['method']} on {res['operator_key']}: best PSNR {res['best_psnr']:.2f} dB "
          f"(defaults {res['defaults_psnr']:.2f} dB) with {res['best']}")
    if res.get("stored_in"):
        print(f"  stored in {res['stored_in']}")
    return 0
