"""``medrecon train`` / ``python -m medrecon.training``: a preset and flags → :func:`train`.

A thin shell: :func:`build_parser` offers ``--preset`` plus one flag per
:class:`~medrecon.training.config.TrainConfig` field, :func:`config_from_args` merges them into
a config, and :func:`main` trains (or, with ``--export DIR``, writes the run's EMA weights as a
prior with the preset's card text).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch

from medrecon.errors import SettingsError
from medrecon.training.config import TrainConfig
from medrecon.training.data import _resolve
from medrecon.training.export import export_prior
from medrecon.training.loop import train
from medrecon.training.presets import CARD_INFO, PRESETS

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``medrecon train``: ``--preset`` plus any :class:`TrainConfig` field."""
    p = argparse.ArgumentParser(prog="medrecon train", description="Train a score prior (DSM).")
    p.add_argument("--preset", choices=sorted(PRESETS), help="settings of a shipped prior")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "data":
            p.add_argument(flag, nargs="+", help="training .npz files, NIfTI volumes or DICOM series folders")
        elif str(f.type).startswith("tuple"):  # e.g. --patch-sizes 64 128 256 (none: empty)
            p.add_argument(flag, nargs="*", metavar=f.name.upper())
        elif f.type in ("bool",):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), metavar="BOOL")
        else:
            p.add_argument(flag, type=str, metavar=f.name.upper())
    p.add_argument(
        "--export", metavar="DIR", help="write the EMA weights of the run's last.pt to DIR and exit"
    )
    p.add_argument("--name", help="prior name for --export (default: the run name)")
    p.add_argument(
        "--checkpoint", help="checkpoint file name in the run folder for --export (default last.pt)"
    )
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Merge preset and flags into a :class:`TrainConfig`."""
    base: dict[str, Any] = dict(PRESETS[ns.preset]) if ns.preset else {}
    if getattr(ns, "data", None) and getattr(ns, "data_weights", None) is None:
        base.pop("data_weights", None)  # the preset's shares are per file of the preset's data
    types = {f.name: f.type for f in fields(TrainConfig)}
    for name, typ in types.items():
        v = getattr(ns, name, None)
        if v is None:
            continue
        if name == "data":
            base[name] = tuple(v)
        elif str(typ).startswith("tuple"):
            item = float if "float" in str(typ) else int if "int" in str(typ) else str
            try:
                base[name] = tuple(item(x) for x in v)
            except ValueError as err:
                raise SettingsError(f"train: --{name.replace('_', '-')} takes {item.__name__} "
                                    f"values; got {' '.join(v)}") from err
        elif typ == "bool":
            base[name] = bool(v)
        elif v.lower() == "none":
            base[name] = None
        elif "int" in str(typ):
            base[name] = int(v)
        elif "float" in str(typ):
            base[name] = float(v)
        else:
            base[name] = v
    try:
        return TrainConfig(**base)
    except TypeError as err:
        raise SettingsError(f"train: bad settings ({err})") from err


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``medrecon train`` / ``python -m medrecon.training``."""
    ns = build_parser().parse_args(argv)
    cfg = config_from_args(ns)
    if ns.export:
        import platform

        info = dict(CARD_INFO.get(ns.preset or "", {}))
        info["training"] = {
            "hardware": f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU"
            if not torch.cuda.is_available()
            else torch.cuda.get_device_name(),
            "software": f"torch {torch.__version__}",
        }
        path = export_prior(
            cfg.output_dir() / (ns.checkpoint or "last.pt"),
            ns.export,
            ns.name or cfg.run,
            overwrite=True,
            card=info,
            validate_on=str(_resolve(cfg.val_data)) if cfg.val_data else None,
        )
        print(path)
        return 0
    summary = train(cfg)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    print(json.dumps(summary))
    return 0
