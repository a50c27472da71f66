"""``medrecon reconstruct``: one case, retrospective (simulated) or prospective (measured data)."""

from __future__ import annotations

import argparse

from medrecon.cli.options import add_recon_options, recon_settings, show_progress

EXAMPLES = """examples:
  medrecon reconstruct --modality ct --views 23                      # bundled CT slice, 23 views
  medrecon reconstruct --modality ct --input SERIES_DIR --views 60 --method tv --out results
  medrecon reconstruct --modality ct --limited-angle 90 --method tv
  medrecon reconstruct --modality ct --geometry fan --views 60 --method fbp
  medrecon reconstruct --modality ct --input scan.npy --method tv      # measured sinogram + scan.json
  medrecon reconstruct --modality ct --input scan.mat --method tv      # MATLAB sinogram + scan.json geometry
  medrecon reconstruct --modality ct --input scan.npy --views 60 --method tv   # measured data thinned to 60 views
  medrecon reconstruct --modality ct --input scan.npy --limited-angle 90 --method fbp
  medrecon reconstruct --modality mri --input full.h5 --acceleration 8 --mask random   # fully sampled, undersampled
  medrecon reconstruct --modality mri --input coils.mat --input-domain image --method cg   # coil images
  medrecon reconstruct --modality mri --input brain.nii.gz --acceleration 8 --mask random
  medrecon reconstruct --modality mri --input file.h5 --method cg      # fastMRI k-space (prospective)
  medrecon reconstruct --modality mri --input ksp.cfl --method l1-wavelet --format dicom
  medrecon reconstruct --modality mri --input meas.dat --method cg    # Siemens twix raw data (prospective)
  medrecon reconstruct --modality mri --input scan.mrd --method l1-wavelet --format dicom   # MRD raw data
  medrecon reconstruct --modality mri --input meas.dat --acceleration 4 --method cg   # thinned: full scan = reference
  medrecon reconstruct --modality ct --method song --prior ct-256 --samples 4 --steps 100

outputs (in --out), NAME = CASE_METHOD_SETTINGS (e.g. bundled-ct_tv_23v): NAME.nii.gz (or _dicom/),
NAME_std.nii.gz (uncertainty, diffusion methods), NAME.png (figure) and NAME.json (settings,
metrics, timings, warnings).  A name already in --out gets the next free suffix (NAME-2, ...);
--overwrite replaces it instead.  Options that do nothing for the case are refused (exit 2).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "reconstruct", help="reconstruct one case (simulated or measured data)",
        description="Reconstruct CT or MRI from incomplete measurements. Images (DICOM, NIfTI, image "
        "folders) are retrospective: the measurement is simulated from them. Raw sinograms (.npy or, "
        "with --modality ct, .mat + .json geometry), fastMRI .h5, BART .cfl, MATLAB .mat k-space and raw "
        "scanner files (Siemens twix .dat, MRD .mrd/.h5: prewhitened, readout oversampling removed, ESPIRiT maps "
        "from the calibration lines) are prospective: measured data, reconstructed as is (k-space is checked: coil images are refused "
        "unless --input-domain image). "
        "Without --input, runs on the bundled real CT slice.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--modality", choices=["ct", "mri"], required=True)
    p.add_argument("--input", help="DICOM folder/file, NIfTI, image folder, sinogram .npy (or .mat with --modality "
                   "ct) + .json, fastMRI .h5, BART .cfl or MATLAB .mat k-space, Siemens twix .dat or MRD .mrd/.h5 raw data "
                   "(default: bundled CT slice)")
    p.add_argument("--out", default="medrecon-out", help="output folder (default: %(default)s)")
    add_recon_options(p)
    p.set_defaults(run=run, default_method=True)


def run(a: argparse.Namespace) -> int:
    import sys
    import warnings
    from dataclasses import replace

    from medrecon.cli.options import WarningPrinter
    from medrecon.pipeline.case import ReconstructConfig, check_settings, free_stem, run_case, settings_stem

    cfg = ReconstructConfig(modality=a.modality, input=a.input, out=a.out, progress=show_progress(),
                            **recon_settings(a))
    check_settings(cfg)  # refuse options that would do nothing (exit 2, one line)

    def note(text: str) -> None:
        print(f"medrecon reconstruct: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        printer = WarningPrinter("reconstruct")
        warnings.showwarning = printer
        rec = run_case(cfg, stem=free_stem, notify=note)
        for text in rec["info"].get("warnings", []) or []:  # the method's own (may not be Python warnings)
            printer.line(text)
    base = settings_stem(replace(cfg, method=rec["config"]["method"]))
    if rec["stem"] != base:  # said once the outputs exist, not before a run that may fail
        note(f"{cfg.out} already held outputs named {base}; this run wrote {rec['stem']}.* "
             "(--overwrite replaces them instead)")
    m = rec["metrics"]
    line = f"{rec['case_id']}: {rec['info'].get('method')} on {rec['problem']}, {rec['info'].get('wall_time_s', 0):.1f} s"
    if "psnr" in m:
        line += f"; PSNR {m['psnr']:.2f} dB (initial {m['psnr_initial']:.2f} dB), SSIM {m['ssim']:.3f}"
    print(line)
    u = rec.get("uncertainty")
    if u:
        cal = f"calibrated ×{u['std_scale']:g}: {u['calibration']}" if u.get("std_scale") not in (None, 1.0) \
            else f"not calibrated ({u.get('calibration')})"
        text = (f"  uncertainty: posterior std of {u['samples']} samples, median {u['median']:.3g} {u['unit']}, "
                f"99th percentile {u['p99']:.3g} {u['unit']} ({cal})")
        if "coverage_2sigma" in m:
            text += f"; ±2σ holds {100 * m['coverage_2sigma']:.1f} % of the error vs the reference"
        print(text)
    for f in rec["outputs"]:
        print(f"  wrote {f}")
    return 0
