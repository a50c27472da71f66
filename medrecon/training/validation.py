"""What a training run checks on itself: validation, the plateau rule and preview samples.

* ``val.csv`` (step, wall time, Tweedie denoising PSNR on validation slices at a few noise
  levels, :func:`validate`), written every ``validate_every_s`` seconds from the EMA weights.
* The plateau rule (:func:`validation_plateau`): a run stops when the last ``patience``
  validations of its whole curve (:func:`validation_curve`: the curve of the card it started
  from, then its own ``val.csv``, kept across resumes) all fall short of the best earlier one
  by ``min_delta_db``.
* ``samples_<step>.png``: EMA preview samples, drawn through the solvers' one loop
  (:func:`medrecon.solvers.presets.sample_unconditional`) and tiled by :func:`save_grid_png`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medrecon.errors import InputError
from medrecon.priors.networks import ScoreNet
from medrecon.priors.prior import tweedie_denoise
from medrecon.training.config import TrainConfig

__all__ = ["validate", "read_val_log", "validation_curve", "validation_plateau", "save_grid_png"]


def _psnr(x: Tensor, ref: Tensor) -> float:
    mse = float(((x - ref) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-20))


@torch.no_grad()
def validate(
    net: ScoreNet,
    images: Tensor,
    sigmas: Sequence[float] = (0.02, 0.05, 0.1, 0.2),
    seed: int = 1234,
    batch: int = 4,
) -> dict[str, float]:
    """Mean PSNR (peak 1, normalised space) of the Tweedie denoiser at each ``sigma``."""
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    res: dict[str, float] = {}
    for s in sigmas:
        vals = []
        for i in range(0, len(images), batch):
            x = images[i : i + batch].unsqueeze(1).float()
            y = x + s * torch.randn(x.shape, generator=gen)
            xh = tweedie_denoise(net.score, net.sde, y, s).clamp(0, 1)
            vals += [_psnr(xh[j], x[j]) for j in range(len(x))]
        res[f"psnr_sigma{s}"] = float(np.mean(vals))
    return res


def read_val_log(path: str | Path) -> list[dict[str, float]]:
    """Rows of a run's ``val.csv`` (step, wall_s, psnr_sigma...) as dicts; ``[]`` when absent."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        try:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        except (TypeError, ValueError) as err:
            raise InputError(path, f"unreadable validation log ({err})") from err


def validation_curve(
    earlier: dict[str, Any], rows: Sequence[dict[str, float]], upto_step: int | None = None
) -> list[dict[str, float]]:
    """A run's whole validation curve in the card's form (``step`` counted from the first
    training step, ``sigma*`` PSNR entries): the curve of the card it started from
    (``earlier["validation_rows"]``), then its own ``val.csv`` rows up to ``upto_step``."""
    own = [
        {
            "step": int(r["step"]) + int(earlier.get("steps", 0)),
            **{k.replace("psnr_sigma", "sigma"): r[k] for k in r if k.startswith("psnr_sigma")},
        }
        for r in rows
        if upto_step is None or r["step"] <= upto_step
    ]
    return [*earlier.get("validation_rows", []), *own]


def validation_plateau(rows: Sequence[dict[str, float]], patience: int, min_delta_db: float) -> bool:
    """True when none of the last ``patience`` validations beats the best earlier one by
    ``min_delta_db`` (mean PSNR over the ``sigma*`` entries of each row of a
    :func:`validation_curve`)."""
    if patience < 1 or len(rows) <= patience:
        return False
    score = [float(np.mean([v for k, v in r.items() if k.startswith("sigma")])) for r in rows]
    return max(score[-patience:]) < max(score[:-patience]) + min_delta_db


def _log_val(path: Path, step: int, wall: float, res: dict[str, float]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", "wall_s", *res.keys()])
        w.writerow([step, f"{wall:.1f}", *(f"{v:.3f}" for v in res.values())])


def _preview(ema: ScoreNet, config: TrainConfig, path: Path) -> None:
    ema.eval()
    gen = torch.Generator().manual_seed(config.seed + 7)
    s = config.sample_size
    from medrecon.solvers.presets import sample_unconditional  # the solvers' one loop

    with torch.no_grad():  # a position-aware net sees each sample as a whole image
        x = sample_unconditional(
            ema, (config.sample_count, 1, s, s), n_steps=config.sample_steps, snr=0.16, generator=gen
        )
    save_grid_png(x, path)


def save_grid_png(images: Tensor, path: Path, ncol: int = 4) -> None:
    """Tile ``(B, 1, H, W)`` images in [0, 1] into one grey PNG, ``ncol`` per row (fewer when
    there are fewer images)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import image as mpimg

    x = images[:, 0].detach().float().clamp(0, 1).cpu().numpy()
    b, h, w = x.shape
    ncol = max(1, min(ncol, b))
    nrow = math.ceil(b / ncol)
    grid = np.ones((nrow * (h + 2), ncol * (w + 2)), np.float32)
    for k in range(b):
        r, c = divmod(k, ncol)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = x[k]
    tmp = path.with_suffix(".tmp.png")
    mpimg.imsave(tmp, grid, cmap="gray", vmin=0, vmax=1)
    os.replace(tmp, path)
