"""``medrecon tune``: search a diffusion method's settings for one prior and one measurement
setting on validation images, and optionally store the winner on the prior's model card.

A thin composition of :func:`medrecon.tuning.tune` (successive halving, objective PSNR,
the current defaults always a candidate) and :func:`~medrecon.tuning.store_tuned_defaults`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon.errors import SettingsError

__all__ = ["TuneConfig", "run_tune"]


@dataclass(frozen=True)
class TuneConfig:
    """Settings of ``medrecon tune``.

    Attributes
    ----------
    prior : str
        Registry name or path of the prior's card (``NAME.json``).
    input : str
        Validation images (NIfTI, DICOM series, image folder); every selected slice is one image.
    modality, geometry, views, limited_angle_deg, acceleration, center_fraction, mask
        The measurement setting, as in :class:`~medrecon.pipeline.case.ReconstructConfig`.
    method : str
        Diffusion method to tune.
    slices, downsample
        Which slices and what in-plane block averaging (match the prior's resolution).
    budget : int
        Reconstructions to spend (configuration × image), approximately.
    samples : int
        Posterior samples per reconstruction.
    steps : int or None
        Hold the step count fixed (tune λ, snr, ... at a cost the machine can afford).
    noise : float
        Gaussian measurement noise, fraction of the measurement RMS.
    seed : int
    store : bool
        Write the winner to the card as ``card["tuned"][operator_key][method]``.
    out : str or None
        Write the full result (every trial) as JSON.
    """

    prior: str
    input: str
    modality: str = "ct"
    method: str = "ccdf"
    geometry: str = "parallel"
    views: int = 23
    limited_angle_deg: float | None = None
    acceleration: float = 4.0
    center_fraction: float = 0.08
    mask: str = "equispaced"
    slices: str | None = None
    downsample: int = 1
    budget: int = 24
    samples: int = 1
    steps: int | None = None
    noise: float = 0.0
    seed: int = 0
    store: bool = False
    out: str | None = None


def run_tune(cfg: TuneConfig, *, prior: Any = None, log=None) -> dict[str, Any]:
    """Tune and return :func:`medrecon.tuning.tune`'s result (plus ``stored_in``).

    Parameters
    ----------
    prior : object, optional
        A prior object to use instead of loading ``cfg.prior`` (tests, analytic priors).

    Raises
    ------
    InputError, SettingsError
        Unreadable images or card, unknown prior or method, settings out of range.
    """
    from medrecon.datasets import load_volume
    from medrecon.operators import MaskedFourier, mri_mask
    from medrecon.pipeline.case import ReconstructConfig
    from medrecon.pipeline.geometry import ct_case_operator
    from medrecon.pipeline.problems import _subset, add_noise
    from medrecon.pipeline.records import atomic_json
    from medrecon.tuning import store_tuned_defaults, tune

    if cfg.modality not in ("ct", "mri"):
        raise SettingsError(f"modality must be 'ct' or 'mri'; got {cfg.modality!r}")
    if cfg.budget < 1 or cfg.samples < 1:
        raise SettingsError(f"budget and samples must be ≥ 1; got {cfg.budget}, {cfg.samples}")
    if prior is None:
        from medrecon.priors.prior import ScorePrior

        prior = ScorePrior.load(cfg.prior)
    vol = _subset(load_volume(cfg.input), ReconstructConfig(slices=cfg.slices, downsample=cfg.downsample))
    images = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[:, None]
    h, w = images.shape[-2:]
    if cfg.modality == "ct":
        A = ct_case_operator((h, w), kind=cfg.geometry, views=cfg.views,  # noqa: N806
                             limited_angle_deg=cfg.limited_angle_deg, pixel_mm=vol.spacing_mm[2])
    else:
        A = MaskedFourier(mri_mask(cfg.mask, (h, w), cfg.acceleration, cfg.center_fraction, seed=cfg.seed))  # noqa: N806

    def noise(y: torch.Tensor, i: int) -> torch.Tensor:
        return add_noise(y, cfg.noise, torch.Generator().manual_seed(cfg.seed + i))

    res = tune(prior, lambda i: A, images, budget=cfg.budget, seed=cfg.seed, method=cfg.method,
               noise=noise if cfg.noise > 0 else None, n_samples=cfg.samples,
               fixed={"steps": cfg.steps} if cfg.steps else None, log=log)
    if cfg.store:
        card = Path(cfg.prior)
        if card.suffix not in (".json", ".safetensors"):
            from medrecon.priors.registry import shipped_registry

            card = shipped_registry().card_path(cfg.prior)
        store_tuned_defaults(card.with_suffix(".json"), res["operator_key"], {cfg.method: res["best"]})
        res["stored_in"] = str(card.with_suffix(".json"))
    if cfg.out:
        atomic_json(Path(cfg.out), res)
    return res
