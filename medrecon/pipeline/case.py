"""One reconstruction case: load, (simulate), reconstruct, write outputs and a JSON record.

The CLI's ``reconstruct`` command builds a :class:`ReconstructConfig` and calls
:func:`run_case`; batch pipelines call the same function per case.  Logs, file names and records
use the case ID (a hash of the input path unless given), never patient names.  The case's seed
is derived from the run seed and the case ID (:func:`case_seed`), so a case gives the same result
alone or inside a batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon.datasets._atomic import open_temp
from medrecon.errors import InputError, SettingsError

__all__ = ["ReconstructConfig", "DEFAULT_ACCELERATION", "DEFAULT_VIEWS", "acceleration_of", "views_of", "thins_raw_scan",
           "thins_measured_data", "run_case", "case_id_for", "case_seed", "output_stem", "settings_tag",
           "settings_stem", "free_stem", "OUTPUT_SUFFIXES", "unused_settings", "check_settings", "prepare_output_folder",
           "warning_text", "collect_warnings", "estimate_diffusion_time"]


@dataclass(frozen=True)
class ReconstructConfig:
    """Settings of one reconstruction case.

    Attributes
    ----------
    modality : {"ct", "mri"}
    input : str or None
        DICOM folder/file, NIfTI file or image folder (retrospective); raw sinogram ``.npy`` /
        ``.npz`` (or, with ``modality="ct"``, MATLAB ``.mat``) + ``.json``, fastMRI ``.h5``, BART
        ``.cfl`` or MATLAB ``.mat`` k-space (prospective); None = the bundled CT slice.
    out : str
        Output folder.
    mode : {"auto", "retrospective", "prospective"}
        ``auto``: retrospective for images, prospective for measured data.
    geometry : {"parallel", "fan"}
        CT beam geometry of a retrospective case (fan: equiangular detector, 2π scan).
    views : int or None
        CT: equally spaced views (parallel on [0, π), fan on [0, 2π)); None: 23 for a simulated
        case.  A measured sinogram is thinned to this many of its views (retrospectively).
    view_step : int or None
        Measured sinogram: keep every k-th view (retrospective thinning).
    angles_deg : tuple of float or None
        CT: explicit view angles in degrees (wins over ``views``).
    limited_angle_deg : float or None
        CT: measure only the views of a full set within [0, this) degrees; a measured sinogram
        keeps its views within this many degrees of its first.
    source_to_isocenter_mm, source_to_detector_mm : float
        Fan-beam distances.
    acceleration, center_fraction, mask : MRI undersampling of a retrospective case.
        ``acceleration`` None: :data:`DEFAULT_ACCELERATION` for a simulated image, no thinning
        for measured k-space; given with fully sampled measured k-space (a raw scanner file, or
        fastMRI / BART / MATLAB k-space), its lines are thinned retrospectively and the full scan
        is the reference.
    partial_fourier : {"zero-fill", "homodyne", "pocs"}
        Raw scanner files: how an asymmetric echo (or phase partial Fourier) is handled
        (:func:`medrecon.datasets.partial_fourier.fill_partial_fourier`).
    prewhiten : {"auto", "noise", "edge", "off"}
        Raw scanner files: coil noise prewhitening from the noise scan or the k-space edge
        (:func:`medrecon.datasets.raw_steps.prewhiten`).
    compress_coils : int or None
        Raw scanner files: SVD coil compression to this many virtual coils.
    method : str
        A method of :func:`medrecon.reconstruct` (classical or diffusion), or ``"auto"`` (the
        default of ``medrecon reconstruct``): the default for the operator key from the prior
        card's measured benchmark (:func:`medrecon.api.default_choice`), a diffusion method when
        ``samples`` or ``steps`` ask for one; a default diffusion run that flags itself as
        failing returns the classical estimate.
    prior : str or None
        Score prior name for diffusion methods (passed to ``reconstruct`` as ``prior``).
    samples : int or None
        Posterior samples (passed as ``n_samples``); their std is the uncertainty map.
    steps : int or None
        Sampler steps (passed as ``steps``).
    iters : int or None
        Iterations of iterative classical methods.
    noise : float
        Gaussian measurement noise of a retrospective case, fraction of the measurement's RMS.
    seed : int
        Run seed; the case's seed is ``case_seed(seed, case_id)``.
    device : str
        Torch device of the solver (``cpu``, ``cuda``, ``cuda:1``, or ``auto``).
    output_format : {"nifti", "dicom"}
    case_id : str or None
    series_uid : str or None
        The DICOM series to load from a folder holding several.
    slices : str or None
        ``"start:stop"`` or an index: reconstruct only these slices.
    downsample : int
        In-plane block averaging of a retrospective image (speed; 1 = none).
    image_size : int or None
        Prospective CT: reconstruction grid (default from the geometry).
    reference : str or None
        Prospective: reference image for metrics.
    input_domain : {None, "kspace", "image"}
        What an MRI k-space file holds (:func:`medrecon.datasets.load_kspace`): None, k-space,
        checked by the energy at its centre (coil images are refused); ``"kspace"``, k-space
        without the check; ``"image"``, coil images, turned into fully sampled k-space.
    window : (float, float) or None
        Display window ``(centre, width)`` of the figure's image panels and thumbnails, in the
        image's units (HU for CT).  None: chosen per modality from the reference (else the
        initial estimate), :func:`medrecon.report.display_window`.
    thumbnails : bool
        Also write small PNGs of the reconstruction and the uncertainty (batch reports).
    overwrite : bool
    progress : bool
        Progress bars for long methods.
    into_source_study : bool
        DICOM output of a simulated (retrospective) case: write it into the input's study.
        Default: a study of its own, so simulated results never join the patient's examination.
    """

    modality: str = "ct"
    input: str | None = None
    out: str = "medrecon-out"
    mode: str = "auto"
    geometry: str = "parallel"
    views: int | None = None
    view_step: int | None = None
    angles_deg: tuple[float, ...] | None = None
    limited_angle_deg: float | None = None
    source_to_isocenter_mm: float = 541.0
    source_to_detector_mm: float = 949.0
    acceleration: float | None = None
    center_fraction: float = 0.08
    mask: str = "equispaced"
    method: str = "tv"
    prior: str | None = None
    samples: int | None = None
    steps: int | None = None
    iters: int | None = None
    noise: float = 0.0
    seed: int = 0
    device: str = "cpu"
    output_format: str = "nifti"
    case_id: str | None = None
    series_uid: str | None = None
    slices: str | None = None
    downsample: int = 1
    image_size: int | None = None
    reference: str | None = None
    input_domain: str | None = None
    window: tuple[float, float] | None = None
    thumbnails: bool = False
    overwrite: bool = False
    progress: bool = False
    into_source_study: bool = False
    partial_fourier: str = "zero-fill"
    prewhiten: str = "auto"
    compress_coils: int | None = None


#: MRI acceleration of a simulated (retrospective) image case when none is given
DEFAULT_ACCELERATION = 4.0
#: CT views of a simulated (retrospective) image case when none are given
DEFAULT_VIEWS = 23


def acceleration_of(cfg: ReconstructConfig) -> float:
    """The case's acceleration: ``cfg.acceleration``, else :data:`DEFAULT_ACCELERATION`."""
    return float(cfg.acceleration) if cfg.acceleration is not None else DEFAULT_ACCELERATION


