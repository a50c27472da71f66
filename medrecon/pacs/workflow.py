"""PACS source and sink for batch reconstruction, and the one-series library call.

* :func:`iter_pacs_cases` — query a PACS, yield one :class:`PacsCase` per series (medrecon's own
  derived series are left out), each able to :meth:`PacsCase.pull` itself into a folder
  atomically.
* :class:`PacsSink` — store a folder of DICOM files, checking first which SOP instances the PACS
  already holds (with the deterministic UIDs of :mod:`medrecon.pacs.derived`, a re-run or a
  resumed run stores each result exactly once).
* :func:`reconstruct_study_to_pacs` — pull a series, reconstruct it retrospectively (simulate the
  incomplete measurement from the images, then reconstruct), push the result back into the
  original study.
* :func:`pacs_batch` — the above for every series a query finds; a failing series is recorded with
  its reason and the batch goes on.

Logs and reports name cases by :func:`medrecon.pacs.series_case_id` (a hash), never by patient.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medrecon.datasets._atomic import open_temp
from medrecon.errors import InputError, MedreconError, SettingsError
from medrecon.pacs._errors import PacsRequestError
from medrecon.pacs.client import PacsClient, SeriesRef, check_uploadable, open_pacs, series_case_id
from medrecon.pacs.credentials import Credentials
from medrecon.pacs.derived import derived_series_uid, derived_sop_uid, write_derived_series
from medrecon.pacs.retry import RetryPolicy
from medrecon.pacs.url import parse_pacs_url

__all__ = ["RetroSettings", "PacsCase", "iter_pacs_cases", "PacsSink", "StoreResult",
           "reconstruct_study_to_pacs", "pacs_batch", "pull_series", "push_folder"]

log = logging.getLogger("medrecon.pacs")

#: SeriesDescription prefix of medrecon's derived series (never used as input by a batch)
DERIVED_PREFIX = "medrecon "


@dataclass(frozen=True)
class RetroSettings:
    """A retrospective reconstruction: the measurement is simulated from the PACS images.

    Attributes
    ----------
    method : str
        A method of :func:`medrecon.reconstruct` (classical today: fbp, tv, cg, …).
    views : int
        CT: equally spaced parallel-beam views on [0, π).
    acceleration, center_fraction, mask : MRI undersampling (see ``medrecon.operators.mri_mask``).
    noise : float
        Gaussian measurement noise, fraction of the measurement RMS.
    iters : int or None
        Iterations of iterative methods (None: the method's default).
    prior : str or None
        Prior name of a diffusion method (default: the modality's shipped prior); named in
        SeriesDescription.
    samples, steps : int or None
        Diffusion methods: posterior samples (the uncertainty series is their std) and steps N.
    max_size : int or None
        Block-average in-plane so that neither side exceeds this (quick looks, tests).
    max_slices : int or None
        Keep only this many central slices (quick looks, tests).
    seed : int
    """

    method: str = "fbp"
    views: int = 23
    acceleration: float = 4.0
    center_fraction: float = 0.08
    mask: str = "equispaced"
    noise: float = 0.0
    iters: int | None = None
    prior: str | None = None
    samples: int | None = None
    steps: int | None = None
    max_size: int | None = None
    max_slices: int | None = None
    seed: int = 0

    def key(self) -> dict[str, Any]:
        """The settings that go into the derived UIDs (everything but the method)."""
        d = asdict(self)
        d.pop("method")
        return d


@dataclass(frozen=True)
class StoreResult:
    stored: int = 0
    already_present: int = 0


@dataclass
class PacsCase:
    """One series of a PACS query: a case of the batch pipeline.

    ``case_id`` is the hash to use in logs, file names and reports.  ``pull(folder)`` downloads
    the series into ``folder`` atomically (into ``folder.partial`` first, renamed at the end).
    """

    source: str
    ref: SeriesRef
    credentials: Credentials | None = None
    retry: RetryPolicy | None = None
    _client: PacsClient | None = field(default=None, repr=False)

    @property
    def case_id(self) -> str:
        return self.ref.case_id

    def pull(self, folder: str | Path) -> Path:
        client = self._client or open_pacs(self.source, self.credentials, self.retry)
        return pull_series(client, self.ref, Path(folder))


def iter_pacs_cases(
    source_url: str, query: str | Mapping[str, str] | None = None, *,
    credentials: Credentials | None = None, retry: RetryPolicy | None = None,
    include_derived: bool = False,
) -> Iterator[PacsCase]:
    """One :class:`PacsCase` per series matching ``query`` on ``source_url``.

    ``query`` is ``"ModalitiesInStudy=CT&StudyDate=20240101-"`` or a dict of DICOM keywords.
    Series medrecon wrote (SeriesDescription ``medrecon …``) are skipped unless
    ``include_derived``.
    """
    client = open_pacs(source_url, credentials, retry)
    for ref in client.search_series(query):
        if not include_derived and ref.description.startswith(DERIVED_PREFIX):
            continue
        yield PacsCase(source_url, ref, credentials, retry, client)


def pull_series(client: PacsClient, ref: SeriesRef, folder: Path) -> Path:
    """Download one series into ``folder`` (must not exist) atomically; returns ``folder``."""
    folder = Path(folder)
    if folder.exists():
        raise InputError(folder, "already exists; pulls never overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(folder.name + ".partial")
    try:
        client.retrieve_series(ref.study_uid, ref.series_uid, partial)
        os.replace(partial, folder)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def _dicom_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(folder, "is not a folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


class PacsSink:
    """Store folders of DICOM files in a PACS, each SOP instance once.

    Before storing, the sink asks the PACS which SOP Instance UIDs of each series it already
    holds and sends only the others, so a re-run (or a run resumed after ``kill -9``) adds
    nothing twice.  Use it for results written by
    :func:`medrecon.pacs.derived.write_derived_series` (deterministic UIDs).
    """

    def __init__(self, url: str, credentials: Credentials | None = None,
                 retry: RetryPolicy | None = None, client: PacsClient | None = None):
        self.url = parse_pacs_url(url)
        self.client = client or open_pacs(self.url, credentials, retry)

    def store_series(self, folder: str | Path) -> StoreResult:
        """Store every DICOM file under ``folder`` (refused whole if one lacks its UIDs)."""
        items = check_uploadable(_dicom_files(Path(folder)))
        by_series: dict[tuple[str, str], list[tuple[Path, str]]] = {}
        for p, ds in items:
            by_series.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), []).append(
                (p, str(ds.SOPInstanceUID)))
        stored = present = 0
        for (study, series), files in by_series.items():
            have = self.client.instance_uids(study, series)
            todo = [p for p, sop in files if sop not in have]
            present += len(files) - len(todo)
            if todo:
                stored += self.client.store_files(todo)
        return StoreResult(stored, present)

    def has_instances(self, study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> bool:
        """True when the PACS holds every one of ``sop_uids`` in that series."""
        return set(sop_uids) <= self.client.instance_uids(study_uid, series_uid)


def push_folder(url: str, folder: str | Path, *, credentials: Credentials | None = None,
                retry: RetryPolicy | None = None) -> StoreResult:
    """``medrecon pacs push``: store a folder of DICOM files (instances already there are skipped)."""
    return PacsSink(url, credentials, retry).store_series(folder)


# ------------------------------------------------------------------------------ reconstruction
def _shrink(vol: Any, max_size: int | None, max_slices: int | None) -> Any:
    """Central ``max_slices`` slices and in-plane block averaging to ≤ ``max_size``; every slice
    keeps its exact position (:func:`medrecon.datasets.subset_volume`)."""
    from medrecon.datasets import subset_volume

    nz = vol.shape[0]
    z0, z1 = 0, nz
    if max_slices is not None and nz > max_slices:
        if max_slices < 1:
            raise SettingsError(f"max_slices must be >= 1, got {max_slices}")
        z0 = (nz - max_slices) // 2
        z1 = z0 + max_slices
    f = 1
    if max_size is not None:
        if max_size < 8:
            raise SettingsError(f"max_size must be >= 8, got {max_size}")
        f = max(1, math.ceil(max(vol.shape[1:]) / max_size))
    return subset_volume(vol, slice(z0, z1), f)


def _reconstruct_volume(vol: Any, s: RetroSettings) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    import torch

    from medrecon.api import reconstruct
    from medrecon.pipeline.problems import retrospective_operator, simulate_measurement

    x = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[:, None]
    A = retrospective_operator(x.shape[-2:], vol.modality, seed=s.seed, views=s.views, mask=s.mask,  # noqa: N806
                               acceleration=s.acceleration, center_fraction=s.center_fraction)
    y = simulate_measurement(x, A, s.noise, s.seed)
    kw: dict[str, Any] = {} if s.iters is None else {"iters": s.iters}
    if _gives_std(s.method):
        kw = {"prior": s.prior, "n_samples": s.samples or 4, "steps": s.steps}
    rec = reconstruct(y, A, method=s.method, seed=s.seed, **kw)
    mean = rec.mean.abs() if rec.mean.is_complex() else rec.mean
    std = None if rec.std is None else rec.std[:, 0].numpy().astype(np.float32)
    return mean[:, 0].numpy().astype(np.float32), std, dict(rec.info)


def _gives_std(method: str) -> bool:
    from medrecon.api import METHODS

    return method not in METHODS  # classical methods return std = None


def _find_series(client: PacsClient, series_uid: str) -> SeriesRef:
    found = [r for r in client.search_series({"SeriesInstanceUID": series_uid}) if r.series_uid == series_uid]
    if not found:
        raise PacsRequestError(f"{client.url.display()} holds no series {series_case_id(series_uid)}")
    return found[0]


def reconstruct_study_to_pacs(
    source_url: str, series_uid: str, sink_url: str | None = None, method: str = "fbp", *,
    study_uid: str | None = None, settings: RetroSettings | None = None,
    credentials: Credentials | None = None, sink_credentials: Credentials | None = None,
    retry: RetryPolicy | None = None, work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Pull one series, reconstruct it retrospectively, store the result in the original study.

    Parameters
    ----------
    source_url, sink_url : str
        PACS URLs (``sink_url`` defaults to ``source_url``).
    series_uid, study_uid : str
        The input series (the study is looked up when not given).
    method : str
        Reconstruction method; overrides ``settings.method``.
    settings : RetroSettings
        Simulation and reconstruction settings; they and the method determine the derived UIDs.
    credentials, sink_credentials : Credentials, optional
        Default: :func:`medrecon.pacs.load_credentials` for each URL.
    retry : RetryPolicy, optional
    work_dir : path, optional
        Where the series is pulled (a temporary folder, removed at the end, by default).

    Returns
    -------
    dict
        ``case_id``, ``status`` (``"stored"`` or ``"already-stored"``), ``stored`` and
        ``already_present`` instance counts, ``derived`` series UIDs, ``slices``, ``info``.

    Raises
    ------
    MedreconError
        PACS errors (:class:`PacsAuthError`, :class:`PacsUnavailableError`, …), unreadable series,
        bad settings.
    """
    s = settings or RetroSettings()
    if method != s.method:
        s = RetroSettings(**{**asdict(s), "method": method})
    from medrecon.api import METHODS

    if s.method in METHODS and s.prior:
        raise SettingsError(f"method {s.method!r} uses no prior; leave prior unset")
    sink_url = sink_url or source_url
    case = series_case_id(series_uid)
    t0 = time.perf_counter()
    src = open_pacs(source_url, credentials, retry)
    sink = PacsSink(sink_url, sink_credentials if sink_credentials is not None else
                    (credentials if sink_url == source_url else None), retry,
                    client=src if sink_url == source_url else None)
    ref = SeriesRef(study_uid, series_uid) if study_uid else _find_series(src, series_uid)
    own_tmp = work_dir is None
    base = Path(tempfile.mkdtemp(prefix="medrecon-pacs-")) if own_tmp else Path(work_dir)
    base.mkdir(parents=True, exist_ok=True)
    case_dir = Path(tempfile.mkdtemp(prefix=f"{case}-", dir=base))
    try:
        from medrecon.datasets import Volume, load_dicom_series

        folder = pull_series(src, ref, case_dir / "input")
        vol = _shrink(load_dicom_series(folder, series_uid=series_uid), s.max_size, s.max_slices)
        kinds = ["reconstruction"] + (["uncertainty"] if _gives_std(s.method) else [])
        derived = {k: derived_series_uid(series_uid, s.method, s.key(), k) for k in kinds}  # type: ignore[arg-type]
        nz = vol.shape[0]
        if all(sink.has_instances(ref.study_uid, uid, [derived_sop_uid(uid, k) for k in range(nz)])
               for uid in derived.values()):
            log.info("%s: result already in %s; nothing to do", case, sink.url.display())
            return {"case_id": case, "status": "already-stored", "stored": 0, "already_present": nz * len(derived),
                    "derived": derived, "slices": nz, "wall_time_s": round(time.perf_counter() - t0, 3)}
        mean, std, info = _reconstruct_volume(vol, s)
        out = case_dir / "derived"
        out.mkdir()
        from medrecon.pipeline.outputs import describe_simulation

        simulated = describe_simulation(vol.modality, views=s.views, acceleration=s.acceleration, mask=s.mask,
                                        center_fraction=s.center_fraction, noise=s.noise)
        write_derived_series(Volume(mean, vol.affine, vol.modality, vol.meta), out / "reconstruction",
                             input_series_uid=series_uid, method=s.method, settings=s.key(), prior=s.prior,
                             simulated=simulated)
        if std is not None:
            derived["uncertainty"] = write_derived_series(
                Volume(std, vol.affine, vol.modality, vol.meta), out / "uncertainty",
                input_series_uid=series_uid, method=s.method, settings=s.key(), prior=s.prior,
                kind="uncertainty", simulated=simulated)[0]
        result = sink.store_series(out)
        log.info("%s: stored %d instances (%d already present) in %s", case, result.stored,
                 result.already_present, sink.url.display())
        return {"case_id": case, "status": "stored", "stored": result.stored,
                "already_present": result.already_present, "derived": derived, "slices": nz,
                "info": {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))},
                "wall_time_s": round(time.perf_counter() - t0, 3)}
    finally:
        shutil.rmtree(base if own_tmp else case_dir, ignore_errors=True)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for sec in secrets:
        if sec:
            text = text.replace(sec, "***")
    return text


