"""Reconstruction options shared by ``medrecon reconstruct`` and ``medrecon batch``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["add_recon_options", "recon_settings", "show_progress", "WarningPrinter"]


def _angles(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated degrees, got {text!r}") from err


def _window(text: str) -> tuple[float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected CENTRE,WIDTH (two numbers, e.g. 40,400), got {text!r}")
    return values  # type: ignore[return-value]


def add_recon_options(p: argparse.ArgumentParser, *, batch: bool = False) -> None:
    """Add the acquisition, method and output options (for a batch: the per-case defaults)."""
    g = p.add_argument_group("measurement (CT)")
    g.add_argument("--views", type=int, default=None,
                   help="equally spaced views (simulated data, default 23); a measured sinogram keeps this many of "
                        "its views (retrospective thinning; the full data's FBP is the reference)")
    g.add_argument("--view-step", type=int, default=None, metavar="K",
                   help="measured sinogram: keep every K-th view (retrospective thinning)")
    g.add_argument("--angles", type=_angles, dest="angles_deg", metavar="DEG,DEG,...",
                   help="explicit view angles in degrees (instead of --views)")
    g.add_argument("--limited-angle", type=float, metavar="DEG",
                   help="measure only views in [0, DEG); a measured sinogram keeps its views within DEG of the first")
    g.add_argument("--geometry", choices=["parallel", "fan"], default="parallel",
                   help="beam geometry of a simulated measurement (fan: equiangular, 2π scan)")
    g.add_argument("--source-to-isocenter-mm", type=float, default=541.0, help="fan beam (default %(default)s)")
    g.add_argument("--source-to-detector-mm", type=float, default=949.0, help="fan beam (default %(default)s)")
    g.add_argument("--image-size", type=int, help="measured sinogram: reconstruction grid N×N")
    g = p.add_argument_group("measurement (MRI)")
    g.add_argument("--acceleration", type=float, default=None,
                   help="undersampling factor of a simulated image (default 4); with fully sampled measured k-space "
                        "(twix .dat, MRD, fastMRI .h5, BART, MATLAB): thin it retrospectively, the full scan becoming "
                        "the reference")
    g.add_argument("--center-fraction", type=float, default=0.08, help="fully sampled centre (default %(default)s)")
    g.add_argument("--mask", default="equispaced", help="random | equispaced | gaussian1d | poisson")
    g = p.add_argument_group("raw scanner files (Siemens twix .dat, MRD .mrd/.h5)")
    g.add_argument("--partial-fourier", choices=["zero-fill", "homodyne", "pocs"], default="zero-fill",
                   help="asymmetric echo / partial Fourier (default %(default)s)")
    g.add_argument("--prewhiten", choices=["auto", "noise", "edge", "off"], default="auto",
                   help="coil noise prewhitening: from the noise scan, else the k-space edge (default %(default)s)")
    g.add_argument("--compress-coils", type=int, metavar="N", help="SVD coil compression to N virtual coils")
    g = p.add_argument_group("method")
    g.add_argument("--method", default=None,
                   help="fbp | zero-filled | cg | tv | l1-wavelet, or a diffusion method: dds, ccdf, song, dps, "
                        "score-mri, dds3d, mbir3d (default: " + ("tv" if batch else
                        "per measurement setting, from the prior card's benchmark: dds where it beat the best classical "
                        "method there, that method otherwise and where the setting is unmeasured; --samples or "
                        "--steps ask for dds") + ")")
    g.add_argument("--prior", help="score prior for diffusion methods (see: medrecon priors list)")
    g.add_argument("--samples", type=int, help="posterior samples (diffusion methods; gives the uncertainty map)")
    g.add_argument("--steps", type=int, help="sampler steps (diffusion methods)")
    g.add_argument("--iters", type=int, help="iterations of iterative classical methods")
    g.add_argument("--noise", type=float, default=0.0, help="simulated noise, fraction of the measurement RMS")
    g.add_argument("--seed", type=int, default=0, help="run seed; each case's seed derives from it and its ID")
    g.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N or auto")
    g = p.add_argument_group("input and output")
    g.add_argument("--mode", choices=["auto", "retrospective", "prospective"], default="auto",
                   help="retrospective: simulate from an image; prospective: measured data (default: by input)")
    g.add_argument("--slices", help="only these slices: START:STOP or an index")
    g.add_argument("--downsample", type=int, default=1, help="in-plane block averaging of the input image")
    g.add_argument("--input-domain", choices=["kspace", "image"], default=None,
                   help="what an MRI k-space file holds: image = coil images, turned into k-space; kspace = k-space, "
                        "not checked (default: k-space, checked by the energy at its centre; coil images refused)")
    g.add_argument("--format", choices=["nifti", "dicom"], default="nifti", dest="output_format")
    g.add_argument("--window", type=_window, metavar="C,W",
                   help="display window of the figure: centre and width in the image's units (CT: HU), e.g. "
                        "40,400 (default: per modality from the image's intensities)")
    g.add_argument("--into-source-study", action="store_true",
                   help="DICOM of a simulated (retrospective) run: put it into the input's study "
                        "(default: a study of its own, labelled SIMULATED)")
    if not batch:
        g.add_argument("--series-uid", help="the DICOM series to use when the folder holds several")
        g.add_argument("--reference", help="measured data: reference image for metrics")
        g.add_argument("--case-id", help="ID used in file names and records (default: a hash of the input path)")
        g.add_argument("--overwrite", action="store_true",
                       help="replace outputs of the same name (default: the next free name, NAME-2, ...)")


_FIELDS = ("views", "view_step", "angles_deg", "limited_angle", "geometry", "source_to_isocenter_mm", "source_to_detector_mm",
           "image_size", "acceleration", "center_fraction", "mask", "method", "prior", "samples", "steps",
           "iters", "noise", "seed", "device", "mode", "slices", "downsample", "output_format",
           "series_uid", "reference", "case_id", "overwrite", "into_source_study", "window", "input_domain",
           "partial_fourier", "prewhiten", "compress_coils")


def recon_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The ReconstructConfig keyword arguments the parsed options give."""
    out = {k: getattr(a, k) for k in _FIELDS if hasattr(a, k)}
    out["limited_angle_deg"] = out.pop("limited_angle")
    if out.get("method") is None:  # reconstruct: the default for the operator key ("auto"); batch: tv
        out.pop("method", None)
        if getattr(a, "default_method", False):
            out["method"] = "auto"
    return out


