"""The ``medrecon`` command: parses arguments, builds a config, calls one library function.

Exit codes: 0 success, 2 bad input or usage (one line naming the file and problem), 3 a batch
finished with failed cases.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from medrecon.errors import MedreconError

EXAMPLES = """examples:
  medrecon reconstruct --modality ct --views 23            # bundled CT slice, 23-view CT
  medrecon reconstruct --modality ct --input SERIES_DIR --views 60 --method tv --out results
  medrecon reconstruct --modality mri --input brain.nii.gz --acceleration 8 --mask random
  medrecon simulate ct bundled sims --views 60 --noise gaussian --sigma 0.5
  medrecon priors list
"""


def _reconstruct_parser(sub) -> None:
    p = sub.add_parser(
        "reconstruct", help="reconstruct an image from simulated incomplete measurements",
        description="Simulate sparse-view CT or undersampled MRI from an image and reconstruct it "
        "(retrospective mode). Without --input, runs on the bundled real CT slice.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--modality", choices=["ct", "mri"], required=True)
    p.add_argument("--input", help="DICOM folder/file, NIfTI file or image folder (default: bundled CT slice)")
    p.add_argument("--out", default="medrecon-out", help="output folder (default: %(default)s)")
    p.add_argument("--views", type=int, default=23, help="CT: equally spaced parallel-beam views (default 23)")
    p.add_argument("--limited-angle", type=float, metavar="DEG", help="CT: measured angular range in degrees")
    p.add_argument("--acceleration", type=float, default=4.0, help="MRI: undersampling factor")
    p.add_argument("--center-fraction", type=float, default=0.08, help="MRI: fully sampled centre fraction")
    p.add_argument("--mask", default="equispaced", help="MRI: random | equispaced | gaussian1d | poisson")
    p.add_argument("--method", default="tv", help="fbp | zero-filled | cg | tv | l1-wavelet (default tv)")
    p.add_argument("--iters", type=int, help="iterations of iterative methods")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise, fraction of the measurement RMS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["nifti", "dicom"], default="nifti", dest="output_format")
    p.add_argument("--case-id", help="ID used in file names and records (default: a hash of the input path)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _run_reconstruct(a: argparse.Namespace) -> int:
    from medrecon.pipeline.case import ReconstructConfig, run_case

    cfg = ReconstructConfig(
        modality=a.modality, input=a.input, out=a.out, views=a.views, limited_angle_deg=a.limited_angle,
        acceleration=a.acceleration, center_fraction=a.center_fraction, mask=a.mask, method=a.method,
        iters=a.iters, noise=a.noise, seed=a.seed, output_format=a.output_format, case_id=a.case_id,
        overwrite=a.overwrite,
    )
    rec = run_case(cfg)
    m = rec["metrics"]
    print(f"{rec['case_id']}: {cfg.method} PSNR {m['psnr']:.2f} dB (initial {m['psnr_initial']:.2f} dB), "
          f"SSIM {m['ssim']:.3f}, {rec['info']['wall_time_s']:.1f} s")
    for f in rec["outputs"]:
        print(f"  wrote {f}")
    return 0


def _run_info(_: argparse.Namespace) -> int:
    import platform

    import torch

    import medrecon

    print(f"medrecon {medrecon.__version__}, Python {platform.python_version()}, torch {torch.__version__}")
    print(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() else 'cpu'}, "
          f"threads {torch.get_num_threads()}")
    try:
        import torch_radon  # noqa: F401

        print("torch-radon: available")
    except ImportError:
        print("torch-radon: not installed (CUDA-only, optional)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medrecon`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="medrecon", description="Reconstruct CT and MRI images from incomplete measurements.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _reconstruct_parser(sub)
    sub.add_parser("simulate", help="simulate CT sinograms or MRI k-space (see medrecon simulate -h)", add_help=False)
    sub.add_parser("priors", help="list or show the shipped score priors", add_help=False)
    sub.add_parser("train", help="train a score prior", add_help=False)
    sub.add_parser("info", help="versions, device and optional backends")
    if argv and argv[0] in ("simulate", "priors", "train"):
        return _delegate(argv[0], argv[1:])
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    try:
        return {"reconstruct": _run_reconstruct, "info": _run_info}[a.command](a)
    except MedreconError as err:
        print(f"medrecon {a.command}: error: {err}", file=sys.stderr)
        return 2


def _delegate(command: str, rest: list[str]) -> int:
    try:
        if command == "simulate":
            from medrecon.datasets.simulate import main as run
        elif command == "priors":
            from medrecon.priors.cli import priors_main as run
        else:
            from medrecon.priors.cli import train_main as run
        return int(run(rest) or 0)
    except MedreconError as err:
        print(f"medrecon {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
