"""``medrecon batch``: many cases from a manifest or folder; resumable; local or Dask."""

from __future__ import annotations

import argparse

from medrecon.cli.options import add_recon_options, recon_settings, show_progress

EXAMPLES = """examples:
  medrecon batch cases.csv --out runs/ct23 --modality ct --views 23 --method tv
  medrecon batch DICOM_ROOT --out runs/all --method fbp             # one case per series
  medrecon batch cases.csv --out runs/ct23 --workers 4              # Dask LocalCluster
  medrecon batch cases.csv --out runs/ct23 --scheduler tcp://10.0.0.5:8786
  medrecon batch --source dicomweb+https://pacs:8042/dicom-web --query "ModalitiesInStudy=CT" \
      --sink dicomweb+https://pacs:8042/dicom-web --out runs/pacs --method ccdf --views 23

manifest CSV: a column 'input' (paths relative to the CSV), optional 'case_id', and any
reconstruct setting as a column (modality, method, views, iters, acceleration, slices, ...);
empty cells take the command-line defaults.  Re-running the same command skips finished cases.
Exit status 3 when some cases failed (listed in summary.csv and report.html).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "batch", help="reconstruct many cases (manifest CSV or folder), resumable, local or Dask",
        description="Run one case per manifest row (or per series / file of a folder). Each case is "
        "isolated: a failure is recorded with its reason and the others go on. Outputs are written "
        "atomically with a completion record (sha256 of every output), so an interrupted run resumes.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="MANIFEST.csv|DIR", nargs="?")
    p.add_argument("--source", dest="source_url", metavar="URL",
                   help="a PACS to read series from (dicomweb+http(s)://host:port/dicom-web or dimse://AET@host:port)")
    p.add_argument("--query", default="", help='PACS search, e.g. "ModalitiesInStudy=CT&StudyDate=20240101-"')
    p.add_argument("--sink", metavar="URL", help="PACS to store results in (default: the --source PACS)")
    p.add_argument("--out", required=True, help="output folder (for a PACS batch: the JSON report)")
    p.add_argument("--modality", choices=["ct", "mri"], default="ct", help="default modality (default %(default)s)")
    ex = p.add_mutually_exclusive_group()
    ex.add_argument("--workers", type=int, default=0, help="start a Dask LocalCluster with N worker processes")
    ex.add_argument("--scheduler", help="join an existing Dask cluster, tcp://host:port")
    add_recon_options(p, batch=True)
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> int:
    if a.source_url:
        return _run_pacs(a)
    if not a.source:
        from medrecon.errors import SettingsError

        raise SettingsError("medrecon batch: give a MANIFEST.csv or DIR, or --source URL for a PACS")
    from medrecon.pipeline.batch import BatchConfig, run_batch
    from medrecon.pipeline.case import ReconstructConfig

    defaults = ReconstructConfig(modality=a.modality, **recon_settings(a))
    cfg = BatchConfig(source=a.source, out=a.out, defaults=defaults, workers=a.workers,
                      scheduler=a.scheduler, progress=show_progress())
    res = run_batch(cfg)
    done = sum(r["status"] == "done" for r in res.rows)
    print(f"{len(res.rows)} cases: {done} done ({res.reused} reused from an earlier run), {len(res.failed)} failed")
    for r in res.failed:
        print(f"  {r['case_id']}: {r['reason']}")
    print(f"summary: {res.summary_csv}, {res.summary_json}; report: {res.report}")
    return 3 if res.failed else 0


def _run_pacs(a: argparse.Namespace) -> int:
    """One case per series of a PACS query; results go back to ``--sink`` (see docs/pacs.md)."""
    from pathlib import Path

    from medrecon.pacs.workflow import RetroSettings, pacs_batch

    r = recon_settings(a)
    settings = RetroSettings(
        method=r.get("method") or "fbp", views=r.get("views") or 23, acceleration=r.get("acceleration") or 4.0,
        iters=r.get("iters"), prior=r.get("prior"), samples=r.get("samples"), steps=r.get("steps"),
        seed=r.get("seed") or 0,
    )
    Path(a.out).mkdir(parents=True, exist_ok=True)
    rep = pacs_batch(a.source_url, a.sink, a.query, settings=settings, report=str(Path(a.out) / "pacs-report.json"))
    for c in rep["cases"]:
        state = f"FAILED ({c['error']}): {c['reason']}" if c["status"] == "failed" else c["status"]
        print(f"  {c['case_id']}: {state}")
    print(f"{rep['n_ok']} series done, {rep['n_failed']} failed; report {Path(a.out) / 'pacs-report.json'}")
    return 3 if rep["n_failed"] else 0