def show_progress() -> bool:
    """Progress bars when stderr is a terminal.

    A terminal that reports its size as 0 × 0 (a pseudo-terminal opened without a window size:
    ``docker exec -t``, some IDE and remote shells) made tqdm hide every bar, since bar 0 is not
    above screen row 0.  tqdm reads its ``TQDM_NROWS`` / ``TQDM_NCOLS`` defaults when it is
    imported, which has happened by now; this command then gives tqdm's defaults 24 rows and
    80 columns for this process (and the environment of its child processes).
    """
    if not sys.stderr.isatty():
        return False
    try:
        cols, rows = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        cols = rows = 0
    fallback = {k: v for k, v, size in (("nrows", 24, rows), ("ncols", 80, cols)) if size < 1}
    if fallback:
        import tqdm.std

        init = vars(tqdm.std.tqdm).get("__init__")
        keywords = getattr(init, "keywords", None)  # tqdm's env defaults: functools.partialmethod
        for key, value in fallback.items():
            os.environ.setdefault(f"TQDM_{key.upper()}", str(value))
            if isinstance(keywords, dict):
                keywords.setdefault(key, value)
    return True


class WarningPrinter:
    """A ``warnings.showwarning`` that prints ``medrecon COMMAND: warning: TEXT``, one line, no source.

    Each text is printed once; :attr:`printed` holds them, so that a command can print the
    warnings of a result (``record["warnings"]``) that were not shown while it ran.
    """

    def __init__(self, command: str | None):
        self.command = command
        self.printed: list[str] = []

    def line(self, text: str) -> None:
        """Print ``text`` as one warning line, unless it was printed already."""
        text = " ".join(str(text).split())
        if text not in self.printed:
            self.printed.append(text)
            print(f"medrecon {self.command}: warning: {text}", file=sys.stderr)

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        from medrecon.pipeline.case import warning_text

        self.line(warning_text(message, category))
