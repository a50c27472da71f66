"""Executors of a batch: local (one case after another) and Dask distributed.

Both run :func:`run_one` per case.  It never raises: a failing case becomes a summary row with
``status = "failed"`` and its reason, whole, on one line (the input's absolute path replaced by the
case ID; the row's ``input`` column shows it relative to the batch), and the other cases go on.
A case's outputs land in ``<out>/cases/<case>/``; its completion record is written last
(:mod:`medrecon.pipeline.records`).
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from medrecon.errors import MedreconError, SettingsError
from medrecon.pipeline.case import run_case
from medrecon.pipeline.manifest import CaseSpec
from medrecon.pipeline.records import atomic_json, clean_partial, failure_path, write_record

__all__ = ["run_one", "run_local", "run_dask"]


def _scrub(text: str, spec: CaseSpec) -> str:
    """One line, never cut short, without the input's absolute path (the folders above a batch
    can be named after a patient)."""
    line = " ".join(str(text).split())
    inp = spec.config.input
    if inp:
        for form in sorted({str(Path(inp).resolve()), str(inp)}, key=len, reverse=True):
            line = line.replace(form, f"<input of {spec.case_id}>")
    return line


def _rel(path: str | None, out_dir: Path) -> str | None:
    return None if path is None else os.path.relpath(Path(path).resolve(), out_dir.resolve())


def _row(spec: CaseSpec, out_dir: Path, record: dict[str, Any] | None, wall: float, reason: str = "") -> dict[str, Any]:
    cfg = spec.config
    row: dict[str, Any] = {
        "case_id": spec.case_id, "input": spec.label, "description": spec.description,
        "status": "failed" if record is None else "done", "reused": False,
        "modality": cfg.modality, "method": cfg.method, "psnr": None, "ssim": None,
        "wall_time_s": round(wall, 3), "reason": reason, "figure": None, "thumb": None, "std_thumb": None,
        "record": None,
    }
    if record is not None:
        outs = record["outputs"]
        row["warnings"] = list(record.get("warnings", []))  # shown in report.html and summary.json
        row["psnr"] = record["metrics"].get("psnr")
        row["ssim"] = record["metrics"].get("ssim")
        stem = f"{spec.case_id}_{cfg.method}"
        pick = {"figure": f"{stem}.png", "thumb": f"{stem}_thumb.png", "std_thumb": f"{stem}_std_thumb.png"}
        for key, name in pick.items():
            row[key] = _rel(next((o for o in outs if Path(o).name == name), None), out_dir)
        row["record"] = _rel(str(Path(cfg.out) / f"{stem}.json"), out_dir)
    return row


def run_one(spec: CaseSpec, out_dir: str) -> dict[str, Any]:
    """Run one case in isolation and return its summary row; never raises.

    Leftovers of an interrupted earlier attempt (temporary files) are removed and the case's
    outputs are rewritten; the completion record is written after them.
    """
    out = Path(out_dir)
    cfg = dataclasses.replace(spec.config, overwrite=True, progress=False)
    t0 = time.perf_counter()
    try:
        clean_partial(cfg.out)
        record = run_case(cfg)
        files = [*record["outputs"], str(Path(cfg.out) / f"{spec.case_id}_{cfg.method}.json")]
        row = _row(spec, out, record, time.perf_counter() - t0)
        write_record(out, spec.config, row, files)
        return row
    except MedreconError as err:
        reason = _scrub(str(err), spec)
    except Exception as err:  # noqa: BLE001 - isolate the case; the reason names the bug
        reason = _scrub(f"{type(err).__name__}: {err}", spec)
    row = _row(spec, out, None, time.perf_counter() - t0, reason)
    try:
        atomic_json(failure_path(out, spec.case_id), row)
    except OSError:
        pass
    return row


def run_local(specs: Sequence[CaseSpec], out_dir: str, progress: bool = False) -> Iterator[dict[str, Any]]:
    """Run the cases one after another in this process."""
    from tqdm import tqdm

    for spec in tqdm(specs, desc="cases", unit="case", disable=not progress):
        yield run_one(spec, out_dir)


def run_dask(
    specs: Sequence[CaseSpec],
    out_dir: str,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = False,
    submit: Callable[..., Any] = run_one,
) -> Iterator[dict[str, Any]]:
    """Run the cases as independent Dask tasks.

    Parameters
    ----------
    workers : int, optional
        Start a LocalCluster with this many single-threaded worker processes.
    scheduler : str, optional
        Address of an existing scheduler (``tcp://host:port``) to join instead; its workers must
        see ``out_dir`` and the inputs at the same paths.

    Yields
    ------
    dict
        Summary rows, in completion order.  A task lost with its worker becomes a failed row.
    """
    import logging

    from distributed import Client, LocalCluster, as_completed
    from tqdm import tqdm

    if not specs:
        return
    cluster = None
    try:
        if scheduler:
            client = Client(scheduler, timeout="20s")
        else:
            cluster = LocalCluster(n_workers=max(1, int(workers or 1)), threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR)
            client = Client(cluster)
    except (OSError, TimeoutError) as err:
        if cluster is not None:
            cluster.close()
        raise SettingsError(f"--scheduler {scheduler}: cannot connect ({err})") from err
    try:
        run = uuid.uuid4().hex[:8]
        futures = client.map(submit, list(specs), out_dir=out_dir, pure=False,
                             key=[f"medrecon-{s.case_id}-{run}" for s in specs])
        by_key = {f.key: s for f, s in zip(futures, specs, strict=True)}
        bar = tqdm(total=len(futures), desc="cases", unit="case", disable=not progress)
        for fut in as_completed(futures):
            bar.update()
            spec = by_key[fut.key]
            if fut.status == "finished":
                yield fut.result()
            else:
                err = fut.exception()
                yield _row(spec, Path(out_dir), None, 0.0, _scrub(f"worker lost or task failed: {err!r}", spec))
        bar.close()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
