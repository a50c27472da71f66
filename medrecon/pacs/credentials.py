"""Credentials for a PACS: environment variables or a TOML file with 0600 permissions.

Never from the command line.  Sources, highest first:

1. environment: ``MEDRECON_PACS_USER`` + ``MEDRECON_PACS_PASSWORD`` (HTTP basic auth) or
   ``MEDRECON_PACS_TOKEN`` (bearer token); ``MEDRECON_PACS_CA_BUNDLE`` (PEM file of trusted CAs);
   ``MEDRECON_PACS_VERIFY=0`` turns TLS verification off (on by default); ``MEDRECON_PACS_AET``
   is our calling AE title for DIMSE (default ``MEDRECON``);
2. the file named by ``MEDRECON_PACS_CONFIG``, else ``$XDG_CONFIG_HOME/medrecon/pacs.toml``
   (``~/.config/medrecon/pacs.toml``): a ``[default]`` table and ``[server."host:port"]`` tables
   with the keys ``username``, ``password``, ``token``, ``ca_bundle``, ``verify``, ``calling_aet``.
   The file must not be readable by group or others (``chmod 600``), else it is refused.

A :class:`Credentials` never shows its secrets in ``repr``; errors name the variable or the file,
never its value.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrecon.errors import SettingsError
from medrecon.pacs.url import PacsUrl

__all__ = ["Credentials", "load_credentials", "config_path"]

_KEYS = {"username", "password", "token", "ca_bundle", "verify", "calling_aet"}


@dataclass(frozen=True)
class Credentials:
    """How to authenticate to one PACS.  Secrets are left out of ``repr``."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None
    verify: bool = True
    calling_aet: str = "MEDRECON"

    def secrets(self) -> list[str]:
        """The secret strings, so that callers can make sure no message carries them."""
        return [s for s in (self.password, self.token) if s]


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """The credentials file medrecon reads (it need not exist)."""
    env = os.environ if env is None else env
    if env.get("MEDRECON_PACS_CONFIG"):
        return Path(env["MEDRECON_PACS_CONFIG"]).expanduser()
    base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "medrecon" / "pacs.toml"


def _read_config(path: Path, explicit: bool) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    if not path.exists():
        if explicit:
            raise SettingsError(f"PACS credentials file {path} (MEDRECON_PACS_CONFIG) does not exist")
        return {}
    if sys.platform != "win32":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SettingsError(
                f"PACS credentials file {path} has permissions {mode:04o}; it must be readable by "
                f"its owner only: chmod 600 {path}"
            )
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as err:
        # the decode error quotes a line number, not the file's content
        raise SettingsError(f"PACS credentials file {path} cannot be read: {type(err).__name__}") from None
    return data


def _check_table(table: Any, where: str, path: Path) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SettingsError(f"PACS credentials file {path}: [{where}] must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise SettingsError(
            f"PACS credentials file {path}: unknown keys in [{where}]: {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(_KEYS))})"
        )
    return table


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{where} must be true or false")


def load_credentials(url: PacsUrl, env: Mapping[str, str] | None = None) -> Credentials:
    """Credentials for ``url`` from the environment and the credentials file.

    Raises
    ------
    SettingsError
        The file is readable by others, unreadable, has unknown keys; a password without a user;
        both a password and a token; a CA bundle that does not exist.
    """
    env = os.environ if env is None else env
    path = config_path(env)
    data = _read_config(path, explicit=bool(env.get("MEDRECON_PACS_CONFIG")))
    merged: dict[str, Any] = {}
    if data:
        merged.update(_check_table(data.get("default", {}), "default", path))
        servers = data.get("server", {})
        if not isinstance(servers, dict):
            raise SettingsError(f"PACS credentials file {path}: [server] must hold tables")
        merged.update(_check_table(servers.get(url.server_key, {}), f'server."{url.server_key}"', path))
    for var, key in (
        ("MEDRECON_PACS_USER", "username"), ("MEDRECON_PACS_PASSWORD", "password"),
        ("MEDRECON_PACS_TOKEN", "token"), ("MEDRECON_PACS_CA_BUNDLE", "ca_bundle"),
        ("MEDRECON_PACS_VERIFY", "verify"), ("MEDRECON_PACS_AET", "calling_aet"),
    ):
        if env.get(var):
            merged[key] = env[var]
    verify = _bool(merged.get("verify", True), "MEDRECON_PACS_VERIFY / verify")
    creds = Credentials(
        username=merged.get("username") or None,
        password=merged.get("password") or None,
        token=merged.get("token") or None,
        ca_bundle=str(Path(merged["ca_bundle"]).expanduser()) if merged.get("ca_bundle") else None,
        verify=verify,
        calling_aet=str(merged.get("calling_aet") or "MEDRECON"),
    )
    if creds.password and not creds.username:
        raise SettingsError("a PACS password is set but no user (MEDRECON_PACS_USER or username)")
    if creds.token and creds.password:
        raise SettingsError("set either a PACS password or a bearer token, not both")
    if creds.ca_bundle and not Path(creds.ca_bundle).is_file():
        raise SettingsError(f"PACS CA bundle {creds.ca_bundle} does not exist")
    if not 1 <= len(creds.calling_aet) <= 16:
        raise SettingsError("the calling AE title (MEDRECON_PACS_AET / calling_aet) must be 1-16 characters")
    return creds
