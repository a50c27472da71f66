"""ISMRMRD / MRD raw data (HDF5, ``.h5`` / ``.mrd``) through the ``ismrmrd`` package.

Reading: ``ismrmrd.File`` opens the file (read-only; its container reads all acquisitions in one
go, where ``ismrmrd.Dataset.read_acquisition`` reopens the HDF5 dataset for every one),
``ismrmrd.xsd.CreateFromDocument`` parses the XML header, and each ``Acquisition`` becomes a
:class:`~medrecon.datasets.readouts.Readout` by its flags and counters:

* ``ACQ_IS_NOISE_MEASUREMENT`` → the noise scan (``KSpace.noise``);
* ``ACQ_IS_PARALLEL_CALIBRATION`` → calibration only, ``…_AND_IMAGING`` → calibration and image;
* navigator, feedback, dummy-scan, surface-coil-correction and phase-stabilisation
  acquisitions are left out;
* ``ACQ_IS_REVERSE`` lines, ``ACQ_IS_PHASECORR_DATA`` navigators or an ``epi`` trajectory mean EPI,
  refused (no line reversal / phase correction is built); other non-Cartesian trajectories (a
  ``trajectory`` other than ``cartesian``, acquisitions carrying trajectory points) and 3-D
  encoding (``kspace_encode_step_2`` > 1) are refused too;
* ``discard_pre`` / ``discard_post`` samples are dropped.

The readout oversampling is the ratio of the encoded to the recon FOV along x (MRD's
convention: the encoded space holds the oversampled readout).  Positions and directions are in
the MRD patient coordinate system (LPS, mm).

Writing (:func:`save_mrd`): any :class:`KSpace` as one acquisition per measured line (readout
along the k-space's readout axis, :func:`~medrecon.datasets.raw_steps.readout_axis`), noise
samples first, calibration lines flagged, with a header whose encoding limits put the centre
where the grid has it, so :func:`load_mrd` gives the same grid back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medrecon.datasets._atomic import atomic_files
from medrecon.datasets.readouts import Readout, assemble_kspace
from medrecon.datasets.types import KSpace
from medrecon.errors import InputError, ShapeError

__all__ = ["load_mrd", "save_mrd", "is_mrd_file", "MRD_SUFFIXES"]

#: endings of MRD files (``.h5`` is shared with fastMRI: :func:`is_mrd_file` tells them apart)
MRD_SUFFIXES = (".mrd", ".h5", ".hdf5", ".ismrmrd")

#: samples per noise acquisition written by :func:`save_mrd`
_NOISE_CHUNK = 256


def _flags() -> dict[str, int]:
    import ismrmrd

    return {
        name: getattr(ismrmrd, f"ACQ_{name}")
        for name in (
            "IS_NOISE_MEASUREMENT",
            "IS_PARALLEL_CALIBRATION",
            "IS_PARALLEL_CALIBRATION_AND_IMAGING",
            "IS_REVERSE",
            "IS_NAVIGATION_DATA",
            "IS_PHASECORR_DATA",
            "IS_HPFEEDBACK_DATA",
            "IS_DUMMYSCAN_DATA",
            "IS_RTFEEDBACK_DATA",
            "IS_SURFACECOILCORRECTIONSCAN_DATA",
            "IS_PHASE_STABILIZATION_REFERENCE",
            "IS_PHASE_STABILIZATION",
            "FIRST_IN_SLICE",
            "LAST_IN_SLICE",
            "LAST_IN_MEASUREMENT",
        )
    }


_SKIPPED = (
    "IS_NAVIGATION_DATA",
    "IS_HPFEEDBACK_DATA",
    "IS_DUMMYSCAN_DATA",
    "IS_RTFEEDBACK_DATA",
    "IS_SURFACECOILCORRECTIONSCAN_DATA",
    "IS_PHASE_STABILIZATION_REFERENCE",
    "IS_PHASE_STABILIZATION",
)


def _group(hf: Any) -> str | None:
    """The MRD dataset group of an open HDF5 file: ``dataset``, else the only group with an ``xml`` header."""
    if "dataset" in hf and "xml" in hf["dataset"]:
        return "dataset"
    groups = [k for k in hf if hasattr(hf[k], "keys") and "xml" in hf[k]]
    return groups[0] if len(groups) == 1 else None


def is_mrd_file(path: str | Path) -> bool:
    """True when ``path`` is an HDF5 file with an MRD dataset group (an ``xml`` header)."""
    import h5py

    try:
        with h5py.File(path, "r") as hf:
            return _group(hf) is not None
    except Exception:  # noqa: BLE001 - not HDF5 at all
        return False


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def _header(container: Any, p: Path) -> tuple[dict[str, Any], Any, str]:
    from ismrmrd.xsd import ToXML

    try:
        hdr = container.header
    except Exception as err:  # noqa: BLE001 - xsdata raises its own parser errors
        raise InputError(
            p, f"XML header is not a valid ISMRMRD header ({type(err).__name__}: {str(err)[:160]})"
        ) from err
    if hdr is None:
        raise InputError(p, "MRD dataset has no XML header")
    if not hdr.encoding:
        raise InputError(p, "XML header has no <encoding>")
    enc = hdr.encoding[0]
    es, rs = enc.encodedSpace, enc.reconSpace
    sysinfo, meas, seq = (
        hdr.acquisitionSystemInformation,
        hdr.measurementInformation,
        hdr.sequenceParameters,
    )
    pi = enc.parallelImaging
    acc = [1.0, 1.0]
    if pi is not None and pi.accelerationFactor is not None:
        acc = [
            float(pi.accelerationFactor.kspace_encoding_step_1),
            float(pi.accelerationFactor.kspace_encoding_step_2),
        ]
    os_factor = 1.0
    if es.fieldOfView_mm.x and rs.fieldOfView_mm.x and rs.fieldOfView_mm.x > 0:
        os_factor = max(1.0, round(float(es.fieldOfView_mm.x) / float(rs.fieldOfView_mm.x), 3))
    raw = {
        "format": "mrd",
        "vendor": getattr(sysinfo, "systemVendor", None),
        "model": getattr(sysinfo, "systemModel", None),
        "field_T": getattr(sysinfo, "systemFieldStrength_T", None),
        "software": None,
        "sequence": getattr(seq, "sequence_type", None) or getattr(meas, "sequenceName", None),
        "protocol": getattr(meas, "protocolName", None),
        "trajectory": str(_value(enc.trajectory)),
        "encoded_matrix": [es.matrixSize.x, es.matrixSize.y, es.matrixSize.z],
        "recon_matrix": [rs.matrixSize.x, rs.matrixSize.y, rs.matrixSize.z],
        "encoded_fov_mm": [es.fieldOfView_mm.x, es.fieldOfView_mm.y, es.fieldOfView_mm.z],
        "recon_fov_mm": [rs.fieldOfView_mm.x, rs.fieldOfView_mm.y, rs.fieldOfView_mm.z],
        "slice_thickness_mm": rs.fieldOfView_mm.z,
        "readout_oversampling": os_factor,
        "acceleration": acc,
        "patient_position": None if meas is None else str(_value(meas.patientPosition)),
        "relative_receiver_noise_bandwidth": getattr(
            sysinfo, "relativeReceiverNoiseBandwidth", None
        ),
    }
    return raw, enc, ToXML(hdr)


def load_mrd(path: str | Path, *, dataset: str | None = None) -> KSpace:
    """Read an MRD (ISMRMRD HDF5) file into :class:`KSpace` (rows phase encoding, columns readout).

    Parameters
    ----------
    path : str or Path
        The ``.h5`` / ``.mrd`` file.
    dataset : str, optional
        The dataset group (default ``dataset``, or the only group holding an ``xml`` header).

    Returns
    -------
    KSpace
        As :func:`~medrecon.datasets.twix.load_twix`: ``data`` (coils, Z, ky, kx), ``mask``,
        ``noise``, ``calibration``, ``header["raw"]`` (``header["ismrmrd_header"]`` keeps the XML).

    Raises
    ------
    InputError
        Not HDF5, no MRD dataset, an invalid XML header, truncated acquisitions, EPI, a
        non-Cartesian trajectory, 3-D encoding, several echoes / repetitions.
    """
    import h5py
    import ismrmrd

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such file")
    try:
        with h5py.File(p, "r") as hf:
            group = dataset if dataset is not None else _group(hf)
    except Exception as err:  # noqa: BLE001 - h5py raises OSError / ValueError on broken files
        raise InputError(
            p, f"not a readable HDF5 file ({type(err).__name__}: {str(err)[:160]})"
        ) from err
    if group is None:
        raise InputError(
            p, "no MRD dataset in this HDF5 file (a group with an 'xml' header and 'data')"
        )
    flags = _flags()
    readouts: list[Readout] = []
    noise: list[np.ndarray] = []
    dwell: dict[str, float] = {}
    epi = {"reversed lines": 0, "phase-correction navigators": 0}
    try:
        with ismrmrd.File(str(p), "r") as fh:
            container = fh[group]
            raw, enc, xml = _header(container, p)
            if raw["trajectory"] == "epi":
                raise InputError(
                    p,
                    "EPI trajectory: not supported; line reversal and navigator phase correction are "
                    "not built",
                )
            if raw["trajectory"] != "cartesian":
                raise InputError(
                    p,
                    f"{raw['trajectory']} trajectory (non-Cartesian): not supported; medrecon reads "
                    "Cartesian 2-D and multi-slice scans",
                )
            if (raw["encoded_matrix"][2] or 1) > 1:
                raise InputError(
                    p,
                    f"3-D encoding ({raw['encoded_matrix'][2]} partitions, kspace_encoding_step_2): "
                    "not supported; medrecon reads Cartesian 2-D and multi-slice scans",
                )
            if not container.has_acquisitions():
                raise InputError(p, f"MRD dataset '{group}' holds no acquisitions")
            for i, acq in enumerate(container.acquisitions[:]):
                if acq.is_flag_set(flags["IS_REVERSE"]):
                    epi["reversed lines"] += 1
                if acq.is_flag_set(flags["IS_PHASECORR_DATA"]):
                    epi["phase-correction navigators"] += 1
                    continue
                if any(acq.is_flag_set(flags[f]) for f in _SKIPPED):
                    continue
                if acq.trajectory_dimensions > 0:
                    raise InputError(
                        p,
                        f"acquisition {i}: carries {acq.trajectory_dimensions}-D trajectory points "
                        "(non-Cartesian): not supported",
                    )
                lo, hi = int(acq.discard_pre), int(acq.number_of_samples) - int(acq.discard_post)
                samples = np.array(acq.data[:, lo:hi], dtype=np.complex64)
                if samples.shape[1] == 0 or samples.shape[0] == 0:
                    raise InputError(
                        p,
                        f"acquisition {i}: no samples ({acq.active_channels} coils × "
                        f"{acq.number_of_samples} samples, {lo} + {acq.discard_post} discarded)",
                    )
                if acq.is_flag_set(flags["IS_NOISE_MEASUREMENT"]):
                    noise.append(samples)
                    dwell.setdefault("noise", float(acq.sample_time_us))
                    continue
                dwell.setdefault("data", float(acq.sample_time_us))
                idx = acq.idx
                calibration = acq.is_flag_set(flags["IS_PARALLEL_CALIBRATION"]) or acq.is_flag_set(
                    flags["IS_PARALLEL_CALIBRATION_AND_IMAGING"]
                )
                imaging = not acq.is_flag_set(flags["IS_PARALLEL_CALIBRATION"]) or acq.is_flag_set(
                    flags["IS_PARALLEL_CALIBRATION_AND_IMAGING"]
                )
                centre = int(acq.center_sample) - lo
                if not 0 <= centre < samples.shape[1]:
                    raise InputError(
                        p, f"acquisition {i}: centre sample {acq.center_sample} outside its samples"
                    )
                geometry = {
                    "position_lps_mm": [float(v) for v in acq.position],
                    "read_dir": [float(v) for v in acq.read_dir],
                    "phase_dir": [float(v) for v in acq.phase_dir],
                    "slice_dir": [float(v) for v in acq.slice_dir],
                }
                if not all(
                    abs(np.linalg.norm(geometry[k]) - 1) < 1e-3
                    for k in ("read_dir", "phase_dir", "slice_dir")
                ):
                    geometry = None
                readouts.append(
                    Readout(
                        samples,
                        int(idx.kspace_encode_step_1),
                        int(idx.slice),
                        centre,
                        calibration,
                        imaging,
                        partition=int(idx.kspace_encode_step_2),
                        contrast=int(idx.contrast),
                        repetition=int(idx.repetition),
                        phase=int(idx.phase),
                        set=int(idx.set),
                        average=int(idx.average),
                        geometry=geometry,
                    )
                )
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - ismrmrd / h5py / numpy on a broken file
        raise InputError(
            p, f"not a readable MRD file ({type(err).__name__}: {str(err)[:160]})"
        ) from err
    if epi["reversed lines"] or epi["phase-correction navigators"]:
        raise InputError(
            p,
            f"EPI ({epi['reversed lines']} reversed lines, {epi['phase-correction navigators']} "
            "phase-correction navigators): not supported; line reversal and navigator phase correction "
            "are not built",
        )
    if not readouts:
        raise InputError(p, "holds no imaging acquisitions")
    raw["dwell_time_us"] = dwell.get("data")
    raw["noise_dwell_time_us"] = dwell.get("noise")
    limits = enc.encodingLimits.kspace_encoding_step_1 if enc.encodingLimits is not None else None
    centre = None if limits is None else int(limits.center)
    ksp = assemble_kspace(
        p,
        readouts,
        noise,
        header=raw,
        centre_line=centre,
        encoded_lines=int(raw["encoded_matrix"][1] or 0),
    )
    ksp.header["ismrmrd_header"] = xml
    return ksp


def _xml(kspace: KSpace, nx: int, ny: int, nz: int) -> str:
    from ismrmrd import xsd

    raw = kspace.header.get("raw", {})
    fov = raw.get("recon_fov_mm") or [float(nx), float(ny), 1.0]
    os_factor = float(raw.get("readout_oversampling") or 1.0)
    rx = int(round(nx / os_factor))
    space = xsd.encodingSpaceType
    encoded = space(
        matrixSize=xsd.matrixSizeType(x=nx, y=ny, z=1),
        fieldOfView_mm=xsd.fieldOfViewMm(
            x=float(fov[0]) * nx / rx, y=float(fov[1]), z=float(fov[2] or 1.0)
        ),
    )
    recon = space(
        matrixSize=xsd.matrixSizeType(x=rx, y=ny, z=1),
        fieldOfView_mm=xsd.fieldOfViewMm(x=float(fov[0]), y=float(fov[1]), z=float(fov[2] or 1.0)),
    )
    limits = xsd.encodingLimitsType(
        kspace_encoding_step_0=xsd.limitType(minimum=0, maximum=nx - 1, center=nx // 2),
        kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=ny - 1, center=ny // 2),
        slice=xsd.limitType(minimum=0, maximum=nz - 1, center=0),
    )
    acc = raw.get("acceleration") or [1, 1]
    encoding = xsd.encodingType(
        encodedSpace=encoded,
        reconSpace=recon,
        encodingLimits=limits,
        trajectory=xsd.trajectoryType.CARTESIAN,
        parallelImaging=xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(
                kspace_encoding_step_1=max(1, int(round(float(acc[0])))),
                kspace_encoding_step_2=max(1, int(round(float(acc[1])))),
            )
        ),
    )
    field = float(raw.get("field_T") or 3.0)
    system = xsd.acquisitionSystemInformationType(
        systemVendor=str(raw.get("vendor") or "medrecon"),
        systemModel=raw.get("model") and str(raw["model"]),
        systemFieldStrength_T=field,
        receiverChannels=kspace.n_coils,
    )
    position = (
        raw.get("patient_position")
        if raw.get("patient_position") in xsd.patientPositionType.__members__
        else "HFS"
    )
    measurement = xsd.measurementInformationType(
        patientPosition=xsd.patientPositionType[position],
        protocolName=raw.get("protocol") and str(raw["protocol"]),
    )
    header = xsd.ismrmrdHeader(
        encoding=[encoding],
        acquisitionSystemInformation=system,
        measurementInformation=measurement,
        experimentalConditions=xsd.experimentalConditionsType(
            H1resonanceFrequency_Hz=int(round(42.577478e6 * field))
        ),
    )
    return xsd.ToXML(header)


def save_mrd(kspace: KSpace, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``kspace`` as an MRD (ISMRMRD HDF5) file through ``ismrmrd.Dataset``.

    Parameters
    ----------
    kspace : KSpace
        Any k-space medrecon reads.  Its readout axis
        (:func:`~medrecon.datasets.raw_steps.readout_axis`) becomes the MRD readout; each line
        with measured samples one acquisition (a contiguous measured range of the readout, so an
        asymmetric echo keeps its ``center_sample``); noise samples are written first as noise
        acquisitions, calibration lines flagged as such.
    path : str or Path
        Output ``.h5`` / ``.mrd`` file (written to a temporary name and renamed).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path

    Raises
    ------
    ShapeError
        A mask whose measured samples along the readout are not one contiguous range (a 2-D
        sampling pattern, which MRD's line acquisitions cannot hold).
    """
    import ismrmrd

    from medrecon.datasets.raw_steps import readout_axis

    axis = readout_axis(kspace)
    data = np.moveaxis(kspace.data, axis, -1)
    calib = None if kspace.calibration is None else np.moveaxis(kspace.calibration, axis, -1)
    c, nz, ny, nx = data.shape
    mask = np.broadcast_to(np.moveaxis(kspace.mask, axis, -1), (nz, ny, nx))
    plan = []  # (z, line, first, last, flags, array)
    flags = _flags()
    for z in range(nz):
        for line in range(ny):
            cols = np.flatnonzero(mask[z, line])
            is_cal = calib is not None and bool(np.any(calib[:, z, line] != 0))
            if cols.size:
                if cols.size != cols[-1] - cols[0] + 1:
                    raise ShapeError(
                        f"save_mrd(): slice {z} line {line}: the measured samples along the readout are "
                        "not one contiguous range (a 2-D sampling pattern); MRD holds readout lines"
                    )
                flag = flags["IS_PARALLEL_CALIBRATION_AND_IMAGING"] if is_cal else None
                plan.append((z, line, int(cols[0]), int(cols[-1]), flag, data))
            elif is_cal:
                cal_cols = np.flatnonzero(np.any(calib[:, z, line] != 0, axis=0))
                plan.append(
                    (
                        z,
                        line,
                        int(cal_cols[0]),
                        int(cal_cols[-1]),
                        flags["IS_PARALLEL_CALIBRATION"],
                        calib,
                    )
                )
    raw = kspace.header.get("raw", {})
    slices = (
        raw.get("slices")
        if isinstance(raw.get("slices"), list) and len(raw.get("slices")) == nz
        else None
    )
    from ismrmrd.xsd import CreateFromDocument

    acquisitions = []
    if kspace.noise is not None:
        for start in range(0, kspace.noise.shape[1], _NOISE_CHUNK):
            chunk = np.ascontiguousarray(
                kspace.noise[:, start : start + _NOISE_CHUNK], np.complex64
            )
            acq = ismrmrd.Acquisition.from_array(chunk, center_sample=chunk.shape[1] // 2)
            acq.set_flag(flags["IS_NOISE_MEASUREMENT"])
            acquisitions.append(acq)
    for k, (z, line, first, last, flag, source) in enumerate(plan):
        samples = np.ascontiguousarray(source[:, z, line, first : last + 1], np.complex64)
        acq = ismrmrd.Acquisition.from_array(samples, center_sample=nx // 2 - first, scan_counter=k)
        acq.idx.kspace_encode_step_1 = line
        acq.idx.slice = z
        if flag is not None:
            acq.set_flag(flag)
        if k == 0 or plan[k - 1][0] != z:
            acq.set_flag(flags["FIRST_IN_SLICE"])
        if k == len(plan) - 1 or plan[k + 1][0] != z:
            acq.set_flag(flags["LAST_IN_SLICE"])
        if k == len(plan) - 1:
            acq.set_flag(flags["LAST_IN_MEASUREMENT"])
        geo = slices[z] if slices else None
        if geo:
            for name, key in (
                ("position", "position_lps_mm"),
                ("read_dir", "read_dir"),
                ("phase_dir", "phase_dir"),
                ("slice_dir", "slice_dir"),
            ):
                getattr(acq, name)[:] = [float(v) for v in geo[key]]
        else:
            acq.read_dir[:], acq.phase_dir[:], acq.slice_dir[:] = (
                [1.0, 0, 0],
                [0, 1.0, 0],
                [0, 0, 1.0],
            )
        acquisitions.append(acq)
    header = CreateFromDocument(_xml(kspace, nx, ny, nz))
    with atomic_files([path], overwrite=overwrite) as (tmp,):
        with ismrmrd.File(str(tmp), "w") as fh:
            container = fh["dataset"]
            container.header = header
            container.acquisitions = acquisitions
    return Path(path)
