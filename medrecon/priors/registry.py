"""Registry of priors: a name → the model card of its weights.

The shipped priors are the ``*.json`` cards in ``medrecon/priors/weights/``;
:func:`shipped_registry` builds a fresh registry of them on every call (no module state
changes after import).  Library code passes :class:`~medrecon.priors.prior.ScorePrior`
objects; names are for the CLI and for ``ScorePrior.load("ct-256")``.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from medrecon.errors import InputError, SettingsError

__all__ = ["WEIGHTS_DIR", "PriorRegistry", "read_card", "shipped_registry", "write_card"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def read_card(path: str | Path) -> dict[str, Any]:
    """A model card (JSON object) from ``path``; :class:`InputError` naming it when it is missing,
    unreadable, not JSON or not an object."""
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise InputError(path, "model card not found") from err
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read model card ({err})") from err
    if not isinstance(card, dict):
        raise InputError(path, "model card is not a JSON object")
    return card


def write_card(path: str | Path, card: dict[str, Any]) -> None:
    """Replace a model card atomically (a temporary file in the same folder, then a rename),
    keeping the permissions of the file it replaces."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)


class PriorRegistry:
    """Names of priors and the paths of their model cards.

    Examples
    --------
    >>> reg = PriorRegistry()
    >>> reg.register("demo", Path("demo.json"))
    >>> reg.names()
    ['demo']
    """

    def __init__(self) -> None:
        self._cards: dict[str, Path] = {}

    def register(self, name: str, card_path: str | Path) -> None:
        """Add ``name``; registering a name twice raises :class:`SettingsError`."""
        if name in self._cards:
            raise SettingsError(
                f"PriorRegistry.register: prior {name!r} is already registered "
                f"({self._cards[name]})"
            )
        self._cards[name] = Path(card_path)

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._cards)

    def __contains__(self, name: object) -> bool:
        return name in self._cards

    def card_path(self, name: str) -> Path:
        """Path of ``name``'s card; an unknown name raises with the nearest known names."""
        if name not in self._cards:
            known = self.names()
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SettingsError(
                f"unknown prior {name!r}{hint} Known: {', '.join(known) or '(none)'}"
            )
        return self._cards[name]

    def card(self, name: str) -> dict[str, Any]:
        """Return the model card of ``name`` as a dict."""
        return read_card(self.card_path(name))


def shipped_registry(directory: str | Path | None = None) -> PriorRegistry:
    """Registry of the cards in ``directory`` (default: the package's ``weights/``)."""
    reg = PriorRegistry()
    d = Path(directory) if directory is not None else WEIGHTS_DIR
    for card in sorted(d.glob("*.json")):
        reg.register(card.stem, card)
    return reg
