"""Readers, writers, simulation and training datasets (see docs/data.md).

Everything that crosses the I/O boundary is a :class:`Volume`, :class:`KSpace` or
:class:`Sinogram` (:mod:`medrecon.datasets.types`).  Readers raise
:class:`medrecon.errors.InputError` naming the file and the problem; writers write to a temporary
name and rename, and refuse to overwrite unless ``overwrite=True``.
"""

from __future__ import annotations

from medrecon.datasets.bart import load_bart_kspace, read_cfl, save_bart_kspace, write_cfl
from medrecon.datasets.dicom import (
    DicomGeometryWarning,
    SeriesInfo,
    list_dicom_series,
    load_dicom_series,
)
from medrecon.datasets.dicom_write import save_dicom_series
from medrecon.datasets.fastmri import load_fastmri, load_fastmri_reference, save_fastmri
from medrecon.datasets.images import list_image_files, load_image, load_image_folder
from medrecon.datasets.matlab import list_matlab_variables, load_matlab_kspace, save_matlab_kspace
from medrecon.datasets.mrd import is_mrd_file, load_mrd, save_mrd
from medrecon.datasets.raw_steps import prepare_raw
from medrecon.datasets.thinning import thin_measured_kspace
from medrecon.datasets.twix import load_twix
from medrecon.datasets.nifti import load_nifti, save_nifti, std_path
from medrecon.datasets.sinogram import load_sinogram, save_sinogram, validate_geometry
from medrecon.datasets.slices import slice_positions_lps, subset_volume
from medrecon.datasets.types import GeometryWarning, KSpace, Sinogram, Volume

__all__ = [
    "Volume",
    "KSpace",
    "Sinogram",
    "load_dicom_series",
    "list_dicom_series",
    "save_dicom_series",
    "SeriesInfo",
    "DicomGeometryWarning",
    "GeometryWarning",
    "subset_volume",
    "slice_positions_lps",
    "load_nifti",
    "save_nifti",
    "std_path",
    "load_fastmri",
    "load_fastmri_reference",
    "save_fastmri",
    "read_cfl",
    "write_cfl",
    "load_bart_kspace",
    "save_bart_kspace",
    "load_matlab_kspace",
    "save_matlab_kspace",
    "list_matlab_variables",
    "load_twix",
    "load_mrd",
    "save_mrd",
    "is_mrd_file",
    "raw_format",
    "prepare_raw",
    "thin_measured_kspace",
    "load_kspace",
    "KSPACE_SUFFIXES",
    "INPUT_DOMAINS",
    "load_sinogram",
    "save_sinogram",
    "validate_geometry",
    "load_image",
    "load_image_folder",
    "list_image_files",
    "load_volume",
]


#: file name endings of the k-space formats :func:`load_kspace` reads
KSPACE_SUFFIXES = (".h5", ".hdf5", ".cfl", ".hdr", ".mat", ".dat", ".mrd")


def raw_format(path: str | object) -> str | None:
    """``"twix"`` (a ``.dat`` file), ``"mrd"`` (``.mrd``, or an ``.h5`` / ``.hdf5`` file holding an MRD
    dataset) or None: the raw scanner formats, whose k-space goes through
    :func:`~medrecon.datasets.raw_steps.prepare_raw`."""
    from pathlib import Path

    name = Path(str(path)).name.lower()
    if name.endswith(".dat"):
        return "twix"
    if name.endswith(".mrd") or (name.endswith((".h5", ".hdf5")) and is_mrd_file(str(path))):
        return "mrd"
    return None


#: what ``load_kspace(input_domain=...)`` takes: None (k-space, checked), "kspace", "image"
INPUT_DOMAINS = (None, "kspace", "image")


def load_kspace(path: str, *, input_domain: str | None = None, **kwargs: object) -> KSpace:
    """Load k-space by the file's ending: fastMRI ``.h5`` / ``.hdf5``, BART ``.cfl`` / ``.hdr``,
    MATLAB ``.mat`` (v7.3 or older), Siemens twix ``.dat``, MRD ``.mrd`` (or an ``.h5`` holding an
    MRD dataset), checked for being k-space.  Raw scanner files come as stored (readout
    oversampled, not prewhitened): :func:`prepare_raw` makes them ready.

    Parameters
    ----------
    path : str
        The file.
    input_domain : {None, "kspace", "image"}
        What the file holds.  None: k-space, checked by the energy at its centre
        (:func:`medrecon.datasets.kspace_domain.check_kspace_domain`), so coil images are refused
        instead of being reconstructed as k-space.  ``"kspace"``: k-space, not checked.
        ``"image"``: coil images (coils, Z, H, W), turned into fully sampled k-space by the
        centred FFT (:func:`~medrecon.datasets.kspace_domain.kspace_from_coil_images`).
    **kwargs
        Passed to the reader (e.g. ``variable=`` / ``layout=`` for ``.mat``).

    Raises
    ------
    InputError
        Unreadable file, an ending of no k-space format (the message lists the supported ones),
        or coil images read without ``input_domain="image"``.
    SettingsError
        ``input_domain`` is none of the above.
    """
    from pathlib import Path

    from medrecon.datasets.kspace_domain import check_kspace_domain, kspace_from_coil_images
    from medrecon.errors import InputError, SettingsError

    if input_domain not in INPUT_DOMAINS:
        raise SettingsError(f"load_kspace(): input_domain must be None, 'kspace' or 'image'; got {input_domain!r}")
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".dat":
        ksp = load_twix(p, **kwargs)  # type: ignore[arg-type]
    elif suffix == ".mrd" or (suffix in (".h5", ".hdf5") and is_mrd_file(p)):
        ksp = load_mrd(p, **kwargs)  # type: ignore[arg-type]
    elif suffix in (".h5", ".hdf5"):
        ksp = load_fastmri(p, **kwargs)  # type: ignore[arg-type]
    elif suffix in (".cfl", ".hdr"):
        ksp = load_bart_kspace(p, **kwargs)  # type: ignore[arg-type]
    elif suffix == ".mat":
        ksp = load_matlab_kspace(p, **kwargs)  # type: ignore[arg-type]
    else:
        raise InputError(p, "not a k-space file; supported: fastMRI .h5/.hdf5, BART .cfl/.hdr, MATLAB .mat, "
                            "Siemens twix .dat, MRD .mrd/.h5")
    if input_domain == "image":
        return kspace_from_coil_images(ksp, p)
    if input_domain is None:
        ksp.header["kspace_check"] = check_kspace_domain(ksp, p)
    return ksp


def load_volume(path: str, **kwargs: object) -> Volume:
    """Load a Volume from a DICOM folder/file, a NIfTI file or an image folder, by looking at it.

    ``series_uid=""`` picks the DICOM files without a SeriesInstanceUID directly in the folder
    (not in sub-folders): batch folder mode groups such files by folder.

    Raises
    ------
    InputError
        Path missing or of no known kind.
    """
    from pathlib import Path

    from medrecon.errors import InputError

    p = Path(path)
    if kwargs.get("series_uid") == "":
        kwargs = {"recursive": False, **kwargs}
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return load_nifti(p, **kwargs)  # type: ignore[arg-type]
    if p.is_dir():
        try:
            return load_dicom_series(p, **kwargs)  # type: ignore[arg-type]
        except InputError as err:
            if "no DICOM image objects" not in err.problem:
                raise
            return load_image_folder(p, **kwargs)  # type: ignore[arg-type]
    if p.is_file():
        return load_dicom_series(p, **kwargs)  # type: ignore[arg-type]
    raise InputError(p, "no such file or folder")
