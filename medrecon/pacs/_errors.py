"""Errors of :mod:`medrecon.pacs`.  All are :class:`~medrecon.errors.MedreconError` subclasses, so
the CLI prints one line and exits 2; none of them ever holds a password, token or patient name."""

from __future__ import annotations

from medrecon.errors import MedreconError, SettingsError

__all__ = ["PacsError", "PacsAuthError", "PacsUnavailableError", "PacsRequestError", "PacsUrlError"]


class PacsError(MedreconError):
    """A PACS request failed; the message names the server (URL without credentials) and why."""


class PacsAuthError(PacsError):
    """The PACS refused the credentials (HTTP 401/403, or a DIMSE association rejection)."""


class PacsUnavailableError(PacsError):
    """The PACS could not be reached, or kept answering 5xx, after the bounded retries."""


class PacsRequestError(PacsError):
    """The PACS answered, but refused or failed the request (4xx other than auth, DIMSE failure)."""


class PacsUrlError(SettingsError):
    """A PACS URL that is malformed, of an unknown scheme, or carries credentials."""
