"""medrecon next to a PACS: DICOMweb and DIMSE source and sink (see docs/pacs.md).

URLs: ``dicomweb+http(s)://host:port/dicom-web`` and ``dimse://AET@host:port``.  Credentials come
from the environment or a 0600 TOML file (:mod:`medrecon.pacs.credentials`), never from the
command line.  Results go back into the original study as new series with deterministic UIDs
(:mod:`medrecon.pacs.derived`), so re-runs add nothing twice.

For the batch pipeline: :func:`iter_pacs_cases` (source: one case per series, ``case.pull(dir)``)
and :class:`PacsSink` (``sink.store_series(dir)``); :func:`reconstruct_study_to_pacs` does one
series end to end and :func:`pacs_batch` a whole query.
"""

from __future__ import annotations

from medrecon.pacs._errors import (
    PacsAuthError,
    PacsError,
    PacsRequestError,
    PacsUnavailableError,
    PacsUrlError,
)
from medrecon.pacs.client import PacsClient, SeriesRef, check_uploadable, open_pacs, parse_query, series_case_id
from medrecon.pacs.credentials import Credentials, config_path, load_credentials
from medrecon.pacs.derived import derived_series_uid, derived_sop_uid, write_derived_series
from medrecon.pacs.retry import RetryPolicy
from medrecon.pacs.url import PacsUrl, parse_pacs_url
from medrecon.pacs.workflow import (
    PacsCase,
    PacsSink,
    RetroSettings,
    StoreResult,
    iter_pacs_cases,
    pacs_batch,
    pull_series,
    push_folder,
    reconstruct_study_to_pacs,
)

__all__ = [
    "PacsError", "PacsAuthError", "PacsRequestError", "PacsUnavailableError", "PacsUrlError",
    "PacsClient", "SeriesRef", "open_pacs", "parse_query", "series_case_id", "check_uploadable",
    "Credentials", "load_credentials", "config_path",
    "derived_series_uid", "derived_sop_uid", "write_derived_series",
    "RetryPolicy", "PacsUrl", "parse_pacs_url",
    "PacsCase", "PacsSink", "RetroSettings", "StoreResult", "iter_pacs_cases", "pacs_batch",
    "pull_series", "push_folder", "reconstruct_study_to_pacs",
]
