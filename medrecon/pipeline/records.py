"""Completion records: a case is done only when ``records/<case>.done.json`` exists and every
output it lists still has the recorded sha256.

A record is written last, atomically (temporary file, fsync, rename), after all the case's
outputs are in place, so a run killed at any moment leaves either a complete case with its record
or no record; the next run redoes exactly the cases without a valid record.  Failures are kept in
``records/<case>.failed.json`` (with the reason) and retried by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medrecon.datasets._atomic import open_temp
from medrecon.pipeline.case import ReconstructConfig
from medrecon.priors.prior import sha256_file

__all__ = ["sha256_file", "config_hash", "write_record", "read_valid_record", "clean_partial",
           "record_path", "failure_path"]


def config_hash(cfg: ReconstructConfig) -> str:
    """sha256 of the settings that change a case's result (not progress bars or overwrite)."""
    d = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "overwrite", "out")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def record_path(out_dir: str | Path, case_id: str) -> Path:
    return Path(out_dir) / "records" / f"{case_id}.done.json"


def failure_path(out_dir: str | Path, case_id: str) -> Path:
    return Path(out_dir) / "records" / f"{case_id}.failed.json"


def atomic_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary name, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_temp(path.parent, ".json.tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_record(out_dir: str | Path, cfg: ReconstructConfig, case_record: dict[str, Any], files: list[str]) -> Path:
    """Write the completion record of a finished case (sha256 of every output file)."""
    out = Path(out_dir)
    outputs = {}
    for f in files:
        p = Path(f)
        outputs[os.path.relpath(p.resolve(), out.resolve())] = sha256_file(p)
    record = {
        "case_id": cfg.case_id,
        "config_sha256": config_hash(cfg),
        "finished_unix": time.time(),
        "outputs": outputs,
        "summary": case_record,
    }
    path = record_path(out, str(cfg.case_id))
    atomic_json(path, record)
    failure_path(out, str(cfg.case_id)).unlink(missing_ok=True)
    return path


def read_valid_record(out_dir: str | Path, cfg: ReconstructConfig) -> dict[str, Any] | None:
    """The case's completion record when it is valid for ``cfg`` and every output matches its sha256."""
    out = Path(out_dir)
    path = record_path(out, str(cfg.case_id))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("config_sha256") != config_hash(cfg) or not record.get("outputs"):
        return None
    for rel, digest in record["outputs"].items():
        f = out / rel
        if not f.is_file() or sha256_file(f) != digest:
            return None
    return record


def clean_partial(case_dir: str | Path) -> None:
    """Remove temporary files a killed run may have left in a case folder."""
    import shutil

    d = Path(case_dir)
    if not d.is_dir():
        return
    for p in list(d.iterdir()):
        if ".tmp" in p.name or ".old-" in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
