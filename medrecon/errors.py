"""Errors raised by medrecon.

Everything a user can get wrong raises a :class:`MedreconError` subclass.  The CLI prints the
message on one line and exits with status 2; any other exception is a bug.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MedreconError", "InputError", "ShapeError", "SettingsError"]


class MedreconError(Exception):
    """Base class of every error medrecon raises on purpose."""


class InputError(MedreconError):
    """A file or folder could not be used; the message names it and says why.

    Parameters
    ----------
    path : str or Path
        The offending file or folder.
    problem : str
        What was expected and what was found.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ShapeError(MedreconError, ValueError):
    """A tensor had the wrong shape, dtype or device for the function it was given to."""


class SettingsError(MedreconError, ValueError):
    """An argument or setting is out of range, unknown or inconsistent with the others."""
