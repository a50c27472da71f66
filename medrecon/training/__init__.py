"""Train a score prior by denoising score matching (``medrecon train``, or :func:`train`).

The trainer sits above the solvers (its preview samples run the solvers' one loop) and below
the pipeline and the CLI; nothing in :mod:`medrecon.priors` or below imports it.

=========================================  ====================================================
:mod:`medrecon.training.data`              ``.npz`` slices, valid boxes, :class:`PatchSampler`
:mod:`medrecon.training.config`            :class:`TrainConfig` and its checks
:mod:`medrecon.training.loop`              :func:`train`, :func:`dsm_loss`, checkpoints
:mod:`medrecon.training.runtime`           threads, tcmalloc, DDP ranks, stop signals
:mod:`medrecon.training.validation`        :func:`validate`, the plateau rule, preview grids
:mod:`medrecon.training.export`            :func:`export_prior`: weights + model card
:mod:`medrecon.training.presets`           :data:`PRESETS` and :data:`CARD_INFO` (``cards/*.json``)
:mod:`medrecon.training.cli`               ``medrecon train`` / ``python -m medrecon.training``
=========================================  ====================================================

>>> from medrecon.training import PRESETS, TrainConfig, train
>>> summary = train(TrainConfig(**PRESETS["ct-256"]))     # doctest: +SKIP
"""

from __future__ import annotations

from medrecon.training.cli import build_parser, config_from_args, main
from medrecon.training.config import PRECISIONS, T_DISTS, TrainConfig, default_out_dir
from medrecon.training.data import (
    RESERVED,
    PatchSampler,
    data_root,
    load_slices,
    load_training_data,
)
from medrecon.training.export import card_training_data, export_prior, licence_summary
from medrecon.training.loop import (
    CKPT_FORMAT,
    dsm_loss,
    learning_rate,
    load_checkpoint,
    load_ema_net,
    sample_t,
    train,
    train_autocast,
)
from medrecon.training.presets import CARD_INFO, CT_GROWN_DATA, CT_V3_DATA, CT_V3_WEIGHTS, PRESETS
from medrecon.training.runtime import cpu_model, runtime_info
from medrecon.training.validation import (
    read_val_log,
    save_grid_png,
    validate,
    validation_curve,
    validation_plateau,
)

__all__ = [
    "TrainConfig",
    "PRECISIONS",
    "T_DISTS",
    "default_out_dir",
    "train",
    "sample_t",
    "train_autocast",
    "dsm_loss",
    "load_checkpoint",
    "learning_rate",
    "load_ema_net",
    "CKPT_FORMAT",
    "load_slices",
    "load_training_data",
    "PatchSampler",
    "RESERVED",
    "data_root",
    "validate",
    "read_val_log",
    "validation_curve",
    "validation_plateau",
    "save_grid_png",
    "export_prior",
    "card_training_data",
    "licence_summary",
    "PRESETS",
    "CARD_INFO",
    "CT_GROWN_DATA",
    "CT_V3_DATA",
    "CT_V3_WEIGHTS",
    "runtime_info",
    "cpu_model",
    "build_parser",
    "config_from_args",
    "main",
]
