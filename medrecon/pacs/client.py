"""PACS clients: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) through ``dicomweb-client`` and DIMSE
(C-FIND, C-GET, C-STORE) through ``pynetdicom``.  Both expose the same five calls:

``search_series(query)``, ``retrieve_series(study, series, folder)``, ``store_files(paths)``,
``instance_uids(study, series)`` and ``close()``.

Every network call runs under :func:`medrecon.pacs.retry.call_with_retries`.  Error messages name
the server by :meth:`PacsUrl.display` and never quote a credential, a query value or a response
body (which may hold patient data).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from medrecon.errors import InputError, SettingsError
from medrecon.pacs._errors import PacsAuthError, PacsRequestError, PacsUnavailableError
from medrecon.pacs.credentials import Credentials, load_credentials
from medrecon.pacs.retry import RetryPolicy, Transient, call_with_retries
from medrecon.pacs.url import PacsUrl, parse_pacs_url

__all__ = ["SeriesRef", "PacsClient", "open_pacs", "parse_query", "series_case_id", "check_uploadable"]

log = logging.getLogger("medrecon.pacs")

# third-party protocol loggers print identifiers (query keys, C-FIND identifiers with patient
# names) at DEBUG/INFO; keep them at WARNING unless someone set a level on purpose
for _name in ("pynetdicom", "dicomweb_client"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

#: query keys matched at the study level (QIDO-RS studies / C-FIND STUDY); others at the series level
STUDY_KEYS = frozenset({
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "StudyDescription",
    "ReferringPhysicianName",
})


def series_case_id(series_uid: str) -> str:
    """The case ID of a series: ``case-`` + 10 hex digits of the SeriesInstanceUID's sha256."""
    return "case-" + hashlib.sha256(series_uid.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class SeriesRef:
    """One series found on a PACS (no patient data)."""

    study_uid: str
    series_uid: str
    modality: str = ""
    description: str = ""
    n_instances: int | None = None

    @property
    def case_id(self) -> str:
        return series_case_id(self.series_uid)


class PacsClient(Protocol):
    url: PacsUrl

    def search_series(self, query: Mapping[str, str] | None = None) -> list[SeriesRef]: ...
    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> int: ...
    def store_files(self, paths: Sequence[Path]) -> int: ...
    def instance_uids(self, study_uid: str, series_uid: str) -> set[str]: ...
    def close(self) -> None: ...


def parse_query(query: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"ModalitiesInStudy=CT&StudyDate=20240101-"`` → a dict of DICOM keywords to match values.

    Raises
    ------
    SettingsError
        A key that is not a DICOM keyword, or a term without ``=``.
    """
    from urllib.parse import parse_qsl

    from pydicom.datadict import tag_for_keyword

    if query is None or query == "":
        return {}
    if isinstance(query, str):
        if any("=" not in t for t in query.split("&") if t):
            raise SettingsError("--query terms must be KEYWORD=VALUE joined by '&'")
        items = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    else:
        items = dict(query)
    for key in items:
        if tag_for_keyword(key) is None:
            raise SettingsError(f"--query key {key!r} is not a DICOM keyword (e.g. StudyDate, ModalitiesInStudy)")
    return {k: str(v) for k, v in items.items()}


def check_uploadable(paths: Iterable[Path]) -> list[tuple[Path, Any]]:
    """Read every file's header and refuse the lot if one cannot be filed in a PACS.

    Returns ``(path, header)`` pairs.  Raises :class:`InputError` naming the first bad file and how
    many are bad: not DICOM, or lacking SOPClassUID / SOPInstanceUID / StudyInstanceUID /
    SeriesInstanceUID (a PACS files instances by these, so such files are never sent).
    """
    import pydicom

    out, bad = [], []
    for p in paths:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported by name
            bad.append((p, f"not a readable DICOM file ({type(err).__name__})"))
            continue
        missing = [t for t in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
                   if not ds.get(t)]
        if missing:
            bad.append((p, f"lacks {', '.join(missing)}; a PACS cannot file it"))
            continue
        out.append((p, ds))
    if bad:
        more = f" ({len(bad)} of {len(bad) + len(out)} files are unusable; nothing was sent)"
        raise InputError(bad[0][0], bad[0][1] + more)
    if not out:
        raise InputError(Path("."), "no DICOM files to send")
    return out


def open_pacs(url: str | PacsUrl, credentials: Credentials | None = None,
              retry: RetryPolicy | None = None, timeout_s: float = 30.0) -> PacsClient:
    """A client for ``url`` (``dicomweb+http(s)://…`` or ``dimse://AET@host:port``).

    ``credentials`` default to :func:`load_credentials` (environment, then the 0600 file).
    """
    u = parse_pacs_url(url) if isinstance(url, str) else url
    creds = load_credentials(u) if credentials is None else credentials
    policy = retry or RetryPolicy()
    if u.protocol == "dicomweb":
        return DicomWebPacs(u, creds, policy, timeout_s)
    return DimsePacs(u, creds, policy, timeout_s)


def _fresh_dir(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


# --------------------------------------------------------------------------------------- DICOMweb
def _json_value(item: Mapping[str, Any], tag: str) -> Any:
    v = item.get(tag, {}).get("Value")
    return v[0] if v else None


def _ref_from_json(item: Mapping[str, Any], study_uid: str | None = None) -> SeriesRef:
    n = _json_value(item, "00201209")
    return SeriesRef(
        study_uid=str(study_uid or _json_value(item, "0020000D") or ""),
        series_uid=str(_json_value(item, "0020000E") or ""),
        modality=str(_json_value(item, "00080060") or ""),
        description=str(_json_value(item, "0008103E") or ""),
        n_instances=int(n) if n is not None else None,
    )


class _Bearer:
    """requests auth: ``Authorization: Bearer <token>`` (kept out of repr and logs)."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_Bearer(***)"


class DicomWebPacs:
    """DICOMweb client over ``dicomweb_client.DICOMwebClient`` with our own bounded retries."""

    STORE_CHUNK = 16
    PAGE = 500

    def __init__(self, url: PacsUrl, creds: Credentials, retry: RetryPolicy, timeout_s: float):
        import requests

        try:
            from dicomweb_client.api import DICOMwebClient
        except ImportError:
            raise SettingsError("DICOMweb needs the dicomweb-client package: pip install dicomweb-client") from None

        self.url, self.retry = url, retry
        session = requests.Session()
        session.verify = creds.ca_bundle if (creds.ca_bundle and creds.verify) else creds.verify
        if creds.token:
            session.auth = _Bearer(creds.token)
        elif creds.username:
            session.auth = (creds.username, creds.password or "")
        self._authenticated = bool(creds.token or creds.username)
        self._client = DICOMwebClient(url.http_url, session=session, timeout=timeout_s)
        self._client.set_http_retry_params(retry=False)  # retries are ours (connection errors too)

    def close(self) -> None:
        self._client._session.close()

    # one request with error translation
    def _call(self, what: str, fn: Any, not_found: Any = ...) -> Any:
        import requests

        def attempt() -> Any:
            try:
                return fn()
            except requests.exceptions.HTTPError as err:
                status = err.response.status_code if err.response is not None else 0
                if status == 404 and not_found is not ...:
                    return not_found
                if status in (401, 403):
                    hint = ("check MEDRECON_PACS_USER/MEDRECON_PACS_PASSWORD, MEDRECON_PACS_TOKEN or the "
                            "credentials file" if self._authenticated else
                            "no credentials were given: set MEDRECON_PACS_USER/MEDRECON_PACS_PASSWORD or "
                            "MEDRECON_PACS_TOKEN, or use the credentials file")
                    raise PacsAuthError(f"{self.url.display()} refused the credentials (HTTP {status}); {hint}") from None
                if status >= 500 or status in (408, 429):
                    raise Transient(f"HTTP {status} from {self.url.display()}") from None
                raise PacsRequestError(f"{self.url.display()}: {what} failed with HTTP {status}") from None
            except requests.exceptions.SSLError:
                raise PacsRequestError(
                    f"{self.url.display()}: TLS certificate verification failed; give the hospital CA "
                    "with MEDRECON_PACS_CA_BUNDLE (or ca_bundle in the credentials file)"
                ) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError) as err:
                raise Transient(f"cannot reach {self.url.display()} ({type(err).__name__})") from None

        return call_with_retries(attempt, self.retry, f"{self.url.display()} {what}",
                                 lambda r: PacsUnavailableError(f"{what} failed: {r}"))

    def search_series(self, query: Mapping[str, str] | None = None) -> list[SeriesRef]:
        q = parse_query(query)
        study_q = {k: v for k, v in q.items() if k in STUDY_KEYS}
        series_q = {k: v for k, v in q.items() if k not in STUDY_KEYS}
        fields = ["Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances"]
        c = self._client
        if not study_q:
            found = self._pages("QIDO-RS series search", "0020000E", lambda **kw: c.search_for_series(
                search_filters=series_q, fields=fields, **kw))
            return [_ref_from_json(i) for i in found]
        studies = self._pages("QIDO-RS study search", "0020000D", lambda **kw: c.search_for_studies(
            search_filters=study_q, **kw))
        out: list[SeriesRef] = []
        for st in studies:
            uid = str(_json_value(st, "0020000D"))
            found = self._pages("QIDO-RS series search", "0020000E",
                                lambda uid=uid, **kw: c.search_for_series(
                                    study_instance_uid=uid, search_filters=series_q, fields=fields, **kw))
            out.extend(_ref_from_json(i, uid) for i in found)
        return out

    def _pages(self, what: str, key_tag: str, search: Any) -> list[dict[str, Any]]:
        """All results of a QIDO search, page by page (``limit``/``offset``).

        dicomweb-client's ``get_remaining`` is not used: it never stops on a server that ignores
        ``offset``; here a page with nothing new ends the loop.
        """
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        while True:
            page = self._call(what, lambda: search(limit=self.PAGE, offset=len(out)), not_found=[])
            new = [i for i in page if str(_json_value(i, key_tag)) not in seen]
            seen.update(str(_json_value(i, key_tag)) for i in new)
            out.extend(new)
            if len(page) < self.PAGE or not new:
                return out

    def instance_uids(self, study_uid: str, series_uid: str) -> set[str]:
        found = self._pages("QIDO-RS instance search", "00080018",
                            lambda **kw: self._client.search_for_instances(
                                study_instance_uid=study_uid, series_instance_uid=series_uid,
                                fields=["SOPInstanceUID"], **kw))
        return {str(_json_value(i, "00080018")) for i in found}

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> int:
        def fetch() -> int:
            _fresh_dir(folder)
            n = 0
            for ds in self._client.iter_series(study_uid, series_uid):
                ds.save_as(folder / f"{n + 1:05d}.dcm", enforce_file_format=True)
                n += 1
            return n

        n = self._call("WADO-RS series retrieve", fetch)
        if n == 0:
            raise PacsRequestError(f"{self.url.display()}: series {series_case_id(series_uid)} has no instances")
        return n

    def store_files(self, paths: Sequence[Path]) -> int:
        import pydicom

        files = [p for p, _ in check_uploadable(paths)]
        stored = 0
        for i in range(0, len(files), self.STORE_CHUNK):
            chunk = [pydicom.dcmread(p) for p in files[i:i + self.STORE_CHUNK]]
            resp = self._call("STOW-RS store", lambda chunk=chunk: self._client.store_instances(chunk))
            failed = resp.get("FailedSOPSequence") if resp is not None else None
            if failed:
                reasons = sorted({f"0x{int(f.get('FailureReason', 0)):04X}" for f in failed})
                raise PacsRequestError(
                    f"{self.url.display()}: STOW-RS refused {len(failed)} of {len(chunk)} instances "
                    f"(failure reasons {', '.join(reasons)})"
                )
            stored += len(chunk)
        return stored


# ------------------------------------------------------------------------------------------ DIMSE
_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",     # Explicit VR Little Endian
    "1.2.840.10008.1.2",       # Implicit VR Little Endian
)


def _storage_classes() -> list[str]:
    from pynetdicom import sop_class as sc

    return [sc.CTImageStorage, sc.MRImageStorage, sc.EnhancedCTImageStorage,
            sc.EnhancedMRImageStorage, sc.SecondaryCaptureImageStorage]


class DimsePacs:
    """DIMSE client over ``pynetdicom``: C-FIND (study root), C-GET, C-STORE.

    Our calling AE title comes from the credentials (``MEDRECON_PACS_AET``, default MEDRECON); the
    PACS must know it (Orthanc: ``DicomModalities``).  Retrieval uses C-GET, so no listening port
    of ours is needed.
    """

    def __init__(self, url: PacsUrl, creds: Credentials, retry: RetryPolicy, timeout_s: float):
        try:
            import pynetdicom  # noqa: F401
        except ImportError:
            raise SettingsError("DIMSE needs the pynetdicom package: pip install pynetdicom") from None
        self.url, self.retry, self.timeout_s = url, retry, timeout_s
        self.calling_aet = creds.calling_aet

    def close(self) -> None:
        pass

    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = min(self.timeout_s, 10.0)
        return ae

    def _associate(self, ae: Any, **kw: Any) -> Any:
        assoc = ae.associate(self.url.host, self.url.port, ae_title=self.url.called_aet, **kw)
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            raise PacsAuthError(
                f"{self.url.display()} rejected the association from calling AE title "
                f"{self.calling_aet!r}; the PACS must list it (MEDRECON_PACS_AET sets ours) and the "
                "URL must name the PACS's own AE title"
            )
        raise Transient(f"cannot open an association with {self.url.display()}")

    def _run(self, what: str, fn: Any) -> Any:
        return call_with_retries(fn, self.retry, f"{self.url.display()} {what}",
                                 lambda r: PacsUnavailableError(f"{what} failed: {r}"))

    def _find(self, identifier: Any) -> list[Any]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        def attempt() -> list[Any]:
            ae = self._ae()
            ae.add_requested_context(FIND)
            assoc = self._associate(ae)
            out: list[Any] = []
            try:
                for status, ident in assoc.send_c_find(identifier, FIND):
                    if not status:
                        raise Transient(f"{self.url.display()} dropped the C-FIND")
                    code = int(status.Status)
                    if code in (0xFF00, 0xFF01):
                        out.append(ident)
                    elif code != 0x0000:
                        raise PacsRequestError(f"{self.url.display()}: C-FIND failed with status 0x{code:04X}")
            finally:
                assoc.release()
            return out

        return self._run(f"C-FIND {identifier.QueryRetrieveLevel}", attempt)

    def search_series(self, query: Mapping[str, str] | None = None) -> list[SeriesRef]:
        from pydicom.dataset import Dataset

        q = parse_query(query)
        study_q = {k: v for k, v in q.items() if k in STUDY_KEYS}
        series_q = {k: v for k, v in q.items() if k not in STUDY_KEYS}
        st = Dataset()
        st.QueryRetrieveLevel = "STUDY"
        st.StudyInstanceUID = ""
        for k, v in study_q.items():
            setattr(st, k, v)
        out: list[SeriesRef] = []
        for study in self._find(st):
            s = Dataset()
            s.QueryRetrieveLevel = "SERIES"
            s.StudyInstanceUID = str(study.StudyInstanceUID)
            s.SeriesInstanceUID = s.Modality = s.SeriesDescription = ""
            s.NumberOfSeriesRelatedInstances = ""
            for k, v in series_q.items():
                setattr(s, k, v)
            for r in self._find(s):
                n = r.get("NumberOfSeriesRelatedInstances")
                out.append(SeriesRef(str(study.StudyInstanceUID), str(r.SeriesInstanceUID),
                                     str(r.get("Modality", "")), str(r.get("SeriesDescription", "")),
                                     int(n) if n not in (None, "") else None))
        return out

    def instance_uids(self, study_uid: str, series_uid: str) -> set[str]:
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = study_uid, series_uid, ""
        return {str(r.SOPInstanceUID) for r in self._find(q) if r.get("SOPInstanceUID")}

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> int:
        from pydicom.dataset import Dataset
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID, q.SeriesInstanceUID = study_uid, series_uid

        def attempt() -> int:
            _fresh_dir(folder)
            received: list[int] = []

            def on_store(event: Any) -> int:
                ds = event.dataset
                ds.file_meta = event.file_meta
                ds.save_as(folder / f"{len(received) + 1:05d}.dcm", enforce_file_format=True)
                received.append(1)
                return 0x0000

            ae = self._ae()
            ae.add_requested_context(GET)
            classes = _storage_classes()
            for cls in classes:
                ae.add_requested_context(cls, list(_TRANSFER_SYNTAXES))
            roles = [build_role(cls, scp_role=True) for cls in classes]
            assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
            try:
                final = None
                for status, _ in assoc.send_c_get(q, GET):
                    if not status:
                        raise Transient(f"{self.url.display()} dropped the C-GET")
                    final = int(status.Status)
                if final not in (0x0000,):
                    raise PacsRequestError(
                        f"{self.url.display()}: C-GET ended with status 0x{final or 0:04X} "
                        f"after {len(received)} instances"
                    )
            finally:
                assoc.release()
            return len(received)

        n = self._run("C-GET series", attempt)
        if n == 0:
            raise PacsRequestError(f"{self.url.display()}: series {series_case_id(series_uid)} has no instances")
        return n

    def store_files(self, paths: Sequence[Path]) -> int:
        import pydicom

        items = check_uploadable(paths)
        pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in items})
        if len(pairs) > 128:
            raise SettingsError("C-STORE: more than 128 SOP class / transfer syntax pairs in one push")

        def attempt() -> int:
            ae = self._ae()
            for cls, ts in pairs:
                ae.add_requested_context(cls, [ts])
            assoc = self._associate(ae)
            n = 0
            try:
                for p, _ in items:
                    ds = pydicom.dcmread(p)
                    status = assoc.send_c_store(ds)
                    if not status:
                        raise Transient(f"{self.url.display()} dropped the C-STORE")
                    code = int(status.Status)
                    if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                        raise PacsRequestError(f"{self.url.display()}: C-STORE failed with status 0x{code:04X}")
                    n += 1
            finally:
                if assoc.is_established:
                    assoc.release()
            return n

        return self._run("C-STORE", attempt)
