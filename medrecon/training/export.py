"""Export a training run as a prior: the EMA weights as safetensors beside a JSON model card.

:func:`export_prior` writes the card from the checkpoint (steps and wall time, counting those of
the weights an ``init_from`` run started from, the run's config and runtime) and what the caller
adds (a preset's :data:`medrecon.training.presets.CARD_INFO` entry: design, notes, licences,
solver defaults).  Every training file is listed with its licence (:func:`card_training_data`)
and the card's ``licence_summary`` names the non-commercial files, those of undocumented origin
and those nobody reviewed (:func:`licence_summary`).  With ``validate_on`` the card also gets the
exported weights' validation numbers, the run's validation curve and the high-noise Gaussian
blend (:func:`medrecon.priors.prior.fit_high_noise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medrecon.datasets.training import npz_source_info
from medrecon.priors.prior import ScorePrior, fit_high_noise
from medrecon.priors.registry import read_card, write_card
from medrecon.training.domain import measure_domain
from medrecon.training.campaign import campaign_history, campaign_point
from medrecon.training.data import (
    VOLUME_CANVAS,
    VOLUME_SPACING_MM,
    _resolve,
    is_volume_source,
    load_slices,
    volume_training_slices,
)
from medrecon.training.loop import load_ema_net
from medrecon.training.validation import read_val_log, validate, validation_curve

__all__ = ["export_prior", "card_training_data", "licence_summary"]


def export_prior(
    checkpoint: str | Path,
    directory: str | Path,
    name: str,
    *,
    card: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    validate_on: str | None = None,
) -> Path:
    """Write the EMA weights of a checkpoint as a prior (safetensors + model card).

    Parameters
    ----------
    checkpoint : path
        A trainer checkpoint (``last.pt`` or ``step_N.pt``).
    directory : path
        Where ``NAME.safetensors`` and ``NAME.json`` go.
    name : str
        Prior name.
    card : dict, optional
        Further card entries (data and licences, notes, solver defaults); ``training`` merges.
    dtype : torch.dtype
        Storage dtype of the weights.
    overwrite : bool
        Replace existing files.
    validate_on : str, optional
        Validation ``.npz``: the card gets the Tweedie denoising PSNR of the exported (rounded)
        weights on all its slices, and the run's validation curve (``val.csv``), after the
        curve of the card this run started from (``init_from``).

    Returns
    -------
    Path
        The card.
    """
    net, cfg, ck = load_ema_net(checkpoint)
    prior = ScorePrior(net, cfg.normaliser())
    earlier = ck.get("earlier", {"steps": 0, "wall_time_s": 0.0})
    history = earlier.get("campaign")
    if history is None and ck["config"].get("init_from"):  # checkpoints older than the campaign record
        history = campaign_history(ScorePrior.load(ck["config"]["init_from"]).card)
    point = campaign_point(earlier, ck)
    training = {
        "steps": earlier["steps"] + ck["step"],
        "wall_time_s": round(earlier["wall_time_s"] + ck["wall_s"], 1),
        "cpu_hours": point["cumulative_cpu_hours"],
        "weights": "EMA of the network weights",
        "optimiser_state_shipped": False,
        "config": ck["config"],
    }
    if ck.get("runtime"):
        training["runtime"] = ck["runtime"]
    if earlier["steps"]:
        training["resumed_from"] = (
            f"{earlier['steps']} earlier steps ({ck['config'].get('init_from')}); this run "
            f"{ck['step']} steps with a re-initialised AdamW"
        )
    training["campaign"] = [*(history or []), point]
    extra: dict[str, Any] = dict(card or {})
    extra["training"] = {**training, **extra.get("training", {})}
    data_history = earlier.get("data_history", [])
    if data_history:  # files trained on in earlier stages stay on the card, with when they left
        extra["training"]["data_history"] = data_history
    extra["training_data"] = card_training_data(cfg.data, extra.get("training_data"), cfg.modality)
    listed = {e.get("file") for e in extra["training_data"]}
    for stage in data_history:
        for f in stage["data"]:
            if f not in listed and f not in cfg.data:
                info = _source_info(f, cfg.modality)
                left = max(h["until_step"] for h in data_history if f in h["data"])
                extra["training_data"].append({**info, "licence_reviewed": False,
                                               "trained_until_step": left,
                                               "note": f"trained on in the first {left} steps only, not since"})
                listed.add(f)
    summary = licence_summary(extra["training_data"])
    if summary:
        extra["licence_summary"] = summary
    replaced = Path(directory) / f"{name}.json"
    if overwrite and replaced.exists():
        # measurements made on the prior (tuned solver settings, uncertainty calibrations) are
        # kept with the sha256 of the weights they were measured on, so that they are not applied
        # to the new weights (solvers.cards.tuned_on_other_weights) until re-measured
        before_card = read_card(replaced)
        kept = {k: before_card[k] for k in ("tuned", "calibration", "benchmark") if k in before_card and k not in extra}
        if before_card.get("sha256"):
            for what, section in kept.items():  # entries older than the hash field
                for methods in section.values():
                    for entry in ([methods] if what == "benchmark" else methods.values()):
                        entry.setdefault("weights_sha256", before_card["sha256"])
        extra.update(kept)
    path = prior.save(directory, name, dtype=dtype, card=extra, overwrite=overwrite)
    if validate_on:
        back = ScorePrior.load(path)
        val = load_slices([validate_on], cfg.modality)
        res = validate(back.net, val, batch=4)
        card_now = read_card(path)
        # the Gaussian blend at high noise (prior.py): mean/var of the training images, the
        # crossover noise level measured on (at most 8 of) the validation images
        train = load_slices(cfg.data, cfg.modality)  # once, for the blend and the domain
        high = fit_high_noise(back, train, val[:: max(1, len(val) // 8)][:8])
        card_now["high_noise"] = {
            **high,
            "how": "score = w·network + (1 − w)·Gaussian(mean, var) score, w = 1/(1 + (σ/sigma_c)^4); "
            "sigma_c = the noise level above which the Gaussian Tweedie estimate beats the network's "
            "on the validation images (medrecon.priors.prior.fit_high_noise)",
        }
        # what the prior was trained on, for the out-of-domain check at inference (priors/domain.py)
        card_now["domain"] = measure_domain(cfg.data, cfg.modality, card_now.get("domain"), val.float().numpy(),
                                            slices=train)
        del train
        card_now["validation"] = {
            **card_now.get("validation", {}),
            "data": "/".join(Path(validate_on).parts[-2:]),
            "slices": len(val),
            "metric": "mean PSNR (dB, peak 1, normalised space) of the one-step Tweedie denoiser "
            "on y = x + sigma*n",
            "tweedie_psnr_db": {
                k.replace("psnr_sigma", "sigma"): round(v, 2) for k, v in res.items()
            },
        }
        card_now["training"]["campaign"][-1]["tweedie_psnr_db"] = card_now["validation"]["tweedie_psnr_db"]
        card_now["training"]["campaign"][-1]["validation"] = f"{card_now['validation']['data']}, {len(val)} slices"
        rows = read_val_log(Path(checkpoint).parent / "val.csv")
        if rows:  # the run's validation curve (first val_slices slices, during training)
            card_now["validation"]["during_training"] = {
                "slices": ck["config"].get("val_slices"),
                "steps_offset": earlier["steps"],
                "rows": validation_curve(earlier, rows, upto_step=ck["step"]),
            }
        write_card(path, card_now)
    return path


def card_training_data(
    data: Sequence[str], curated: Sequence[dict[str, Any]] | None = None, modality: str = "ct"
) -> list[dict[str, Any]]:
    """The card's list of training files with their licences.

    ``curated`` entries (a preset's :data:`~medrecon.training.presets.CARD_INFO`, one or more
    per file, with ``non_commercial`` / ``origin_documented`` where reviewed) are kept as
    written; every file of ``data`` that none of them names is added as found in the file
    (:func:`medrecon.datasets.training.npz_source_info`: slices, patients, source, collection,
    licence) with ``"licence_reviewed": False``, so no training file goes unlisted.
    """
    out = [dict(e) for e in (curated or [])]
    for e in out:  # curated volumes: the slices taken from them, measured (the text cannot know)
        if e.get("file") in data and "slices" not in e and is_volume_source(_resolve(e["file"])):
            e["slices"] = _source_info(e["file"], modality)["slices"]
    named = {e.get("file") for e in out}
    for f in data:
        if f not in named:
            info = _source_info(f, modality)
            out.append({**info, "licence_reviewed": False})
    return out


def _source_info(f: str, modality: str) -> dict[str, Any]:
    """What the card says about one training entry: :func:`npz_source_info` for ``.npz`` files;
    for a volume (NIfTI file, DICOM series folder) the slices taken from it and how."""
    path = _resolve(f)
    if not is_volume_source(path):
        return npz_source_info(path, name=f)
    n = len(volume_training_slices(path, modality))
    return {"file": f, "slices": n, "patients": 1, "volume": True,
            "resliced": f"axial, {VOLUME_SPACING_MM} mm pixels on a {VOLUME_CANVAS}-pixel canvas "
            "(medrecon.training.data.volume_training_slices)"}


def licence_summary(entries: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Files of a card's ``training_data`` that are non-commercial, of undocumented origin or
    whose licence nobody reviewed (empty lists left out)."""
    groups = {
        "non_commercial": [e["file"] for e in entries if e.get("non_commercial")],
        "origin_undocumented": [e["file"] for e in entries if e.get("origin_documented") is False],
        "licence_not_reviewed": [e["file"] for e in entries if e.get("licence_reviewed") is False],
    }
    return {k: sorted(set(v)) for k, v in groups.items() if v}