def views_of(cfg: ReconstructConfig) -> int:
    """The views of a simulated CT case: ``cfg.views``, else :data:`DEFAULT_VIEWS`."""
    return int(cfg.views) if cfg.views is not None else DEFAULT_VIEWS


def thins_raw_scan(cfg: ReconstructConfig) -> bool:
    """True when the case thins a measured raw scan retrospectively (``--acceleration`` on twix / MRD)."""
    from medrecon.datasets import raw_format

    return cfg.acceleration is not None and cfg.input is not None and raw_format(cfg.input) is not None


def thins_measured_data(cfg: ReconstructConfig) -> bool:
    """True when the case thins measured data retrospectively: ``--views``, ``--view-step`` or
    ``--limited-angle`` on a measured sinogram, ``--acceleration`` on measured k-space (raw
    scanner files included)."""
    from medrecon.pipeline.problems import input_kind

    kind = input_kind(cfg.input, cfg.modality)
    if kind == "sinogram":
        return any(v is not None for v in (cfg.views, cfg.view_step, cfg.limited_angle_deg))
    return kind == "kspace" and cfg.acceleration is not None

def case_id_for(path: str | None, series_uid: str | None = None) -> str:
    """A case ID that does not reveal the input's name: ``case-`` + 10 hex digits of its path hash."""
    if path is None:
        return "bundled-ct"
    key = str(Path(path).resolve()) + (f"#{series_uid}" if series_uid else "")
    return f"case-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def case_seed(run_seed: int, case_id: str) -> int:
    """Per-case seed from the run seed and the case ID (STYLE.md §8), in [0, 2³¹)."""
    digest = hashlib.sha256(f"{int(run_seed)}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def output_stem(cfg: ReconstructConfig) -> str:
    """``<case>_<method>``: the stem of every file a case writes by default (batch cases, each in a
    folder of its own)."""
    return f"{cfg.case_id or case_id_for(cfg.input, cfg.series_uid)}_{cfg.method}"


#: endings :func:`run_case` appends to a stem (image, uncertainty, figure, thumbnails, record)
OUTPUT_SUFFIXES = (".json", ".png", ".nii.gz", "_std.nii.gz", "_dicom", "_std_dicom", "_thumb.png",
                   "_std_thumb.png")


def settings_tag(cfg: ReconstructConfig) -> str:
    """The measurement settings of a case, short enough for a file name.

    ``23v`` (23 parallel views), ``fan60v``, ``la90`` (limited angle, degrees), ``6angles``
    (explicit angles), ``R4-equispaced`` (MRI), with ``-noise0.05`` when noise is added; for
    measured data ``""`` (the measurement is the file) unless it is thinned: ``60v``,
    ``step4``, ``la90-30v``, ``R8-random``.
    """
    from medrecon.pipeline.problems import input_kind

    kind = input_kind(cfg.input, cfg.modality)
    if kind != "image":
        if not thins_measured_data(cfg):
            return ""
        if kind == "kspace":
            tag = f"R{acceleration_of(cfg):g}-{cfg.mask}"
        else:
            parts = [f"la{cfg.limited_angle_deg:g}"] if cfg.limited_angle_deg is not None else []
            parts += [f"{cfg.views}v"] if cfg.views is not None else []
            parts += [f"step{cfg.view_step}"] if cfg.view_step is not None else []
            tag = "-".join(parts)
        return re.sub(r"[^A-Za-z0-9.+-]", "-", tag)
    if cfg.modality == "ct":
        if cfg.angles_deg is not None:
            tag = f"{len(cfg.angles_deg)}angles"
        elif cfg.limited_angle_deg is not None:
            tag = f"la{cfg.limited_angle_deg:g}"
        else:
            tag = f"{views_of(cfg)}v"
        tag = ("fan" if cfg.geometry == "fan" else "") + tag
    else:
        tag = f"R{acceleration_of(cfg):g}-{cfg.mask}"
    if cfg.noise > 0:
        tag += f"-noise{cfg.noise:g}"
    return re.sub(r"[^A-Za-z0-9.+-]", "-", tag)


def settings_stem(cfg: ReconstructConfig) -> str:
    """``<case>_<method>_<settings>`` (:func:`settings_tag`; measured data: ``<case>_<method>``)."""
    tag = settings_tag(cfg)
    return output_stem(cfg) + (f"_{tag}" if tag else "")


def free_stem(cfg: ReconstructConfig) -> str:
    """The stem of a ``medrecon reconstruct`` run: ``<case>_<method>_<settings>``, never an existing one.

    Outputs are named by their settings (:func:`settings_tag`), so runs with other settings
    never meet.  When files of that name are already in ``cfg.out``, the run takes the first
    free ``-2``, ``-3``, … suffix, unless ``cfg.overwrite`` asks to replace them.
    """
    base = settings_stem(cfg)
    out = Path(cfg.out)
    if cfg.overwrite or not out.is_dir():
        return base
    names = {p.name for p in out.iterdir()}
    stem, k = base, 1
    while any(stem + suffix in names for suffix in OUTPUT_SUFFIXES):
        k += 1
        stem = f"{base}-{k}"
    return stem


#: the command-line spelling of the settings that only some cases use
_OPTIONS = {"views": "--views", "view_step": "--view-step", "angles_deg": "--angles", "limited_angle_deg": "--limited-angle",
            "geometry": "--geometry", "source_to_isocenter_mm": "--source-to-isocenter-mm",
            "source_to_detector_mm": "--source-to-detector-mm", "image_size": "--image-size",
            "acceleration": "--acceleration", "center_fraction": "--center-fraction", "mask": "--mask",
            "prior": "--prior", "samples": "--samples", "steps": "--steps", "iters": "--iters",
            "noise": "--noise", "downsample": "--downsample", "reference": "--reference",
            "into_source_study": "--into-source-study", "input_domain": "--input-domain",
            "partial_fourier": "--partial-fourier", "prewhiten": "--prewhiten", "compress_coils": "--compress-coils"}


def _inapplicable(cfg: ReconstructConfig) -> dict[str, str]:
    """Every setting that does nothing for this case (whatever its value), with the reason."""
    from medrecon.api import METHODS
    from medrecon.pipeline.problems import input_kind
    from medrecon.solvers.presets import DIFFUSION_METHODS

    kind = input_kind(cfg.input, cfg.modality)
    retro = kind == "image"
    why: dict[str, str] = {}
    if cfg.method in METHODS:
        for name in ("prior", "samples", "steps"):
            why[name] = f"{cfg.method} is not a diffusion method ({', '.join(DIFFUSION_METHODS)})"
        if "iters" not in METHODS[cfg.method]:
            why["iters"] = f"{cfg.method} is not iterative"
    elif cfg.method in DIFFUSION_METHODS:
        why["iters"] = f"{cfg.method} is a diffusion method: its length is --steps"
    measured = {"sinogram": "measured sinogram: its geometry is in the file",
                "kspace": "measured k-space: its sampling is in the file"}.get(kind, "")
    if kind == "sinogram":  # views may be thinned (retrospectively); the geometry is the file's
        for name in ("angles_deg", "geometry", "source_to_isocenter_mm", "source_to_detector_mm"):
            why[name] = measured + " (--views, --view-step and --limited-angle thin its views)"
    elif kind == "kspace" or cfg.modality != "ct":
        for name in ("views", "view_step", "angles_deg", "limited_angle_deg", "geometry", "source_to_isocenter_mm",
                     "source_to_detector_mm"):
            why[name] = measured or "an MRI case"
    else:
        why["view_step"] = "--view-step thins measured sinograms; a simulated case takes --views"
        if cfg.angles_deg is not None:
            why["views"] = why["limited_angle_deg"] = "--angles gives the views"
        elif cfg.limited_angle_deg is not None:
            why["views"] = "--limited-angle chooses the views"
        if cfg.geometry != "fan":
            why["source_to_isocenter_mm"] = why["source_to_detector_mm"] = "parallel beam (fan-beam distances)"
    if cfg.views is not None and cfg.view_step is not None and "views" not in why:
        why["view_step"] = "--views chooses the views"
    from medrecon.datasets import raw_format

    raw = cfg.input is not None and kind == "kspace" and raw_format(cfg.input) is not None
    if kind == "kspace":
        if cfg.acceleration is None:
            for name in ("center_fraction", "mask"):
                why[name] = "a measured scan is thinned only with --acceleration"
    elif kind == "sinogram" or cfg.modality != "mri":
        for name in ("acceleration", "center_fraction", "mask"):
            why[name] = measured or "a CT case"
    if not retro:
        why["noise"] = f"{measured}; nothing is simulated"
        why["downsample"] = f"{measured}; it is reconstructed at its own size"
    else:
        why["reference"] = "a simulated case is compared with its input image"
    if kind != "sinogram":
        why["image_size"] = "only for measured sinograms"
    if kind != "kspace":
        why["input_domain"] = "only for MRI k-space files (.h5, .cfl, .mat), which may hold coil images"
    if not raw:
        for name in ("partial_fourier", "prewhiten", "compress_coils"):
            why[name] = "only for raw scanner files (Siemens twix .dat, MRD .mrd/.h5)"
    if not (retro and cfg.output_format == "dicom"):
        why["into_source_study"] = "only for DICOM output of simulated data"
    return why


def _option_text(name: str, value: Any) -> str:
    opt = _OPTIONS.get(name, name)
    if value is True:
        return opt
    if isinstance(value, tuple):
        return f"{opt} ({len(value)} values)"
    if isinstance(value, float):
        return f"{opt} {value:g}"
    return f"{opt} {value}"


def unused_settings(cfg: ReconstructConfig) -> dict[str, str]:
    """The settings given (other than their defaults) that do nothing for this case.

    Returns
    -------
    dict
        Field name → why it does nothing (e.g. ``"steps"`` → ``"tv is not a diffusion method
        (…)"``).  Diffusion methods are the names in
        :data:`medrecon.solvers.presets.DIFFUSION_METHODS`; classical ones those of
        :data:`medrecon.api.METHODS`.
    """
    defaults = {f.name: f.default for f in fields(ReconstructConfig)}
    return {name: reason for name, reason in _inapplicable(cfg).items()
            if name in defaults and getattr(cfg, name) != defaults[name]}


def _unused_lines(cfg: ReconstructConfig, unused: dict[str, str]) -> list[str]:
    """``"--samples 3, --steps 50: tv is not a diffusion method (…)"``, one per reason."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in unused.items():
        by_reason.setdefault(reason, []).append(_option_text(name, getattr(cfg, name)))
    return [f"{', '.join(opts)}: {reason}" for reason, opts in by_reason.items()]


def check_settings(cfg: ReconstructConfig) -> None:
    """Refuse settings that would do nothing for this case (``medrecon reconstruct``).

    Batches do not call it: a batch-wide default may fit some cases only; :func:`run_case` then
    ignores the setting with a warning and leaves it out of the record.

    Raises
    ------
    SettingsError
        One line listing each such setting and why it does nothing.
    """
    unused = unused_settings(cfg)
    if unused:
        raise SettingsError(f"settings that do nothing here: {'; '.join(_unused_lines(cfg, unused))}; "
                            "leave them out")


def prepare_output_folder(out: str | Path) -> Path:
    """Create ``out`` if needed and check that files can be written into it, before any work.

    Raises
    ------
    InputError
        ``out`` is a file, cannot be created, or is not writable (names the folder, not a
        temporary file).
    """
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise InputError(p, "is a file; --out takes a folder (created when missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(p, f"cannot create the output folder ({err.strerror or err})") from err
    try:
        fd, probe = tempfile.mkstemp(dir=p, prefix=".medrecon-write-test-")
    except OSError as err:
        raise InputError(p, f"output folder is not writable ({err.strerror or err})") from err
    os.close(fd)
    os.unlink(probe)
    return p


def warning_text(message: Warning | str, category: type[Warning] | None = None) -> str:
    """One line for a warning: its message (a category other than UserWarning's family named)."""
    text = " ".join(str(message).split())
    if category is not None and not issubclass(category, UserWarning):
        text = f"{category.__name__}: {text}"
    return text


@contextlib.contextmanager
def collect_warnings(sink: list[str]) -> Iterator[list[str]]:
    """Append every warning raised inside the block to ``sink`` (one line each, no repeats).

    Warnings still reach the current ``warnings.showwarning`` (the CLI prints one clean line);
    user warnings are shown every time they occur, so a second case of a batch records them too.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        outer = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            text = warning_text(message, category)
            if text not in sink:
                sink.append(text)
                outer(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield sink


def _write_json(path: Path, record: dict[str, Any], overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise InputError(path, "exists; pass --overwrite to replace it")
    fd, tmp = open_temp(path.parent, ".json.tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise SettingsError(f"--device: unknown torch device {name!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"--device {name}: CUDA is not available on this machine (use cpu)")
    return dev


def _method_settings(cfg: ReconstructConfig) -> dict[str, Any]:
    """Settings passed through to :func:`medrecon.reconstruct` (only those given and used)."""
    skip = _inapplicable(cfg)
    given = {"iters": cfg.iters, "prior": cfg.prior, "samples": cfg.samples, "steps": cfg.steps}
    names = {"samples": "n_samples"}
    return {names.get(k, k): v for k, v in given.items() if v is not None and k not in skip}


def estimate_diffusion_time(model: Any, A: Any, y: torch.Tensor, method: str, *,  # noqa: N803
                            n_samples: int, steps: int | None) -> dict[str, Any]:
    """Expected network evaluations of a diffusion run, and the run's time measured on this machine.

    One evaluation of the prior on the run's batch is timed (twice for a long run, keeping the
    faster, as the first includes one-time set-up) and multiplied by the evaluations the
    method's settings imply (preset, the card's tuned values for this operator, ``steps``): the
    sampler's steps from t₀ (a CCDF/DDS-style start) or from t = 1, the Langevin corrector
    steps, the final Tweedie step (not in DDS, whose last step lands on t = 0), DPS's backward
    pass (timed as twice a forward one), and one chain per sample for volume methods.  The
    classical work is estimated from one timed application of its system matrix (``AᴴA`` plus,
    for TV, ``DᴴD`` over the run's batch) times the applications it runs: the TV or 3-D TV
    start (100 ADMM iterations of 5 CG steps), and per step the CG or ADMM consistency solves of
    DDS, DDS-3D and mbir3d.

    Returns
    -------
    dict
        ``nfe``, ``batch``, ``seconds_per_evaluation``, ``network_seconds``, ``solver_seconds``
        (the classical start and the consistency solves), ``seconds`` (their sum) and
        ``initial_estimate`` (the classical method a CCDF-style start runs first, or None).
    """
    from medrecon.operators.diff import FiniteDifference
    from medrecon.solvers.presets import (PRESETS, VOLUME_METHODS, chunk_for_budget, evaluations_per_chain,
                                          settings_defaults, start_kind, tuned_defaults)
    from medrecon.solvers.sampler import ScoreCounter

    s = {**settings_defaults(), **PRESETS[method], **tuned_defaults(getattr(model, "card", None), A, method)}
    if steps is not None:
        s["steps"] = steps
    start = start_kind(method, s["start"])
    with torch.no_grad():
        like = A.adjoint(y[:1])
    chains = n_samples if method in VOLUME_METHODS else 1
    nfe = chains * evaluations_per_chain(model.sde, method, s, like.real.dtype)
    grid = model.sde.timesteps(int(s["steps"]), dtype=like.real.dtype)
    run = len(grid) if start == "noise" else int((grid <= float(s["t0"]) + 1e-9).sum())  # steps run
    cost = 3.0 if method == "dps" else 1.0  # DPS: forward and backward pass through the network
    if not A.in_complex and like.is_complex():
        like = like.real
    batch = y.shape[0] * (1 if method in VOLUME_METHODS else n_samples)
    x = torch.zeros((batch, *like.shape[1:]), dtype=like.dtype, device=y.device)
    chunk = chunk_for_budget(s["max_memory"], x) if s.get("max_memory") else None
    counter = ScoreCounter(model, chunk=chunk)
    t = torch.full((batch,), 0.5, device=y.device)

    def timed(f) -> float:
        t0 = time.perf_counter()
        f()
        if y.device.type == "cuda":
            torch.cuda.synchronize(y.device)
        return time.perf_counter() - t0

    def evaluate() -> None:
        counter.nfe = 0
        counter(x, t)

    per_eval = timed(evaluate) / max(1, counter.nfe)  # includes one-time set-up: an upper bound
    nfe *= max(1, counter.nfe)  # a complex image is two evaluations
    if nfe * per_eval * cost >= 10:  # a long run: measure again without the set-up
        per_eval = min(per_eval, timed(evaluate) / max(1, counter.nfe))
    per_eval *= cost

    # the classical work, in applications of the system matrix to one sample's images
    init = s["init"] if start == "ccdf" else None
    tv_axes = ("z", "y", "x") if init == "tv3d" or method in VOLUME_METHODS else ("y", "x")
    D = FiniteDifference(tuple(like.shape[-2:]), tv_axes)  # noqa: N806
    with torch.no_grad():
        one = x[: y.shape[0]]
        t_normal = timed(lambda: A.normal(one))
        t_tv = t_normal + timed(lambda: D.adjoint(D(one)))
    solves = 0.0
    if init in ("tv", "tv3d"):
        solves += 100 * 6 * t_tv  # 100 ADMM iterations, 5 CG steps (+ the residual) each
    per_sample_step = {"dds": (int(s["dc_iters"]) + 1) * t_normal,
                       "dds3d": int(s["admm_iters"]) * (int(s["admm_cg_iters"]) + 1) * t_tv,
                       "mbir3d": (int(s["admm_cg_iters"]) + 1) * t_tv}.get(method, 0.0)
    solves += n_samples * run * per_sample_step
    network = nfe * per_eval
    return {"nfe": int(nfe), "batch": int(batch), "seconds_per_evaluation": round(per_eval, 4),
            "network_seconds": round(network, 1), "solver_seconds": round(solves, 1),
            "seconds": round(network + solves, 1), "initial_estimate": init}


def _estimate_line(method: str, est: dict[str, Any], device: Any) -> str:
    """The time estimate as one line: the total, the network evaluations, and the classical
    work (initial estimate, consistency solves) where it is measured to take a second or more."""
    init = est.get("initial_estimate")
    line = (f"{method}: about {_duration(est['seconds'])} on {device}: {est['nfe']} network evaluations on "
            f"{est['batch']} image(s), {est['seconds_per_evaluation']:.2f} s each")
    solver = est.get("solver_seconds", 0.0)
    if solver >= 1:
        work = f"its {init} initial estimate and the consistency solves" if init else "the consistency solves"
        return line + f" ({_duration(est.get('network_seconds', 0.0))}), and {work} ({_duration(solver)})"
    return line + (f", after its {init} initial estimate" if init else "")


def _hide_paths(text: str, paths: set[str], case: str) -> str:
    """``text`` with the input and reference paths replaced by ``<input of CASE>``."""
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, f"<input of {case}>")
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _validate(cfg: ReconstructConfig) -> None:
    from medrecon.datasets import INPUT_DOMAINS
    from medrecon.datasets.partial_fourier import PARTIAL_FOURIER_METHODS

    choices = {"modality": ("ct", "mri"), "output_format": ("nifti", "dicom"),
               "mode": ("auto", "retrospective", "prospective"), "geometry": ("parallel", "fan"),
               "input_domain": INPUT_DOMAINS, "partial_fourier": PARTIAL_FOURIER_METHODS,
               "prewhiten": ("auto", "noise", "edge", "off")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(str(v) for v in allowed)}; "
                                f"got {getattr(cfg, name)!r}")
    if cfg.acceleration is not None and not cfg.acceleration >= 1:
        raise SettingsError(f"acceleration must be ≥ 1; got {cfg.acceleration:g}")
    for name in ("samples", "steps", "iters", "compress_coils"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise SettingsError(f"{name} must be ≥ 1; got {v}")
    if cfg.window is not None:
        if len(cfg.window) != 2 or not all(math.isfinite(float(v)) for v in cfg.window):
            raise SettingsError(f"--window: expected CENTRE,WIDTH (two numbers); got {cfg.window!r}")
        if float(cfg.window[1]) <= 0:
            raise SettingsError(f"--window: the window width must be > 0; got {cfg.window[1]:g}")


def _real(t: torch.Tensor) -> torch.Tensor:
    return t.abs() if t.is_complex() else t


def _metrics(prob, mean: torch.Tensor, initial: torch.Tensor, std: torch.Tensor | None, modality: str) -> dict[str, float]:
    from medrecon.metrics import SOFT_TISSUE_HU, calibration, psnr, ssim, window

    ref = prob.reference
    if ref is None:
        return {}
    if tuple(ref.shape[-2:]) != tuple(mean.shape[-2:]):  # e.g. fastMRI's cropped reference
        h, w = ref.shape[-2:]
        top, left = (mean.shape[-2] - h) // 2, (mean.shape[-1] - w) // 2
        if top < 0 or left < 0:
            return {}
        mean, initial = (t[..., top : top + h, left : left + w] for t in (mean, initial))
        std = None if std is None else std[..., top : top + h, left : left + w]
    if modality == "ct":
        low, width = -1024.0, 4096.0
        m = {  # PSNR over the HU window's width; SSIM on the window mapped to [0, 1]
            "psnr": psnr(mean, ref, data_range=width),
            "ssim": ssim(((mean - low) / width).clamp(0, 1), ((ref - low) / width).clamp(0, 1), data_range=1.0),
            "psnr_soft_tissue": psnr(window(mean, *SOFT_TISSUE_HU), window(ref, *SOFT_TISSUE_HU), data_range=1.0),
            "ssim_soft_tissue": ssim(window(mean, *SOFT_TISSUE_HU), window(ref, *SOFT_TISSUE_HU), data_range=1.0),
            "psnr_initial": psnr(initial, ref, data_range=width),
        }
    else:  # magnitudes over the 99.5th percentile of the reference (or zero-filled) image
        s = prob.scale
        m = {"psnr": psnr(mean, ref, data_range=s), "ssim": ssim(mean / s, ref / s, data_range=1.0),
             "psnr_initial": psnr(initial, ref, data_range=s)}
    if std is not None:
        m.update(calibration(mean, std, ref))
    return m


def _uncertainty_summary(std: torch.Tensor, info: dict[str, Any], unit: str) -> dict[str, Any]:
    """What the uncertainty map says in numbers: the posterior std's median and 99th percentile
    over the pixels where it is not negligible (the background of a CT slice has none), and
    how it was calibrated (the card's factor, or why none was applied)."""
    s = std.double().flatten()
    top = float(s.max()) if s.numel() else 0.0
    body = s[s > 0.01 * top] if top > 0 else s
    return {
        "unit": unit,
        "samples": int(info.get("n_samples", 0)),
        "median": round(float(body.median()), 4) if body.numel() else 0.0,
        "p99": round(float(body.quantile(0.99)) if body.numel() > 1 else top, 4),
        "std_scale": info.get("std_scale"),
        "calibration": info.get("std_calibration"),
    }


def uncertainty_meaning(info: dict[str, Any], domain: Any = None) -> str:
    """What the uncertainty map of a run means, in one line: calibrated (the card's factor for
    this setting was applied, and the input is inside the prior's domain), or the spread of the
    posterior samples, which is not an error estimate, and why."""
    how = str(info.get("std_calibration") or "")
    scale = info.get("std_scale")
    calibrated = bool(how) and not how.startswith(("none", "not applied", "off", "one sample"))
    if calibrated and (domain is None or domain.in_domain):
        return (f"calibrated: scaled ×{scale:g} so that ±2σ held the error's share measured on held-out images "
                f"for this setting ({how})")
    why = "the input is outside the prior's training domain" if calibrated else f"no calibration applies ({how})"
    return f"the map shows the spread of the posterior samples, not the error: {why}"


def _domain_report(cfg: ReconstructConfig, prob: Any, mean: torch.Tensor, method: str, prior: Any) -> Any:
    """:func:`medrecon.priors.domain.check_domain` of a diffusion run's result against its
    prior's card (None for classical results: no prior shaped them)."""
    from medrecon.api import prior_card
    from medrecon.pipeline.problems import input_kind
    from medrecon.priors.domain import check_domain
    from medrecon.solvers.presets import DIFFUSION_METHODS

    if method not in DIFFUSION_METHODS:
        return None
    card = getattr(prior, "card", None)
    if not isinstance(card, dict):  # not loaded here: read the card of the prior the run used
        card = prior_card(cfg.prior, prob.A)[0]
    if not isinstance(card, dict):
        return None
    tpl = prob.template
    spacing = None
    if input_kind(cfg.input, cfg.modality) == "image":  # images carry their pixel size; raw data may not
        cols = np.linalg.norm(np.asarray(tpl.affine, dtype=np.float64)[:3, :2], axis=0)
        spacing = (float(cols[0]), float(cols[1]))
    return check_domain(card, _real(mean)[:, 0].numpy(), modality=getattr(tpl, "modality", None) or cfg.modality,
                        dicom=(tpl.meta or {}).get("dicom"), spacing_mm=spacing)


def run_case(cfg: ReconstructConfig, *, stem: str | Callable[[ReconstructConfig], str] | None = None,
             notify: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one case and return its JSON record (also written to ``<out>/<stem>.json``).

    Writes ``<stem>.nii.gz`` (or a ``_dicom`` series folder), the uncertainty map
    ``<stem>_std.nii.gz`` when the method returns one, the figure ``.png`` and the record
    ``.json``; every file is written atomically.  The output folder is checked for writing
    before any work.  Settings that do nothing for this case (:func:`unused_settings`) are
    ignored with a warning and left out of the record's ``config``; every warning raised
    meanwhile (geometry the outputs cannot hold, ignored settings) and the method's own
    ``info["warnings"]`` are in the record's ``warnings``.

    Parameters
    ----------
    cfg : ReconstructConfig
    stem : str or callable, optional
        File stem of the outputs, or a function of the config (with ``"auto"`` resolved) that
        gives it; default :func:`output_stem` (``<case>_<method>``).  ``medrecon reconstruct``
        passes :func:`free_stem`.
    notify : callable, optional
        Called with one-line progress notes (the time estimate of a diffusion run, measured
        before it starts, :func:`estimate_diffusion_time`); None: no estimate is made.

    Raises
    ------
    MedreconError
        Bad input files (:class:`InputError`) or settings (:class:`SettingsError`).
    """
    found: list[str] = []
    created = _missing_folders(Path(cfg.out))
    try:
        with collect_warnings(found):
            return _run_case(cfg, stem or output_stem, notify, found)
    except BaseException:
        _remove_empty(created)  # a failed case leaves no empty output folder behind
        raise


def _missing_folders(path: Path) -> list[Path]:
    """The folders of ``path`` (itself and its parents) that do not exist yet, deepest first."""
    missing, p = [], path.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove these folders, deepest first, as long as they are empty (never a file)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            return


def resolve_method(cfg: ReconstructConfig, A: Any) -> tuple[ReconstructConfig, dict[str, Any] | None]:  # noqa: N803
    """``cfg`` with ``method="auto"`` replaced by the default for the operator ``A``, and the
    choice (method, reason, whether measured, the classical settings), or None for a named method.

    The default is :func:`medrecon.api.default_choice`'s (the prior card's benchmark for the
    operator key); ``samples`` or ``steps`` given ask for posterior sampling, so they make it
    :data:`medrecon.api.BEST_DIFFUSION` where the key's default is classical.
    """
    from medrecon.api import BEST_DIFFUSION, default_choice
    from medrecon.solvers.presets import DIFFUSION_METHODS

    if cfg.method != "auto":
        return cfg, None
    choice = default_choice(A, cfg.prior)
    method, reason = choice.method, choice.reason
    asked = [_OPTIONS[k] for k in ("samples", "steps") if getattr(cfg, k) is not None]
    if asked and method not in DIFFUSION_METHODS:
        method = BEST_DIFFUSION
        reason += f"; {' and '.join(asked)} ask for posterior sampling, so {method} runs"
    return replace(cfg, method=method), {"method": method, "reason": reason, "measured": choice.measured,
                                         "settings": choice.settings if method == choice.method else {}}


def _run_case(cfg: ReconstructConfig, stem_for: str | Callable[[ReconstructConfig], str],
              notify: Callable[[str], None] | None, found: list[str]) -> dict[str, Any]:
    from medrecon.api import reconstruct
    from medrecon.operators.ct import CTProjector
    from medrecon.pipeline.outputs import write_image_outputs
    from medrecon.pipeline.problems import build_problem
    from medrecon.report import case_figure, display_window, orient_for_display, thumbnail
    from medrecon.solvers.presets import DIFFUSION_METHODS, VOLUME_METHODS

    _validate(cfg)
    device = _device(cfg.device)
    case = cfg.case_id or case_id_for(cfg.input, cfg.series_uid)
    seed = case_seed(cfg.seed, case)
    out = prepare_output_folder(cfg.out)
    auto = cfg.method == "auto"
    if not auto:
        stem = stem_for if isinstance(stem_for, str) else stem_for(cfg)
        if (out / f"{stem}.json").exists() and not cfg.overwrite:  # fail before the work, not after it
            raise InputError(out / f"{stem}.json", "exists; pass --overwrite to replace it")
    prob = build_problem(cfg, seed)
    cfg, choice = resolve_method(cfg, prob.A)
    if auto:
        stem = stem_for if isinstance(stem_for, str) else stem_for(cfg)
        if (out / f"{stem}.json").exists() and not cfg.overwrite:
            raise InputError(out / f"{stem}.json", "exists; pass --overwrite to replace it")
        if notify is not None:
            notify(f"method: {choice['reason']}")
    record_path = out / f"{stem}.json"
    ignored = unused_settings(cfg)
    for text in _unused_lines(cfg, ignored):
        warnings.warn(f"ignored {text}", UserWarning, stacklevel=2)
    if notify is not None and prob.notes.get("raw"):  # what a raw scanner file held, and what was done to it
        notify(f"found {prob.notes['raw']}")
        for step in prob.notes.get("raw_steps", []):
            notify(f"  {step}")
        if prob.notes.get("header_mismatch"):
            notify(f"  header: {prob.notes['header_mismatch']}")
    y = prob.y.to(device)
    settings = _method_settings(cfg)
    if choice is not None:  # the measured weight of a classical default, and the fallback of a diffusion one
        settings = {**choice["settings"], **settings}
        if cfg.method in DIFFUSION_METHODS:
            settings["fallback"] = True
    estimate = None
    if notify is not None and cfg.method in DIFFUSION_METHODS:
        from medrecon.priors import ScorePrior

        name = cfg.prior or ("ct-256" if isinstance(prob.A, CTProjector) else "mri-256")
        settings["prior"] = ScorePrior.load(name, device=device)  # loaded once: timed, then used
        try:
            estimate = estimate_diffusion_time(settings["prior"], prob.A, y, cfg.method,
                                               n_samples=cfg.samples or 4, steps=cfg.steps)
        except Exception as err:  # noqa: BLE001 - an estimate never stops a run
            estimate = {"error": warning_text(f"{type(err).__name__}: {err}")}
        if "seconds" in estimate and (estimate["seconds"] >= 10 or cfg.method in VOLUME_METHODS):
            notify(_estimate_line(cfg.method, estimate, device))  # a volume is always worth a line
    rec = reconstruct(y, prob.A, method=cfg.method, seed=seed, progress=cfg.progress, **settings)
    if choice is not None:
        rec.info["default"] = {k: v for k, v in choice.items() if k != "settings"}
    method_run = rec.info.get("method", cfg.method)  # the classical estimate when a default run fell back
    mean = _real(rec.mean).detach().cpu()
    std = None if rec.std is None else rec.std.detach().cpu()
    initial = _real(reconstruct(y, prob.A, method=prob.initial_method).mean).detach().cpu()

    domain = _domain_report(cfg, prob, mean, method_run, settings.get("prior"))
    cautions = [f"outside the prior's training domain: {w}" for w in domain.warnings] if domain else []
    for text in cautions:
        warnings.warn(text, UserWarning, stacklevel=2)
    meaning = None if std is None else uncertainty_meaning(rec.info, domain)
    std_cautions = [meaning] if meaning and not meaning.startswith("calibrated") else []
    files, output_notes = write_image_outputs(  # labels, study and modality: pipeline/outputs.py
        replace(cfg, method=method_run), prob, mean[:, 0].numpy(), None if std is None else std[:, 0].numpy(),
        out, stem, cautions=cautions, std_cautions=std_cautions)
    metrics = _metrics(prob, mean, initial, std, cfg.modality)

    z = mean.shape[0]
    mid = z // 2
    ref = prob.reference if prob.reference is not None and prob.reference.shape[0] == z else None
    panels = []
    if ref is not None:
        panels.append(("reference", ref[mid, 0].numpy(), prob.unit))
    panels += [(f"initial estimate ({prob.initial_method})", initial[mid, 0].numpy(), prob.unit),
               (f"reconstruction ({method_run})", mean[mid, 0].numpy(), prob.unit)]
    if std is not None:
        panels.append(("uncertainty (posterior std)" if not std_cautions else
                       "uncertainty: sampling spread, not error", std[mid, 0].numpy(), prob.unit))
    if ref is not None:
        h, w = ref.shape[-2:]  # a fastMRI reference is the centre crop
        top, left = (mean.shape[-2] - h) // 2, (mean.shape[-1] - w) // 2
        if top >= 0 and left >= 0:
            err = (mean[mid, 0, top : top + h, left : left + w] - ref[mid, 0]).abs()
            panels.append(("|error| vs reference", err.numpy(), prob.unit))
    if cfg.window is not None:
        centre, width = (float(v) for v in cfg.window)
        display, how = (centre - width / 2, centre + width / 2), "--window"
    else:  # per modality, from the intensities of the reference (else the initial estimate)
        display, how = display_window((prob.reference if prob.reference is not None else initial).numpy(),
                                      cfg.modality)
    title = f"{case}: {prob.title}"
    if z > 1 or prob.first_slice:
        title += f"; slice {mid + 1} of {z}" + (f" (input slice index {prob.first_slice + mid})"
                                              if prob.first_slice else "")
    fig = case_figure(out / f"{stem}.png", panels, display=display, title=title, affine=prob.display_affine,
                      caption="\n".join([*cautions, *std_cautions]))
    files.append(fig)
    if cfg.thumbnails:
        files.append(thumbnail(out / f"{stem}_thumb.png",
                               orient_for_display(mean[mid, 0].numpy(), prob.display_affine)[0], display))
        if std is not None:
            files.append(thumbnail(out / f"{stem}_std_thumb.png",
                                   orient_for_display(std[mid, 0].numpy(), prob.display_affine)[0], None))
    skip = _inapplicable(cfg)
    for text in rec.info.get("warnings", []) or []:  # the method's own (a failing run, a setting out of range)
        line = warning_text(text)
        if line not in found:
            found.append(line)
    paths = {p for v in (cfg.input, cfg.reference) if v for p in (str(Path(v).resolve()), str(v))}
    hidden = [_hide_paths(text, paths, case) for text in found]  # folder names can hold patient names
    record = {
        "case_id": case,
        "seed": seed,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("input", "reference", "out") and k not in skip},
        "ignored_settings": {_OPTIONS.get(k, k): getattr(cfg, k) for k in ignored},
        "stem": stem,
        "input_kind": "bundled" if cfg.input is None else "file",
        "problem": prob.title,
        "notes": prob.notes,
        "shape": list(mean.shape[:1]) + list(mean.shape[2:]),
        "figure_slice": {"index_in_input": prob.first_slice + mid, "of_reconstructed": z},
        "display_window": {"center": round(0.5 * (display[0] + display[1]), 4),
                           "width": round(display[1] - display[0], 4), "how": how},
        "device": str(device),
        "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "info": rec.info,
        **output_notes,
        "warnings": hidden,
        "outputs": [str(p) for p in files],
    }
    if std is not None:
        record["uncertainty"] = {**_uncertainty_summary(std, rec.info, prob.unit), "meaning": meaning}
    if domain is not None:
        record["domain"] = domain.as_record()
    if estimate is not None:
        record["time_estimate"] = estimate
    _write_json(record_path, record, cfg.overwrite)
    return record
