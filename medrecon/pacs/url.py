"""PACS URLs: ``dicomweb+http(s)://host:port/dicom-web`` and ``dimse://AET@host:port``.

Credentials are never part of a URL (they would end up in shell history and process lists); a
DICOMweb URL with ``user:password@`` is refused.  :meth:`PacsUrl.display` is what logs and error
messages show.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from medrecon.pacs._errors import PacsUrlError

__all__ = ["PacsUrl", "parse_pacs_url"]

_AET_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.")


@dataclass(frozen=True)
class PacsUrl:
    """A parsed PACS address.

    Attributes
    ----------
    protocol : {"dicomweb", "dimse"}
    host, port : where the server listens.
    http_url : str
        DICOMweb: the service root handed to ``dicomweb-client`` (``http(s)://host:port/path``).
    called_aet : str
        DIMSE: the PACS's application entity title.
    """

    protocol: str
    host: str
    port: int
    http_url: str = ""
    called_aet: str = ""

    @property
    def server_key(self) -> str:
        """``host:port``: the key of this server's section in the credentials file."""
        return f"{self.host}:{self.port}"

    def display(self) -> str:
        """The URL as logs and errors show it (it never holds credentials)."""
        if self.protocol == "dimse":
            return f"dimse://{self.called_aet}@{self.host}:{self.port}"
        return f"dicomweb+{self.http_url}"


def parse_pacs_url(url: str) -> PacsUrl:
    """Parse a PACS URL.

    Examples
    --------
    >>> parse_pacs_url("dicomweb+https://pacs.example.org/dicom-web").http_url
    'https://pacs.example.org:443/dicom-web'
    >>> parse_pacs_url("dimse://ORTHANC@127.0.0.1:4242").called_aet
    'ORTHANC'

    Raises
    ------
    PacsUrlError
        Unknown scheme, missing host/port/AE title, or credentials inside the URL.
    """
    if not isinstance(url, str) or "://" not in url:
        raise PacsUrlError(
            f"PACS URL must look like dicomweb+http(s)://host:port/dicom-web or dimse://AET@host:port; got {url!r}"
        )
    scheme = url.split("://", 1)[0].lower()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise PacsUrlError(f"malformed PACS URL ({err})") from None
    host = parts.hostname or ""
    if scheme in ("dicomweb+http", "dicomweb+https"):
        if parts.username is not None or parts.password is not None:
            raise PacsUrlError(
                "PACS URL must not contain credentials; set MEDRECON_PACS_USER/MEDRECON_PACS_PASSWORD "
                "or MEDRECON_PACS_TOKEN, or use the credentials file (see docs/pacs.md)"
            )
        if not host:
            raise PacsUrlError("DICOMweb URL has no host")
        http = scheme.split("+", 1)[1]
        port = port or (443 if http == "https" else 80)
        path = parts.path.rstrip("/")
        if parts.query or parts.fragment:
            raise PacsUrlError("DICOMweb URL must not have a query or fragment; use --query for filters")
        h = f"[{host}]" if ":" in host else host
        return PacsUrl("dicomweb", host, port, http_url=f"{http}://{h}:{port}{path}")
    if scheme == "dimse":
        aet = parts.username or ""
        if parts.password is not None:
            raise PacsUrlError("DIMSE URL must not contain a password; the form is dimse://AET@host:port")
        if not aet or len(aet) > 16 or not set(aet) <= _AET_CHARS:
            raise PacsUrlError(
                "DIMSE URL needs the PACS's AE title (1-16 letters, digits, space, _-.): dimse://AET@host:port"
            )
        if not host or port is None:
            raise PacsUrlError("DIMSE URL needs a host and a port: dimse://AET@host:port")
        return PacsUrl("dimse", host, port, called_aet=aet)
    raise PacsUrlError(
        f"unknown PACS URL scheme {scheme!r}; use dicomweb+http, dicomweb+https or dimse"
    )
