"""Score-based diffusion priors: SDEs, networks, ``ScorePrior`` and the registry.

What inference needs; the trainer is :mod:`medrecon.training`.

>>> from medrecon.priors import ScorePrior
>>> prior = ScorePrior.load("ct-256")            # doctest: +SKIP
>>> x0 = prior.denoise(x_t, t)                    # doctest: +SKIP
"""

from __future__ import annotations

from medrecon.priors.networks import NETWORK_SIZES, NetworkSpec, ScoreNet, build_unet, network_spec
from medrecon.priors.normalise import CT_HU_WINDOW, Normaliser, ct_normaliser, mri_normaliser
from medrecon.priors.prior import ScorePrior, fit_high_noise, sigma_to_t, tweedie_denoise
from medrecon.priors.sde import SDE, VESDE, VPSDE, sde_from_dict

__all__ = [
    "SDE",
    "VESDE",
    "VPSDE",
    "sde_from_dict",
    "NETWORK_SIZES",
    "NetworkSpec",
    "ScoreNet",
    "build_unet",
    "network_spec",
    "CT_HU_WINDOW",
    "Normaliser",
    "ct_normaliser",
    "mri_normaliser",
    "ScorePrior",
    "fit_high_noise",
    "sigma_to_t",
    "tweedie_denoise",
]
