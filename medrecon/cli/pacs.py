"""``medrecon pacs``: list, pull, push and batch-reconstruct against a PACS (docs/pacs.md).

    medrecon pacs ls URL [--query "ModalitiesInStudy=CT&StudyDate=20240101-"]
    medrecon pacs pull URL STUDY_UID --out DIR
    medrecon pacs push URL DIR
    medrecon pacs batch URL [--sink URL] [--query ...] [--method fbp] [--report FILE]

Credentials come from MEDRECON_PACS_* environment variables or the 0600 credentials file, never
from the command line.  Exit codes: 0 success, 2 bad input, refused credentials or an unreachable
PACS (one line on stderr), 3 a batch finished with failed series.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from medrecon.errors import MedreconError

__all__ = ["pacs_main"]

URL_HELP = "dicomweb+http(s)://host:port/dicom-web or dimse://AET@host:port"
EPILOG = """credentials (never on the command line):
  MEDRECON_PACS_USER + MEDRECON_PACS_PASSWORD, or MEDRECON_PACS_TOKEN; MEDRECON_PACS_CA_BUNDLE;
  MEDRECON_PACS_AET (our DIMSE AE title); or the file MEDRECON_PACS_CONFIG /
  ~/.config/medrecon/pacs.toml (chmod 600).  See docs/pacs.md.
examples:
  medrecon pacs ls dicomweb+http://127.0.0.1:8042/dicom-web --query "ModalitiesInStudy=CT"
  medrecon pacs pull dimse://ORTHANC@127.0.0.1:4242 1.2.840.113619.2.55.3 --out study
  medrecon pacs batch dicomweb+http://127.0.0.1:8042/dicom-web --query "ModalitiesInStudy=CT" \\
      --method fbp --views 60 --report batch.json
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medrecon pacs", description="Work with studies in a PACS.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--retries", type=int, default=4, help="attempts per request (default 4)")
        sp.add_argument("--retry-delay", type=float, default=1.0,
                        help="first back-off delay in s, doubled per attempt (default 1)")

    ls = sub.add_parser("ls", help="list the series a query finds")
    ls.add_argument("url", help=URL_HELP)
    ls.add_argument("--query", default="", help='e.g. "ModalitiesInStudy=CT&StudyDate=20240101-"')
    ls.add_argument("--all", action="store_true", help="also list medrecon's own derived series")
    common(ls)
    pull = sub.add_parser("pull", help="download every series of a study into DIR/<case-id>/")
    pull.add_argument("url", help=URL_HELP)
    pull.add_argument("study", help="StudyInstanceUID")
    pull.add_argument("--out", required=True, help="output folder")
    common(pull)
    push = sub.add_parser("push", help="store a folder of DICOM files (instances already there are skipped)")
    push.add_argument("url", help=URL_HELP)
    push.add_argument("folder")
    common(push)
    b = sub.add_parser("batch", help="reconstruct every series a query finds; results go back into their studies")
    b.add_argument("url", help="source PACS: " + URL_HELP)
    b.add_argument("--sink", help="PACS to store results in (default: the source)")
    b.add_argument("--query", default="", help='e.g. "ModalitiesInStudy=CT&StudyDate=20240101-"')
    b.add_argument("--method", default="fbp",
                   help="fbp | tv | cg | zero-filled | l1-wavelet | ccdf | song | dps | mbir3d (default fbp)")
    b.add_argument("--views", type=int, default=23, help="CT: simulated parallel-beam views (default 23)")
    b.add_argument("--acceleration", type=float, default=4.0, help="MRI: undersampling factor")
    b.add_argument("--iters", type=int, help="iterations of iterative methods")
    b.add_argument("--prior", help="diffusion methods: prior name (default: the modality's shipped prior)")
    b.add_argument("--samples", type=int, help="diffusion methods: posterior samples (default 4)")
    b.add_argument("--steps", type=int, help="diffusion methods: steps N")
    b.add_argument("--max-size", type=int, help="downsample in-plane to at most this many pixels")
    b.add_argument("--max-slices", type=int, help="reconstruct only this many central slices")
    b.add_argument("--report", help="JSON report of the batch (cases by hashed ID)")
    b.add_argument("--work-dir", help="where series are pulled (default: a temporary folder)")
    common(b)
    return p


def _secrets() -> list[str]:
    return [v for k in ("MEDRECON_PACS_PASSWORD", "MEDRECON_PACS_TOKEN") if (v := os.environ.get(k))]


def _say(text: str) -> None:
    for s in _secrets():
        text = text.replace(s, "***")
    print(text, file=sys.stderr)


def pacs_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``medrecon pacs …``; returns the exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logger = logging.getLogger("medrecon.pacs")
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("medrecon pacs: %(message)s"))
        logger.addHandler(h)
        logger.propagate = False
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return _run(args)
    except MedreconError as err:
        _say(f"medrecon pacs {args.action}: error: {err}")
        return 2


def _run(a: argparse.Namespace) -> int:
    from medrecon.pacs import (
        PacsSink,
        RetroSettings,
        RetryPolicy,
        iter_pacs_cases,
        open_pacs,
        pacs_batch,
        pull_series,
    )

    retry = RetryPolicy(attempts=a.retries, base_delay_s=a.retry_delay)
    if a.action == "ls":
        cases = list(iter_pacs_cases(a.url, a.query, retry=retry, include_derived=a.all))
        print(f"{'case':16} {'mod':4} {'inst':>5}  {'StudyInstanceUID':64} {'SeriesInstanceUID':64} description")
        for c in cases:
            r = c.ref
            print(f"{c.case_id:16} {r.modality:4} {r.n_instances if r.n_instances is not None else '?':>5}  "
                  f"{r.study_uid:64} {r.series_uid:64} {r.description}")
        print(f"{len(cases)} series", file=sys.stderr)
        return 0
    if a.action == "pull":
        client = open_pacs(a.url, retry=retry)
        refs = [r for r in client.search_series({"StudyInstanceUID": a.study}) if r.study_uid == a.study]
        if not refs:
            _say(f"medrecon pacs pull: error: {client.url.display()} holds no study {a.study}")
            return 2
        out = Path(a.out)
        for r in refs:
            target = out / r.case_id
            if target.exists():
                print(f"{r.case_id}: {target} exists; skipped", file=sys.stderr)
                continue
            pull_series(client, r, target)
            print(f"{r.case_id}: {r.modality} series -> {target}")
        return 0
    if a.action == "push":
        res = PacsSink(a.url, retry=retry).store_series(a.folder)
        print(f"stored {res.stored} instances ({res.already_present} already present)")
        return 0
    settings = RetroSettings(method=a.method, views=a.views, acceleration=a.acceleration, iters=a.iters,
                             prior=a.prior, samples=a.samples, steps=a.steps,
                             max_size=a.max_size, max_slices=a.max_slices)
    rep = pacs_batch(a.url, a.sink, a.query, settings=settings, report=a.report, retry=retry,
                     work_dir=a.work_dir)
    for c in rep["cases"]:
        if c["status"] == "failed":
            print(f"{c['case_id']}: FAILED ({c['error']}): {c['reason']}")
        else:
            print(f"{c['case_id']}: {c['status']} ({c['stored']} stored, {c['already_present']} already present)")
    print(f"{rep['n_ok']} series done, {rep['n_failed']} failed" + (f"; report {a.report}" if a.report else ""))
    return 3 if rep["n_failed"] else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pacs_main())
