"""``medrecon evaluate``: metrics of a reconstruction against a reference image."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="PSNR / SSIM (and uncertainty calibration) against a reference",
        description="Compare a reconstruction with a reference image of the same shape (NIfTI, DICOM "
        "series, ...). CT metrics on (HU + 1024) / 4096 and in the soft-tissue window.",
        epilog="example:\n  medrecon evaluate out/case_tv.nii.gz --reference truth.nii.gz --modality ct",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("reconstruction")
    p.add_argument("--reference", required=True)
    p.add_argument("--modality", choices=["ct", "mri"], default="ct")
    p.add_argument("--std", help="uncertainty map (posterior std) of the reconstruction")
    p.add_argument("--json", dest="out", help="also write the metrics to this JSON file")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> int:
    from medrecon.pipeline.evaluate import EvaluateConfig, evaluate_files

    res = evaluate_files(EvaluateConfig(a.reconstruction, a.reference, a.modality, a.std, a.out))
    print(json.dumps(res["metrics"]))
    return 0