def _write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_temp(path.parent, ".json.tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(report, fh, indent=2)
    os.replace(tmp, path)


def pacs_batch(
    source_url: str, sink_url: str | None = None, query: str | Mapping[str, str] | None = None, *,
    settings: RetroSettings | None = None, report: str | Path | None = None,
    credentials: Credentials | None = None, sink_credentials: Credentials | None = None,
    retry: RetryPolicy | None = None, work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Reconstruct every series ``query`` finds on ``source_url`` into ``sink_url``.

    A series that fails (PACS error after retries, unreadable series, unsupported modality) is
    recorded with its reason and the batch goes on.  ``report`` (JSON, rewritten atomically after
    every case, so a killed batch leaves a valid one) lists cases by hashed ID only.  Re-running
    the same batch stores nothing twice.

    Returns the report: ``{"cases": [...], "n_ok": …, "n_failed": …}``.
    """
    from medrecon.pacs.credentials import load_credentials

    s = settings or RetroSettings()
    src_url = parse_pacs_url(source_url)
    creds = credentials if credentials is not None else load_credentials(src_url)
    secrets = creds.secrets() + (sink_credentials.secrets() if sink_credentials else [])
    out: dict[str, Any] = {"source": src_url.display(),
                           "sink": parse_pacs_url(sink_url or source_url).display(),
                           "method": s.method, "settings": s.key(), "cases": [], "n_ok": 0, "n_failed": 0}
    report_path = Path(report) if report else None
    for case in iter_pacs_cases(source_url, query, credentials=creds, retry=retry):
        entry: dict[str, Any] = {"case_id": case.case_id, "modality": case.ref.modality}
        try:
            rec = reconstruct_study_to_pacs(
                source_url, case.ref.series_uid, sink_url, s.method, study_uid=case.ref.study_uid,
                settings=s, credentials=creds, sink_credentials=sink_credentials, retry=retry,
                work_dir=work_dir)
            entry.update(rec)
            out["n_ok"] += 1
        except MedreconError as err:
            entry.update(status="failed", reason=_scrub(str(err), secrets), error=type(err).__name__)
            out["n_failed"] += 1
            log.warning("%s: failed: %s", case.case_id, entry["reason"])
        out["cases"].append(entry)
        if report_path is not None:
            _write_report(report_path, out)
    if report_path is not None:
        _write_report(report_path, out)
    return out
