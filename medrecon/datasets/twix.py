"""Siemens twix raw data (``.dat``, VB and VD/VE/XA software) through ``twixtools``.

``twixtools.read_twix`` parses the file (protocol headers and measurement data blocks, MDBs);
this module sorts the MDBs of the last measurement in the file (the imaging scan of a multi-raid
file) by their flags and counters and hands them to
:func:`medrecon.datasets.readouts.assemble_kspace`:

* ``NOISEADJSCAN`` → the noise scan (``KSpace.noise``);
* ``PATREFSCAN`` → calibration only, ``PATREFANDIMASCAN`` → calibration and image;
* real-time feedback, phase-stabilisation and other navigator MDBs are left out;
* ``PHASCOR`` navigators or ``REFLECT`` (reversed) lines mean EPI, which is refused: its line
  reversal and navigator phase correction are not built;
* a protocol trajectory other than Cartesian, 3-D partitions, several echoes / repetitions are
  refused (one line naming them).

Geometry: each slice's position (``sSliceData.sSlicePos``, Sag/Cor/Tra = DICOM LPS, mm) and
rotation (its quaternion, turned into phase / read / slice directions as twixtools does) from the
first MDB of the slice.  Pulseq sequences write placeholder protocol values (base resolution,
FOV): the grid always follows the data, and a header matrix that disagrees is reported in
``header["raw"]["header_mismatch"]``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from medrecon.datasets.readouts import Readout, assemble_kspace
from medrecon.datasets.types import KSpace
from medrecon.errors import InputError

__all__ = ["load_twix", "TWIX_SUFFIXES"]

#: endings of Siemens raw data files
TWIX_SUFFIXES = (".dat",)

#: MDBs that are neither image, calibration nor noise data (navigators, feedback)
_SKIPPED = (
    "RTFEEDBACK",
    "HPFEEDBACK",
    "PHASESTABSCAN",
    "REFPHASESTABSCAN",
    "SYNCDATA",
    "ACQEND",
    "noname60",
)
#: sKSpace.ucTrajectory values of the protocol
_TRAJECTORIES = {1: "cartesian", 2: "radial", 4: "spiral", 8: "propeller"}
#: smaller than this cannot hold a twix header and one readout
_MIN_BYTES = 1024


def _check_container(p: Path) -> None:
    """Refuse files whose measurement table points beyond their end (truncated), before parsing."""
    size = p.stat().st_size
    if size < _MIN_BYTES:
        raise InputError(p, f"holds {size} bytes; too small to be a Siemens twix file")
    with open(p, "rb") as fh:
        first, second = np.frombuffer(fh.read(8), "<u4")
        if first < 10000 and second <= 64:  # VD/VE/XA: a multi-raid header, then the measurements
            if second == 0:
                raise InputError(p, "not a Siemens twix file: its measurement table is empty")
            fh.seek(0)
            import twixtools.hdr_def as hdr_def

            if size < hdr_def.MultiRaidFileHeader.itemsize:
                raise InputError(
                    p,
                    f"truncated: {size} bytes, shorter than the measurement table "
                    f"({hdr_def.MultiRaidFileHeader.itemsize} bytes)",
                )

            raid = np.frombuffer(
                fh.read(hdr_def.MultiRaidFileHeader.itemsize), hdr_def.MultiRaidFileHeader
            )[0]
            for k in range(int(second)):
                off, length = int(raid["entry"][k]["off_"]), int(raid["entry"][k]["len_"])
                if off >= size or off + length > size:
                    raise InputError(
                        p,
                        f"truncated: measurement {k + 1} of {int(second)} spans bytes {off}..{off + length}"
                        f" but the file holds {size}",
                    )
        elif first >= size:  # VB: the first integer is the header length
            raise InputError(
                p,
                f"not a Siemens twix file (or truncated): header length {first} ≥ file size {size}",
            )


def _read(p: Path) -> dict[str, Any]:
    import twixtools

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            scans = twixtools.read_twix(
                str(p), verbose=False, parse_pmu=False, parse_geometry=False
            )
    except Exception as err:  # noqa: BLE001 - twixtools raises anything on a broken file
        raise InputError(
            p, f"not a readable Siemens twix file ({type(err).__name__}: {str(err)[:160]})"
        ) from err
    if "encountered an error" in printed.getvalue():
        raise InputError(
            p, "truncated or corrupt: twixtools stopped at a broken measurement data block"
        )
    scans = [s for s in scans if isinstance(s, dict)]
    if not scans or "hdr" not in scans[-1] or "MeasYaps" not in scans[-1]["hdr"]:
        raise InputError(p, "not a Siemens twix file: no measurement with a protocol header")
    return scans[-1]


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _geometry(mdb: Any) -> dict[str, Any] | None:
    from twixtools.geometry import quat_to_rotmat

    sd = mdb.mdh.SliceData
    quat = [float(v) for v in sd.Quaternion]
    if not np.all(np.isfinite(quat)) or abs(np.linalg.norm(quat) - 1) > 1e-3:
        return None
    mat = quat_to_rotmat(*quat)
    mat[:, :2] *= -1  # twixtools' convention: columns phase, read, slice in the patient system
    return {
        "position_lps_mm": [float(sd.SlicePos.Sag), float(sd.SlicePos.Cor), float(sd.SlicePos.Tra)],
        "phase_dir": mat[:, 0].tolist(),
        "read_dir": mat[:, 1].tolist(),
        "slice_dir": mat[:, 2].tolist(),
    }


def _header(hdr: dict[str, Any]) -> dict[str, Any]:
    """The ``header["raw"]`` keys a twix protocol gives."""
    yaps, meas, dicom = hdr.get("MeasYaps", {}), hdr.get("Meas", {}), hdr.get("Dicom", {})
    base = _get(yaps, "sKSpace", "lBaseResolution")
    lines = _get(yaps, "sKSpace", "lPhaseEncodingLines")
    slab = _get(yaps, "sSliceArray", "asSlice", default=[{}])
    first = slab[0] if isinstance(slab, list) and slab and isinstance(slab[0], dict) else {}
    os_factor = meas.get("flReadoutOSFactor")
    fov = [first.get("dReadoutFOV"), first.get("dPhaseFOV"), first.get("dThickness")]
    traj = _get(yaps, "sKSpace", "ucTrajectory", default=1)
    return {
        "format": "twix",
        "vendor": dicom.get("Manufacturer") or "Siemens",
        "model": dicom.get("ManufacturersModelName"),
        "field_T": dicom.get("flMagneticFieldStrength"),
        "software": dicom.get("SoftwareVersions"),
        "sequence": str(yaps.get("tSequenceFileName", ""))
        .replace("%SiemensSeq%\\", "")
        .replace("%CustomerSeq%\\", "")
        or None,
        "protocol": yaps.get("tProtocolName"),
        "trajectory": _TRAJECTORIES.get(
            int(traj) if isinstance(traj, int | float) else 1, f"code {traj}"
        ),
        "recon_matrix": [base, lines, 1],
        "recon_fov_mm": fov if all(isinstance(v, int | float) for v in fov) else None,
        "slice_thickness_mm": first.get("dThickness"),
        "readout_oversampling": float(os_factor)
        if isinstance(os_factor, int | float) and os_factor >= 1
        else 1.0,
        "acceleration": [
            float(_get(yaps, "sPat", "lAccelFactPE", default=1) or 1),
            float(_get(yaps, "sPat", "lAccelFact3D", default=1) or 1),
        ],
        "epi_factor": _get(yaps, "sFastImaging", "lEPIFactor", default=1),
        "partitions": _get(yaps, "sKSpace", "lPartitions"),
        "dimension": {1: "1-D", 2: "2-D", 4: "3-D"}.get(_get(yaps, "sKSpace", "ucDimension"), None),
        "patient_position": meas.get("tPatientPosition") or meas.get("sPatPosition") or None,
        "dwell_time_us": (
            float(_get(yaps, "sRXSPEC", "alDwellTime")[0]) / 1000.0
            if isinstance(_get(yaps, "sRXSPEC", "alDwellTime"), list)
            else None
        ),
    }


def load_twix(path: str | Path) -> KSpace:
    """Read a Siemens twix ``.dat`` file into :class:`KSpace` (rows phase encoding, columns readout).

    Parameters
    ----------
    path : str or Path
        The ``.dat`` file (the last measurement of a multi-raid file is read).

    Returns
    -------
    KSpace
        ``data`` (coils, Z, ky, kx) complex64 on the grid of
        :func:`~medrecon.datasets.readouts.assemble_kspace` (readout still oversampled, an
        asymmetric echo not filled: see :mod:`medrecon.datasets.raw_steps`); ``mask`` the measured
        samples; ``noise`` the noise scan or None; ``calibration`` the reference lines or None;
        ``header["raw"]`` (module docstring of :mod:`~medrecon.datasets.readouts`).

    Raises
    ------
    InputError
        Missing, truncated or corrupt file; EPI (reversed lines, phase-correction navigators);
        a non-Cartesian trajectory; 3-D partitions, several echoes or repetitions.

    Examples
    --------
    >>> ksp = load_twix("meas_MID00042_gre.dat")  # doctest: +SKIP
    >>> ksp.header["raw"]["readout_oversampling"]  # doctest: +SKIP
    2.0
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such file")
    _check_container(p)
    scan = _read(p)
    raw = _header(scan["hdr"])
    if raw["trajectory"] != "cartesian":
        raise InputError(
            p,
            f"{raw['trajectory']} trajectory (non-Cartesian): not supported; medrecon reads Cartesian "
            "2-D and multi-slice scans",
        )
    readouts: list[Readout] = []
    noise: list[np.ndarray] = []
    centre_lines: set[int] = set()
    epi = {"REFLECT": 0, "PHASCOR": 0}
    for k, mdb in enumerate(scan["mdb"]):
        if any(mdb.is_flag_set(f) for f in ("SYNCDATA", "ACQEND")):
            continue
        for flag in epi:
            epi[flag] += bool(mdb.is_flag_set(flag))
        if any(mdb.is_flag_set(f) for f in _SKIPPED) or mdb.is_flag_set("PHASCOR"):
            continue
        try:
            samples = np.array(mdb.data, dtype=np.complex64)
        except Exception as err:  # noqa: BLE001 - a short buffer at the end of a truncated file
            raise InputError(
                p,
                f"truncated or corrupt: measurement data block {k + 1} cannot be read "
                f"({type(err).__name__})",
            ) from err
        if (
            samples.ndim != 2
            or samples.shape != (mdb.mdh.UsedChannels, mdb.mdh.SamplesInScan)
            or 0 in samples.shape
        ):
            raise InputError(
                p,
                f"truncated or corrupt: measurement data block {k + 1} holds {samples.shape} samples; "
                f"its header says {mdb.mdh.UsedChannels} coils × {mdb.mdh.SamplesInScan}",
            )
        if mdb.is_flag_set("NOISEADJSCAN"):
            noise.append(samples)
            continue
        calibration = bool(mdb.is_flag_set("PATREFSCAN") or mdb.is_flag_set("PATREFANDIMASCAN"))
        imaging = mdb.is_image_scan()
        centre = int(mdb.mdh.CenterCol)
        if not 0 <= centre < samples.shape[1]:
            raise InputError(
                p,
                f"measurement data block {k + 1}: centre sample {centre} outside its "
                f"{samples.shape[1]} samples",
            )
        centre_lines.add(int(mdb.mdh.CenterLin))
        readouts.append(
            Readout(
                samples,
                int(mdb.cLin),
                int(mdb.cSlc),
                centre,
                calibration,
                imaging,
                partition=int(mdb.cPar),
                contrast=int(mdb.cEco),
                repetition=int(mdb.cRep),
                phase=int(mdb.cPhs),
                set=int(mdb.cSet),
                average=int(mdb.cAve),
                geometry=_geometry(mdb),
            )
        )
    if epi["REFLECT"] or epi["PHASCOR"]:
        raise InputError(
            p,
            f"EPI ({epi['REFLECT']} reversed lines, {epi['PHASCOR']} phase-correction navigators): "
            "not supported; line reversal and navigator phase correction are not built",
        )
    if not readouts:
        raise InputError(p, "holds no imaging readouts")
    centre = (
        max(centre_lines, key=lambda c: sum(r.line == c for r in readouts))
        if len(centre_lines) > 1
        else next(iter(centre_lines))
    )
    ksp = assemble_kspace(p, readouts, noise, header=raw, centre_line=centre)
    raw = ksp.header["raw"]
    ny, nx = raw["grid"]
    base, lines = raw["recon_matrix"][:2]
    expect = (int(round(nx / raw["readout_oversampling"])), ny)
    if (
        isinstance(base, int | float)
        and isinstance(lines, int | float)
        and (int(base), int(lines)) != expect
    ):
        raw["header_mismatch"] = (
            f"protocol matrix {int(base)}×{int(lines)} (readout × phase), data "
            f"{expect[0]}×{expect[1]}: the data's grid is used"
        )
        raw["recon_matrix"] = [expect[0], expect[1], 1]
    return ksp
