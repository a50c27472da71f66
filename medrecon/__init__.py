"""medrecon: reconstruct CT and MRI images from incomplete measurements.

Physics forward operators (:mod:`medrecon.operators`), classical and diffusion solvers
(:mod:`medrecon.solvers`), trained score priors (:mod:`medrecon.priors`) and readers/writers
(:mod:`medrecon.datasets`).
"""

from __future__ import annotations

from medrecon._version import __version__
from medrecon.api import Reconstruction, reconstruct
from medrecon.errors import InputError, MedreconError, SettingsError, ShapeError

__all__ = ["__version__", "reconstruct", "Reconstruction", "MedreconError", "InputError", "ShapeError", "SettingsError"]
