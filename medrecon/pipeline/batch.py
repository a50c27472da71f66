"""``medrecon batch``: run many cases, resumably, and summarise them.

Layout of the output folder::

    cases/<case>/<case>_<method>.nii.gz|_dicom/, _std.*, .png, _thumb.png, .json
    records/<case>.done.json       completion record (sha256 of every output)
    records/<case>.failed.json     the reason of a failed case (retried by the next run)
    summary.csv, summary.json      one row per case
    report.html                    table with thumbnails and links to the figures
    batch.log                      one line per case: ID, input (relative), description, result

Re-running skips every case whose completion record is valid for the same settings and whose
outputs still match their checksums; everything else is (re)computed.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrecon.datasets._atomic import open_temp
from medrecon.pipeline.case import ReconstructConfig
from medrecon.pipeline.executors import run_dask, run_local
from medrecon.pipeline.manifest import CaseSpec, read_cases
from medrecon.pipeline.records import atomic_json, clean_partial, read_valid_record

__all__ = ["BatchConfig", "BatchResult", "run_batch", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ("case_id", "input", "description", "status", "reused", "modality", "method", "psnr", "ssim",
                   "wall_time_s", "reason", "figure", "thumb", "std_thumb", "record")


@dataclass(frozen=True)
class BatchConfig:
    """Settings of a batch.

    Attributes
    ----------
    source : str
        Manifest CSV or folder (see :mod:`medrecon.pipeline.manifest`).
    out : str
        Output folder.
    defaults : ReconstructConfig
        Settings of every case that the manifest does not set.
    workers : int
        0: local executor; N > 0: a Dask LocalCluster with N worker processes.
    scheduler : str or None
        Join an existing Dask scheduler (``tcp://host:port``) instead.
    progress : bool
        Progress bar over the cases.
    """

    source: str
    out: str = "medrecon-batch"
    defaults: ReconstructConfig = field(default_factory=ReconstructConfig)
    workers: int = 0
    scheduler: str | None = None
    progress: bool = False


@dataclass
class BatchResult:
    """Rows of the summary (manifest order) and the written summary files."""

    rows: list[dict[str, Any]]
    summary_csv: Path
    summary_json: Path
    report: Path

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def reused(self) -> int:
        return sum(bool(r.get("reused")) for r in self.rows)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_COLUMNS})
    fd, tmp = open_temp(path.parent, ".csv.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(buf.getvalue())
    os.replace(tmp, path)


def _who(spec: CaseSpec) -> str:
    """``case-id [input; description]`` for the log."""
    extra = "; ".join(t for t in (spec.label, spec.description) if t)
    return f"{spec.case_id} [{extra}]" if extra else spec.case_id


def run_batch(cfg: BatchConfig) -> BatchResult:
    """Run (or resume) a batch and write its summary and report.

    Returns
    -------
    BatchResult
        The CLI exits with 3 when ``result.failed`` is not empty.

    Raises
    ------
    InputError
        The manifest or folder cannot be read (no case runs then).
    SettingsError
        A Dask scheduler that cannot be reached.
    """
    from medrecon.report import batch_report

    out = Path(cfg.out)
    specs = read_cases(cfg.source, cfg.defaults, out)
    (out / "cases").mkdir(parents=True, exist_ok=True)  # a failed case removes only its own empty folder
    for folder in (out, out / "records"):  # leftovers of a run killed while writing
        clean_partial(folder)
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    by_id = {s.case_id: s for s in specs}
    for spec in specs:
        done = read_valid_record(out, spec.config)
        if done is not None:
            rows[spec.case_id] = {**done["summary"], "input": spec.label, "description": spec.description,
                                  "reused": True}
        else:
            todo.append(spec)
    if cfg.workers or cfg.scheduler:
        results = run_dask(todo, str(out), workers=cfg.workers or None, scheduler=cfg.scheduler,
                           progress=cfg.progress)
    else:
        results = run_local(todo, str(out), progress=cfg.progress)
    with open(out / "batch.log", "a", encoding="utf-8") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for cid in rows:
            log.write(f"{stamp} {_who(by_id[cid])} skipped (completion record valid)\n")
        for row in results:
            rows[row["case_id"]] = row
            what = f"done in {row['wall_time_s']:.1f} s" if row["status"] == "done" else f"failed: {row['reason']}"
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {_who(by_id[row['case_id']])} {what}\n")
            log.flush()
    ordered = [rows[s.case_id] for s in specs]
    summary_json = out / "summary.json"
    atomic_json(summary_json, {"source_cases": len(specs), "done": sum(r["status"] == "done" for r in ordered),
                               "failed": sum(r["status"] == "failed" for r in ordered), "cases": ordered})
    summary_csv = out / "summary.csv"
    _write_csv(summary_csv, ordered)
    report = batch_report(out / "report.html", ordered, title=f"medrecon batch ({len(ordered)} cases)")
    return BatchResult(ordered, summary_csv, summary_json, report)
