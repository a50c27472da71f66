"""Turn a case's input into a reconstruction problem: measurement ``y``, operator ``A``, reference.

* Retrospective: an image (DICOM, NIfTI, image folder) is the reference; the measurement is
  simulated from it with the case's CT geometry or MRI mask.
* Prospective: measured data is reconstructed as it is: a raw sinogram (``.npy``/``.npz`` +
  ``.json`` geometry, or a MATLAB ``.mat`` + ``.json`` with ``modality="ct"``; operator from
  :func:`medrecon.datasets.simulate.ct_operator`), fastMRI HDF5, BART or MATLAB k-space (single
  coil → :class:`~medrecon.operators.MaskedFourier`; several coils →
  :class:`~medrecon.operators.MultiCoilMRI` with the file's maps, or ESPIRiT maps from
  :func:`~medrecon.operators.estimate_coil_maps`).  k-space is checked for being k-space (coil
  images are refused unless ``input_domain="image"`` converts them; :func:`medrecon.datasets.load_kspace`).
  A fastMRI reference reconstruction, or a ``reference`` image, is used for metrics when present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from medrecon.datasets import KSPACE_SUFFIXES  # the k-space readers' one list of endings
from medrecon.datasets.images import IMAGE_SUFFIXES
from medrecon.errors import InputError, SettingsError

if TYPE_CHECKING:
    from medrecon.datasets.types import Volume
    from medrecon.pipeline.case import ReconstructConfig

__all__ = ["Problem", "input_kind", "build_problem", "parse_slices", "retrospective_operator", "simulate_measurement",
           "add_noise", "supported_formats", "describe_path", "load_image_input", "available_memory_bytes",
           "check_projector_memory"]

SINOGRAM_SUFFIXES = (".npy", ".npz")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: format names of the k-space endings (an ending missing here is listed by itself)
_KSPACE_FORMATS = {".h5": "fastMRI or MRD", ".hdf5": "fastMRI or MRD", ".cfl": "BART", ".hdr": "BART",
                   ".mat": "MATLAB", ".dat": "Siemens twix", ".mrd": "MRD"}
#: what some common endings are, for error messages
_FILE_KINDS = {".dat": "a Siemens twix .dat file", ".mrd": "an MRD file", ".mat": "a MATLAB .mat file", ".h5": "an HDF5 file", ".hdf5": "an HDF5 file",
               ".cfl": "a BART .cfl array", ".hdr": "a BART .hdr header", ".npy": "a NumPy array (.npy)",
               ".npz": "a NumPy archive (.npz)", ".json": "a JSON file", ".txt": "a text file",
               ".csv": "a CSV file", ".zip": "a zip archive", ".gz": "a gzip file", ".pdf": "a PDF file",
               ".dcm": "a .dcm file", ".raw": "a raw binary file", ".mha": "a MetaImage file (.mha)",
               ".mhd": "a MetaImage header (.mhd)", ".nrrd": "an NRRD file"}


def supported_formats(role: str = "input") -> str:
    """The formats medrecon reads, as one line for error messages (built from the readers' lists).

    Parameters
    ----------
    role : {"input", "image"}
        ``"input"``: everything ``--input`` takes; ``"image"``: images only (``--reference``,
        ``medrecon evaluate``).
    """
    images = (f"DICOM file or folder, NIfTI ({', '.join(NIFTI_SUFFIXES)}), "
              f"folder of images ({', '.join(IMAGE_SUFFIXES)})")
    if role == "image":
        return images
    kspace: dict[str, list[str]] = {}
    for suffix in KSPACE_SUFFIXES:
        kspace.setdefault(_KSPACE_FORMATS.get(suffix, suffix), []).append(suffix)
    ksp = ", ".join(f"{name} {'/'.join(sfx)}" if name not in sfx else name for name, sfx in kspace.items())
    sinograms = f"{'/'.join(SINOGRAM_SUFFIXES)} + .json, or MATLAB .mat + .json with --modality ct"
    return f"{images}; raw sinogram ({sinograms}); k-space ({ksp})"


def describe_path(path: str | Path) -> str:
    """What a file or folder looks like, for error messages (endings and counts; no file names)."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
        if not files:
            return "an empty folder"
        endings = sorted({"".join(f.suffixes[-2:]).lower() or "(no ending)" for f in files})
        shown = ", ".join(endings[:6]) + (", …" if len(endings) > 6 else "")
        return f"a folder of {len(files)} file{'s' if len(files) != 1 else ''} ({shown})"
    suffix = p.suffix.lower()
    if suffix in _FILE_KINDS:
        return _FILE_KINDS[suffix]
    return f"a '{suffix}' file" if suffix else "a file without a name ending"


@dataclass
class Problem:
    """A measurement with its operator and, when known, the reference image (Z, 1, H, W)."""

    y: Tensor
    A: Any  # noqa: N815 - the operator's maths name
    reference: Tensor | None
    template: Volume  # affine, modality and meta for the written outputs
    unit: str
    initial_method: str
    title: str
    scale: float = 1.0  # MRI magnitude scale for metrics
    notes: dict[str, Any] = field(default_factory=dict)
    first_slice: int = 0  # index in the input of the problem's first slice
    display_affine: np.ndarray | None = None  # RAS+ affine for figure orientation (None: as stored)


def input_kind(path: str | None, modality: str | None = None) -> str:
    """``"image"``, ``"sinogram"`` or ``"kspace"`` from the input's name (bundled sample: image).

    A MATLAB ``.mat`` file is a sinogram with ``modality="ct"`` (its geometry in the ``.json``
    beside it) and k-space otherwise; a ``.json`` beside an ``.npy``, ``.npz`` or ``.mat`` is a
    sinogram's geometry.
    """
    if path is None:
        return "image"
    name = Path(path).name.lower()
    if name.endswith(".mat"):
        return "sinogram" if str(modality).lower() == "ct" else "kspace"
    if name.endswith(KSPACE_SUFFIXES):
        return "kspace"
    if name.endswith(SINOGRAM_SUFFIXES) or (
        name.endswith(".json") and any(Path(path).with_suffix(s).exists() for s in (*SINOGRAM_SUFFIXES, ".mat"))
    ):
        return "sinogram"
    return "image"


def parse_slices(text: str | None, n: int, where: str) -> slice:
    """``"a:b"`` or ``"k"`` → a slice within ``n`` slices (``None`` = all)."""
    if not text:
        return slice(None)
    try:
        parts = [int(p) if p.strip() else None for p in str(text).split(":")]
    except ValueError as err:
        raise SettingsError(f"{where}: slices must be 'start:stop' or an index; got {text!r}") from err
    s = slice(parts[0], parts[0] + 1) if len(parts) == 1 else slice(*parts[:3])
    if not range(n)[s]:
        raise SettingsError(f"{where}: slices {text!r} select nothing of {n} slices")
    return s


def _subset(vol: Volume, cfg: ReconstructConfig) -> Volume:
    """Select slices and block-average in-plane by ``cfg.downsample``; every slice keeps its
    exact position (:func:`medrecon.datasets.subset_volume`)."""
    from medrecon.datasets import subset_volume

    return subset_volume(vol, parse_slices(cfg.slices, vol.shape[0], "input"), cfg.downsample)


def add_noise(y: Tensor, fraction: float, gen: torch.Generator) -> Tensor:
    """Gaussian measurement noise of std ``fraction`` × the measurement's RMS (complex: per part /√2)."""
    if fraction <= 0:
        return y
    rms = y.abs().pow(2).mean().sqrt()
    noise = torch.randn(y.shape, generator=gen, dtype=y.real.dtype)
    if y.is_complex():
        noise = torch.complex(noise, torch.randn(y.shape, generator=gen, dtype=y.real.dtype)) / math.sqrt(2)
    return y + fraction * rms * noise


def load_image_input(path: str, role: str = "--input", **kwargs: Any) -> Volume:
    """:func:`medrecon.datasets.load_volume`, with errors that say what ``path`` is and what is read.

    Parameters
    ----------
    path : str
        DICOM file or folder, NIfTI file or image folder.
    role : str
        The option the path came from (``--input``, ``--reference``), for the messages.
    **kwargs
        Passed to ``load_volume`` (e.g. ``series_uid``).

    Raises
    ------
    InputError
        Measured data where an image is needed, an empty folder, a folder with neither a DICOM
        series nor images, or a file of no format medrecon reads (each names the supported ones).
    """
    from medrecon.datasets import load_volume

    p = Path(path)
    kind = input_kind(str(p))
    if kind != "image":
        what = {"kspace": "k-space", "sinogram": "a sinogram"}.get(kind, kind)
        raise InputError(p, f"{describe_path(p)} is read as measured data ({what}), not as an image; {role} takes an image: "
                            f"{supported_formats('image')}")
    try:
        return load_volume(str(p), **kwargs)
    except InputError as err:
        formats = supported_formats("input" if role == "--input" else "image")
        if p.is_dir() and err.path == p and "no image files" in err.problem:
            raise InputError(p, f"{describe_path(p)}: no DICOM series, NIfTI or images in it; {role} takes: "
                                f"{formats}") from err
        if p.is_file() and err.path == p and "not a DICOM file" in err.problem:
            raise InputError(p, f"{describe_path(p)}, not a format medrecon reads (no DICOM header either); "
                                f"{role} takes: {formats}") from err
        raise


def available_memory_bytes() -> int | None:
    """Memory this process can still allocate: ``MemAvailable``, capped by a cgroup limit.

    Returns None where neither is known (not Linux).
    """
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = Path(limit_file).read_text().strip()
            if limit_text == "max":
                continue
            room = int(limit_text) - int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if int(limit_text) < 2**60:  # cgroup v1 writes a huge number for "no limit"
            avail = room if avail is None else min(avail, room)
    return None if avail is None else max(0, avail)


def check_projector_memory(A: Any, what: str, slices: int = 1) -> None:  # noqa: N803
    """Fit a CT projector to the memory there is, before anything big is built; refuse it if it
    cannot fit.

    ``A`` is a CT projector (its matrices are built on first use, so creating it is cheap); other
    operators pass.  Where its sparse matrices
    (:func:`medrecon.operators.ct.projector_memory_bytes` for the measured views plus, for a
    subset, the full angle set) would take more than half the available memory, its
    ``matrix_budget`` is lowered so that it runs matrix-free.  It is refused only when even the
    matrix-free path (:func:`medrecon.operators.ct.matrix_free_memory_bytes`) would not fit.

    Parameters
    ----------
    what : str
        The setting that chose the geometry, e.g. ``"--views 100000"``, for the message.
    slices : int
        Images reconstructed together.

    Raises
    ------
    SettingsError
        The estimate exceeds the available memory.
    """
    from medrecon.operators.ct import CTProjector, matrix_free_memory_bytes, projector_memory_bytes

    if not isinstance(A, CTProjector):
        return
    views = len(A.angles) + (0 if bool(np.all(A.view_mask)) else len(A.full_angles))
    h, w = A.image_shape
    avail = available_memory_bytes()
    if avail is not None and not A.matrix_free and projector_memory_bytes((h, w), views, A.n_bins) > avail // 2:
        A.matrix_budget = 0 if A.backend != "sparse" else A.matrix_budget
    if A.matrix_free:
        need = matrix_free_memory_bytes((h, w), len(A.full_angles), A.n_bins, slices)
        how = "to run matrix-free"
    else:
        need = projector_memory_bytes((h, w), views, A.n_bins)
        how = "for its sparse matrices"
    geometry = f"a {len(A.angles)}-view CT projector on a {h}×{w} grid ({A.n_bins} detector bins)"
    if avail is not None and need > avail:
        raise SettingsError(f"{what}: {geometry} needs about {_bytes(need)} of memory {how}; {_bytes(avail)} "
                            "is available; use fewer views or a smaller image (--downsample, --image-size)")


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _ct_what(cfg: ReconstructConfig) -> str:
    """The option that chose a retrospective CT geometry, for messages."""
    if cfg.angles_deg is not None:
        return f"--angles ({len(cfg.angles_deg)} views)"
    if cfg.limited_angle_deg is not None:
        return f"--limited-angle {cfg.limited_angle_deg:g}"
    from medrecon.pipeline.case import views_of

    return f"--views {views_of(cfg)}"


def _check_modality(vol: Volume, cfg: ReconstructConfig) -> None:
    """Refuse CT simulation from an MR image; warn when a CT input does not look like HU."""
    import warnings

    if cfg.modality == "ct" and vol.modality == "MR":
        raise SettingsError("--modality ct: the input is an MR image (DICOM Modality MR); a CT simulation needs "
                            "HU values: use --modality mri")
    if cfg.modality == "ct" and vol.modality != "CT" and vol.array.size and float(np.min(vol.array)) > -500.0:
        warnings.warn(f"--modality ct: the input's values span [{float(np.min(vol.array)):.4g}, "
                      f"{float(np.max(vol.array)):.4g}] with no air (about −1000 HU); the CT simulation "
                      "assumes HU: check that the input is a CT in HU", UserWarning, stacklevel=3)


def _retrospective(cfg: ReconstructConfig, seed: int) -> Problem:
    from medrecon.datasets.simulate import bundled_ct_slice

    src = str(bundled_ct_slice()) if cfg.input is None else cfg.input
    kw = {"series_uid": cfg.series_uid} if cfg.series_uid is not None else {}  # "": see load_volume
    full = load_image_input(src, "--input", **kw)
    _check_modality(full, cfg)
    first = range(full.shape[0])[parse_slices(cfg.slices, full.shape[0], "input")][0]
    has_geometry = "dicom" in full.meta or src.lower().endswith(NIFTI_SUFFIXES)  # not an image folder
    vol = _subset(full, cfg)
    del full
    x = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[:, None]  # (Z, 1, H, W)
    from medrecon.pipeline.case import acceleration_of, views_of

    A = retrospective_operator(  # noqa: N806
        x.shape[-2:], cfg.modality, seed=seed, views=views_of(cfg), geometry=cfg.geometry,
        angles_deg=cfg.angles_deg, limited_angle_deg=cfg.limited_angle_deg, pixel_mm=vol.spacing_mm[2],
        source_to_isocenter_mm=cfg.source_to_isocenter_mm, source_to_detector_mm=cfg.source_to_detector_mm,
        mask=cfg.mask, acceleration=acceleration_of(cfg), center_fraction=cfg.center_fraction,
    )
    check_projector_memory(A, _ct_what(cfg))  # before the matrices are built
    if cfg.modality == "ct":
        n = int(np.count_nonzero(A.mask.cpu().numpy())) if hasattr(A, "mask") else views_of(cfg)
        what = f"{n} views" if cfg.limited_angle_deg is None else f"{cfg.limited_angle_deg:g}° limited angle"
        title = f"CT {cfg.geometry} beam, {what}"
        unit, initial, scale = "HU", "fbp", 1.0
    else:
        scale = float(np.percentile(np.abs(vol.array), 99.5)) or 1.0
        title = f"MRI {acceleration_of(cfg):g}x {cfg.mask} mask"
        unit, initial = "a.u.", "zero-filled"
    y = simulate_measurement(x, A, cfg.noise, seed)
    return Problem(y, A, x, vol, unit, initial, title, scale, first_slice=first,
                   display_affine=vol.affine if has_geometry else None)


def retrospective_operator(
    shape: tuple[int, int], modality: str, *, seed: int, views: int = 23, geometry: str = "parallel",
    angles_deg: tuple[float, ...] | None = None, limited_angle_deg: float | None = None,
    pixel_mm: float = 1.0, source_to_isocenter_mm: float = 541.0, source_to_detector_mm: float = 949.0,
    mask: str = "equispaced", acceleration: float = 4.0, center_fraction: float = 0.08,
) -> Any:
    """The operator that simulates a measurement from an image of ``shape`` (H, W).

    ``modality`` "ct" (also DICOM's "CT"): :func:`~medrecon.pipeline.geometry.ct_case_operator`
    with the geometry arguments; "mri" (also "MR"): a :class:`~medrecon.operators.MaskedFourier`
    with an ``mri_mask(mask, shape, acceleration, center_fraction, seed=seed)``.  The one place
    where the batch pipeline, the CLI and the PACS workflow choose a retrospective operator.
    """
    from medrecon.operators import MaskedFourier, mri_mask
    from medrecon.pipeline.geometry import ct_case_operator

    h, w = (int(v) for v in shape)
    kind = {"ct": "ct", "mri": "mri", "mr": "mri"}.get(str(modality).lower())
    if kind == "ct":
        if angles_deg is None and limited_angle_deg is None and views < 1:
            raise SettingsError(f"views must be >= 1, got {views}")
        return ct_case_operator(
            (h, w), kind=geometry, views=views, angles_deg=angles_deg, limited_angle_deg=limited_angle_deg,
            pixel_mm=pixel_mm, source_to_isocenter_mm=source_to_isocenter_mm,
            source_to_detector_mm=source_to_detector_mm,
        )
    if kind == "mri":
        return MaskedFourier(mri_mask(mask, (h, w), acceleration, center_fraction, seed=seed))
    raise SettingsError(f"modality {modality!r}: only CT and MR(I) images can be reconstructed")


def simulate_measurement(x: Tensor, A: Any, noise: float, seed: int) -> Tensor:  # noqa: N803
    """``A x`` plus :func:`add_noise` of relative level ``noise``, seeded."""
    with torch.no_grad():
        return add_noise(A(x), noise, torch.Generator().manual_seed(seed))


def _sinogram_problem(cfg: ReconstructConfig) -> Problem:
    """A measured sinogram, reconstructed as it is or thinned (retrospectively) to some of its views.

    Thinned (``views``, ``view_step``, ``limited_angle_deg``): ``A`` measures the kept views
    within the full set of measured ones (its ``T``), ``y`` holds those views, and the FBP of
    all measured views is the reference for the metrics.  Each slice's data are checked against
    the geometry (:func:`medrecon.pipeline.geometry_check.check_geometry` on the middle slice):
    a geometry that fits clearly worse than another gives a warning.
    """
    import warnings

    from medrecon.datasets import Volume, load_sinogram
    from medrecon.datasets.simulate import MU_WATER_PER_MM, ct_operator
    from medrecon.datasets.thinning import thin_view_indices
    from medrecon.pipeline.geometry import sinogram_grid
    from medrecon.pipeline.case import thins_measured_data
    from medrecon.pipeline.geometry_check import check_geometry, geometry_warning

    sino = load_sinogram(cfg.input)
    g = sino.geometry
    s = parse_slices(cfg.slices, sino.data.shape[0], str(cfg.input))
    data = np.asarray(sino.data[s], dtype=np.float32)
    size, pix = sinogram_grid(g, cfg.image_size)
    json_path = Path(cfg.input).with_suffix(".json")
    try:
        full = ct_operator(g, (size, size))
    except SettingsError as err:
        raise InputError(json_path, str(err)) from err
    n_views = len(g["angles_rad"])
    notes: dict[str, Any] = {}
    check = check_geometry(sino.__class__(data, g), image_size=size, grid=96, max_views=90, refine=False,
                           max_offset_bins=min(12, max(4, round(0.05 * g["n_detectors"]))))
    notes["geometry_check"] = {"data_residual": round(check.stated.residual, 5), "confidence": check.confidence,
                               "best_fit": check.keys() if check.changed else "as given"}
    text = geometry_warning(check, str(cfg.input))
    if text:
        warnings.warn(text, UserWarning, stacklevel=2)
    A = full  # noqa: N806
    idx = None
    if thins_measured_data(cfg):
        idx = thin_view_indices(g["angles_rad"], views=cfg.views, view_step=cfg.view_step,
                                limited_angle_deg=cfg.limited_angle_deg)
        keep = np.zeros(n_views, dtype=bool)
        keep[idx] = True
        A = full.with_view_mask(keep)  # noqa: N806
    check_projector_memory(A, f"{Path(cfg.input).name} ({len(A.angles)} views, {size}×{size} grid)", data.shape[0])
    weights = A.fbp_weights()
    notes["scan"] = {"full": "full scan", "limited": "limited angle: FBP normalised to the range covered",
                     "short": "fan-beam short scan: FBP with Parker weights"}[weights.scan]
    notes["scan_covered_deg"] = round(math.degrees(weights.covered_rad), 2)
    y = torch.from_numpy(data)[:, None]
    if g.get("units", "image_pixel") == "attenuation":
        mu = float(g.get("mu_water_per_mm") or MU_WATER_PER_MM)
        with torch.no_grad():
            ones = full(torch.ones(1, 1, size, size))
        y = (y / (pix * mu) - ones) * 1000.0  # HU · pixel line integrals
    template = Volume(np.zeros((data.shape[0], size, size), np.float32), np.diag([pix, pix, pix, 1.0]), "CT")
    title = f"CT measured sinogram, {g['type']} beam, {n_views} views"
    reference = None
    if idx is not None:
        with torch.no_grad():
            reference = full.fbp(y)
        y = y[:, :, torch.from_numpy(idx)]
        how = ", ".join(f"{opt} {v:g}" for opt, v in (("--limited-angle", cfg.limited_angle_deg),
                                                      ("--views", cfg.views), ("--view-step", cfg.view_step))
                        if v is not None)
        notes["thinning"] = {"selection": how, "views_kept": int(idx.size), "views": n_views,
                             "view_indices": idx.tolist(), "how": "retrospective on measured data"}
        notes["reference"] = f"FBP of all {n_views} measured views"
        title = (f"CT measured sinogram, {g['type']} beam, {idx.size} of {n_views} views "
                 f"({how}, retrospective on measured data)")
    return Problem(y, A, reference, template, "HU", "fbp", title, notes=notes,
                   first_slice=range(sino.data.shape[0])[s][0])


def _kspace_problem(cfg: ReconstructConfig, seed: int = 0) -> Problem:
    """Measured k-space, reconstructed as it is or thinned (retrospectively) with a mask.

    Raw scanner files go to :func:`medrecon.pipeline.rawscan.raw_problem`.  Thinned
    (``acceleration`` given; every phase-encode line measured): the lines of
    ``mri_mask(cfg.mask, …, R, cfg.center_fraction, seed)`` are kept
    (:func:`medrecon.datasets.thin_measured_kspace`, shared with raw scans), coil maps (when the
    file has none) are estimated from the full data, and its zero-filled (exact) reconstruction
    is the reference.
    """
    from medrecon.datasets import Volume, load_fastmri_reference, load_kspace, thin_measured_kspace
    from medrecon.operators import MaskedFourier, MultiCoilMRI, estimate_coil_maps
    from medrecon.pipeline.case import acceleration_of, thins_measured_data

    path = Path(cfg.input)
    is_h5 = path.suffix.lower() in (".h5", ".hdf5")
    ksp = load_kspace(str(path), input_domain=cfg.input_domain)  # by ending; coil images refused or converted
    if "raw" in ksp.header:  # a raw scanner file (twix, MRD)
        from medrecon.pipeline.rawscan import raw_problem

        return raw_problem(cfg, ksp, seed)
    s = parse_slices(cfg.slices, ksp.data.shape[1], str(path))
    notes: dict[str, Any] = {"coils": int(ksp.data.shape[0])}
    full_data = file_maps = None
    if thins_measured_data(cfg):
        full_data, file_maps = ksp.data[:, s], ksp.coil_maps
        try:
            ksp = thin_measured_kspace(ksp, acceleration_of(cfg), cfg.mask, cfg.center_fraction, seed)
        except SettingsError as err:
            raise SettingsError(f"{path.name}: {err}") from err
        notes["thinning"] = ksp.header["thinning"]
        ksp = replace(ksp, coil_maps=file_maps)
    data = ksp.data[:, s]  # (coils, Z, H, W)
    mask = ksp.mask if ksp.mask.shape[0] == 1 else ksp.mask[s]
    y = torch.from_numpy(np.ascontiguousarray(data.transpose(1, 0, 2, 3)))  # (Z, coils, H, W)
    m = torch.from_numpy(np.ascontiguousarray(mask if mask.shape[0] > 1 else mask[0]))
    images = ksp.header.get("input_domain") == "image"
    if images:
        notes["input_domain"] = "image: coil images turned into fully sampled k-space (centred FFT)"
    maps = None
    if data.shape[0] == 1:
        A = MaskedFourier(m)  # noqa: N806
    else:
        if ksp.coil_maps is not None:
            maps = torch.from_numpy(np.ascontiguousarray(ksp.coil_maps[:, s].transpose(1, 0, 2, 3)))
            notes["coil_maps"] = "from file"
        else:  # a retrospective study tests the undersampling, not the maps: they come from the full data
            calib = y if full_data is None else torch.from_numpy(np.ascontiguousarray(full_data.transpose(1, 0, 2, 3)))
            maps = torch.stack([estimate_coil_maps(calib[z], calib_width=min(24, *y.shape[-2:]))
                                for z in range(y.shape[0])])
            notes["coil_maps"] = "ESPIRiT" + (" (from the fully sampled data)" if full_data is not None else "")
        A = MultiCoilMRI(maps, m)  # noqa: N806
    with torch.no_grad():
        zf = A.adjoint(y).abs()
    reference = None
    if full_data is not None:
        y_full = torch.from_numpy(np.ascontiguousarray(full_data.transpose(1, 0, 2, 3)))
        ones = torch.ones_like(m if m.ndim == 2 else m[0])
        A_full = MaskedFourier(ones) if maps is None else MultiCoilMRI(maps, ones)  # noqa: N806
        with torch.no_grad():
            reference = A_full.adjoint(y_full).abs()
        notes["reference"] = "the full scan's zero-filled (exact) reconstruction, with the same maps"
        zf = reference
    scale = float(torch.quantile(zf.flatten()[:: max(1, zf.numel() // 100000)], 0.995)) or 1.0
    if is_h5 and reference is None:
        ref = load_fastmri_reference(path, slices=s)
        if ref is not None:
            reference = torch.from_numpy(ref.array)[:, None]
            notes["reference"] = "fastMRI reconstruction"
    template = Volume(np.zeros((y.shape[0], *y.shape[-2:]), np.float32), np.eye(4), "MR")
    layout = "multi-coil" if data.shape[0] > 1 else "single-coil"
    what = f"{layout} k-space"
    if images:
        what = "coil images turned into k-space" if data.shape[0] > 1 else "image turned into k-space"
    title = f"MRI measured {what}, {float(mask.mean()):.0%} sampled"
    if full_data is not None:
        title += f" (R={acceleration_of(cfg):g} {cfg.mask}, retrospective on measured data)"
    return Problem(y, A, reference, template, "a.u.", "zero-filled", title, scale, notes,
                   first_slice=range(ksp.data.shape[1])[s][0])


def build_problem(cfg: ReconstructConfig, seed: int) -> Problem:
    """The problem of one case (see the module docstring for the input kinds).

    Raises
    ------
    SettingsError
        A mode or modality that does not fit the input.
    InputError
        Unreadable input (from the readers).
    """
    if cfg.input is not None and not Path(cfg.input).exists():
        raise InputError(cfg.input, "no such file or folder")
    kind = input_kind(cfg.input, cfg.modality)
    from medrecon.pipeline.case import thins_measured_data

    thin = thins_measured_data(cfg)  # measured data thinned: retrospective on measured data
    mode = cfg.mode
    if mode == "auto":
        mode = "retrospective" if kind == "image" or thin else "prospective"
    if mode == "retrospective" and kind != "image" and not thin:
        raise SettingsError(f"retrospective mode needs an image input, or fully sampled measured data thinned with "
                            f"--acceleration (k-space) or --views/--view-step/--limited-angle (a sinogram); "
                            f"{Path(str(cfg.input)).name} is a {kind}")
    if mode == "prospective" and thin:
        raise SettingsError("thinning options make a case retrospective on measured data, --mode prospective "
                            "reconstructs the data as measured: give one of them")
    if mode == "prospective" and kind == "image":
        raise SettingsError(f"prospective mode needs measured data: {supported_formats('input').split('; ', 1)[1]}")
    want = {"sinogram": "ct", "kspace": "mri"}.get(kind)
    if want and cfg.modality != want:
        what = {"sinogram": "a CT sinogram", "kspace": "MRI k-space"}[kind]
        raise SettingsError(f"{Path(str(cfg.input)).name} is {what}; use --modality {want}")
    if kind == "sinogram":
        prob = _sinogram_problem(cfg)
    elif kind == "kspace":
        prob = _kspace_problem(cfg, seed)
    else:
        return _retrospective(cfg, seed)
    if cfg.reference:  # a given reference wins over the full data's reconstruction
        ref_all = load_image_input(cfg.reference, "--reference").array
        ref = ref_all[parse_slices(cfg.slices, ref_all.shape[0], cfg.reference)]
        prob.reference = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))[:, None]
        prob.notes["reference"] = "file"
    return prob
