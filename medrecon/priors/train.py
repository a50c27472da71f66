"""Train a score prior by denoising score matching (``medrecon train``, or :func:`train`).

What a run does
---------------
* Data: 2-D slices from ``.npz`` files (key ``images``, shape ``(N, H, W)``), normalised with
  the modality's normaliser (CT: HU window → [0, 1]; MRI: uint16 already scaled to
  ``[0, 1]·65535``), held in memory as float16.
  Files may carry ``valid_box`` (cropped series padded onto the canvas, ``ct/extra``): patches
  are drawn inside it (:func:`medrecon.datasets.training.valid_boxes`).
* Batches: an epoch is a seeded permutation of the slices (or, with ``data_weights``, as many
  weighted draws); each slice gives one random ``patch_size`` crop (or the whole image when
  ``patch_size`` is ``None``), flipped and rotated by a multiple of 90° at random.  Crops that
  are almost constant (air) are re-drawn up to three times.  The U-Net is fully convolutional
  with attention only at its lowest level, so a net trained on patches applies to whole
  images.  Mixed patch sizes (``patch_sizes`` with ``patch_probs``): each batch draws one
  size, and its batch size (``patch_batch``); a slice whose valid region cannot hold the size
  is passed over for that batch.
* Position-aware nets (``coords=True``, PaDIS): each patch comes with the x/y coordinates of
  its pixels in the whole slice (:func:`medrecon.priors.networks.image_coords`), and the flip
  and rotation move the coordinate channels with the image (see :class:`PatchSampler`).
* Loss: ``E_t E_z || F(x0 + std(t) z, t) + z ||^2`` — DSM with weighting ``std(t)^2``
  (Song et al. 2021), ``t ~ U(eps, 1)``.
* Optimiser AdamW with linear warm-up, gradient clipping, EMA of the weights.
* Checkpoints (``torch.save`` dicts, our own files, outside git) every
  ``checkpoint_every_s`` seconds and on SIGTERM/SIGINT into ``out_dir``: ``last.pt`` plus kept
  snapshots.  Resuming restores model, optimiser, EMA, both RNGs and the data position, so a
  resumed run takes exactly the step an uninterrupted one would.
* Logs: ``loss.csv`` (step, wall time, loss, lr, grad norm), ``val.csv`` (Tweedie denoising
  PSNR on validation slices), ``samples_<step>.png`` (EMA preview samples), a tqdm bar.
* ``init_from`` starts from shipped weights (model and EMA); the optimiser is re-initialised
  because shipped priors do not carry it.
* Multi-GPU: launched by ``torchrun`` (``WORLD_SIZE > 1``) it wraps the net in DDP (NCCL on
  GPUs, gloo on CPUs); each rank draws its own batches of ``batch_size`` (the effective batch is
  ``world × batch_size``), rank 0 writes files.  Checkpoints hold every rank's data position and
  noise RNG, so a resume with the same number of processes is exact; another number resumes the
  weights and optimiser with fresh streams.  Stopping (signal, ``max_time_s``) and clock-driven
  checkpoints are agreed by all ranks, so no rank is left waiting in an all-reduce.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medrecon.datasets.training import dihedral, npz_source_info, patch_origin, valid_boxes
from medrecon.errors import InputError, SettingsError
from medrecon.priors.networks import (
    NetworkSpec,
    ScoreNet,
    image_coords,
    network_spec,
    widen_for_coords,
)
from medrecon.priors.normalise import Normaliser, ct_normaliser, mri_normaliser
from medrecon.priors.prior import ScorePrior, fit_high_noise, native_bf16, sigma_to_t, tweedie_denoise
from medrecon.priors.registry import read_card, write_card
from medrecon.priors.sde import SDE, VESDE, VPSDE

__all__ = [
    "TrainConfig",
    "train",
    "load_slices",
    "load_training_data",
    "PatchSampler",
    "PRESETS",
    "data_root",
    "runtime_info",
    "main",
]

CKPT_FORMAT = "medrecon-train-ckpt-1"
RESERVED = ("val.npz", "totalseg_example_ct")  # never train on these (benchmarks / validation)
PRECISIONS = ("float32", "bfloat16", "auto")
T_DISTS = ("uniform", "focused")


def data_root() -> Path:
    """``$MEDRECON_DATA``, default ``../shared/data``."""
    return Path(os.environ.get("MEDRECON_DATA", "../shared/data"))


def default_out_dir(run: str) -> Path:
    """``~/.cache/medrecon/train/<run>`` (outside the repository)."""
    return (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medrecon" / "train" / run
    )


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (flat, typed, with defaults).

    Parameters
    ----------
    run : str
        Run name; the default ``out_dir`` is ``~/.cache/medrecon/train/<run>``.
    data : tuple of str
        ``.npz`` files with ``images`` (N, H, W); relative paths are under :func:`data_root`.
    modality : {"ct", "mri"}
        Chooses the normaliser.
    size : str
        Network size ("tiny", "S", "M").
    sde : {"ve", "vp"}
    sigma_min, sigma_max : float
        VE noise range (normalised units).
    beta_min, beta_max : float
        VP schedule.
    sigma_data : float
        Typical std of normalised images (VE input scaling).
    patch_size : int or None
        Random square crops of this size; ``None`` trains on whole images.  Must be ``None``
        when ``patch_sizes`` is given.
    patch_sizes : tuple of int
        Mixed patch sizes (e.g. ``(64, 128, 256)``; a size equal to the slices' is a whole
        slice); each batch draws one.  Empty: ``patch_size`` alone.
    patch_probs : tuple of float
        Probability of each of ``patch_sizes`` (empty: equal; normalised to sum 1).
    patch_batch : tuple of int
        Batch size for each of ``patch_sizes`` (empty: ``batch_size`` for all), e.g.
        ``(16, 4, 1)`` for the same pixel count per step.
    coords : bool
        Position-aware network (two coordinate input channels, PaDIS); patches carry the
        coordinates of their pixels in the whole slice.
    augment : bool
        Random flips and 90° rotations (the coordinates move with the image).
    data_weights : tuple of float
        Share of the draws for each file of ``data`` (empty: in proportion to its slices).
    batch_size : int
    lr, weight_decay, warmup_steps, grad_clip, ema_decay : float / int
        AdamW, linear warm-up, global-norm clipping, EMA decay.
    max_steps : int
        Stop after this many optimiser steps in total.
    max_time_s : float or None
        Stop after this much wall time in this invocation.
    checkpoint_every_s : float
        Seconds between checkpoints (also written on SIGTERM/SIGINT and at the end).
    snapshot_every_steps : int
        Keep ``step_<n>.pt`` copies this often (0: never).
    log_every : int
        Steps between loss-log lines.
    val_data : str or None
        Validation ``.npz`` for denoising PSNR (not trained on).
    val_slices : int
        Number of validation slices used during training.
    validate_every_s : float
        Seconds between validations (0: never).
    patience : int
        Stop when the last ``patience`` validations (``val.csv``, kept across resumes) all fall
        short of the best earlier one by ``min_delta_db`` (0: never stop on validation).
    min_delta_db : float
        Smallest gain of the mean validation PSNR (dB, over the noise levels) that counts as
        improving.
    sample_every_s : float
        Seconds between preview sample grids (0: never).
    sample_size : int
        Preview sample size (pixels).
    sample_steps : int
        Predictor steps for previews.
    sample_count : int
        Preview samples per grid.
    seed : int
    threads : int or None
        ``torch.set_num_threads`` (intra-op threads of this process).  Whether tcmalloc is
        preloaded and how many threads ran are recorded (:func:`runtime_info`) in the
        checkpoint, the summary and the exported card.
    out_dir : str or None
    init_from : str or None
        Shipped prior (name or card path) to start from; optimiser re-initialised.
    precision : {"float32", "bfloat16", "auto"}
        Arithmetic of the training forward and backward pass: ``"bfloat16"`` autocasts them
        (weights, gradients, optimiser and EMA stay float32); ``"auto"`` is bfloat16 where the
        CPU computes it natively (AVX512-BF16 / AMX) and float32 elsewhere.
    compile : bool
        ``torch.compile`` the network for the training step (its first steps pay the compile).
    t_dist : {"uniform", "focused"}
        Diffusion times of the training noise: uniform in ``[eps, 1]``, or ``"focused"``: a share
        ``high_share`` uniform and the rest at noise levels log-uniform in ``[sigma_min,
        focus_sigma]`` (the levels DDS and CCDF query from a classical start).
    focus_sigma : float
        Largest noise level (normalised units, noise of ``x_t / a(t)``) of the focused draws.
    high_share : float
        Share of uniform draws (all noise levels) under ``t_dist="focused"``.
    resume : bool
        Continue from ``out_dir/last.pt`` when present.
    progress : bool
        Show a tqdm progress bar.
    """

    run: str = "run"
    data: tuple[str, ...] = ()
    modality: str = "ct"
    size: str = "S"
    sde: str = "ve"
    sigma_min: float = 0.01
    sigma_max: float = 60.0
    beta_min: float = 0.1
    beta_max: float = 20.0
    sigma_data: float = 0.2
    patch_size: int | None = 64
    patch_sizes: tuple[int, ...] = ()
    patch_probs: tuple[float, ...] = ()
    patch_batch: tuple[int, ...] = ()
    coords: bool = False
    augment: bool = True
    data_weights: tuple[float, ...] = ()
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    max_steps: int = 1_000_000
    max_time_s: float | None = None
    checkpoint_every_s: float = 600.0
    snapshot_every_steps: int = 0
    log_every: int = 25
    val_data: str | None = None
    val_slices: int = 8
    validate_every_s: float = 1800.0
    patience: int = 0
    min_delta_db: float = 0.02
    sample_every_s: float = 1800.0
    sample_size: int = 64
    sample_steps: int = 100
    sample_count: int = 8
    seed: int = 0
    threads: int | None = None
    out_dir: str | None = None
    init_from: str | None = None
    resume: bool = True
    progress: bool = True
    precision: str = "float32"
    compile: bool = False
    t_dist: str = "uniform"
    focus_sigma: float = 0.5
    high_share: float = 0.25

    def __post_init__(self) -> None:
        if self.modality not in ("ct", "mri"):
            raise SettingsError(
                f"TrainConfig: modality must be 'ct' or 'mri'; got {self.modality!r}"
            )
        if self.sde not in ("ve", "vp"):
            raise SettingsError(f"TrainConfig: sde must be 've' or 'vp'; got {self.sde!r}")
        if self.patch_size is not None and (self.patch_size < 8 or self.patch_size % 8):
            raise SettingsError(
                f"TrainConfig: patch_size must be a multiple of 8 (>= 8); got {self.patch_size}"
            )
        if self.patch_sizes:
            if self.patch_size is not None:
                raise SettingsError(
                    f"TrainConfig: give patch_size=None with patch_sizes {self.patch_sizes}; "
                    f"got patch_size={self.patch_size}"
                )
            if any(p < 8 or p % 8 for p in self.patch_sizes) or len(set(self.patch_sizes)) < len(
                self.patch_sizes
            ):
                raise SettingsError(
                    "TrainConfig: patch_sizes must be distinct multiples of 8 (>= 8); got "
                    f"{self.patch_sizes}"
                )
        n_sizes = len(self.patch_sizes)
        for name, vals in (("patch_probs", self.patch_probs), ("patch_batch", self.patch_batch)):
            if vals and (len(vals) != n_sizes or any(v <= 0 for v in vals)):
                raise SettingsError(
                    f"TrainConfig: {name} must be empty or {n_sizes} positive values, one per "
                    f"patch size {self.patch_sizes}; got {vals}"
                )
        if self.data_weights and (
            len(self.data_weights) != len(self.data)
            or any(w < 0 for w in self.data_weights)
            or not sum(self.data_weights) > 0
        ):
            raise SettingsError(
                f"TrainConfig: data_weights must be empty or {len(self.data)} non-negative "
                f"values (one per data file) with a positive sum; got {self.data_weights}"
            )
        if self.precision not in PRECISIONS:
            raise SettingsError(
                f"TrainConfig: precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"
            )
        if self.t_dist not in T_DISTS:
            raise SettingsError(f"TrainConfig: t_dist must be one of {', '.join(T_DISTS)}; got {self.t_dist!r}")
        if not (0.0 <= self.high_share <= 1.0) or not self.focus_sigma > self.sigma_min:
            raise SettingsError(
                f"TrainConfig: high_share must lie in [0, 1] and focus_sigma above sigma_min "
                f"({self.sigma_min}); got {self.high_share}, {self.focus_sigma}"
            )
        if self.sample_count < 1:
            raise SettingsError(f"TrainConfig: sample_count must be >= 1; got {self.sample_count}")
        if self.patience < 0 or self.min_delta_db < 0:
            raise SettingsError(
                f"TrainConfig: patience and min_delta_db must be >= 0; got {self.patience}, "
                f"{self.min_delta_db}"
            )
        if self.batch_size < 1 or self.max_steps < 0:
            raise SettingsError("TrainConfig: batch_size must be >= 1 and max_steps >= 0")
        network_spec(self.size)
        for d in self.data:
            if any(r in Path(d).name for r in RESERVED):
                raise SettingsError(
                    f"TrainConfig: {d} is reserved for validation/benchmarks; do not train on it"
                )

    # architecture-defining fields: must match when resuming
    ARCH_FIELDS = (
        "modality",
        "size",
        "sde",
        "sigma_min",
        "sigma_max",
        "beta_min",
        "beta_max",
        "sigma_data",
        "patch_size",
        "patch_sizes",
        "patch_probs",
        "patch_batch",
        "coords",
        "augment",
        "data_weights",
        "batch_size",
        "data",
        "seed",
    )

    def network_spec(self) -> NetworkSpec:
        """Architecture of this run's network (the named size, with coordinate channels when
        ``coords``)."""
        return replace(network_spec(self.size), coords=self.coords)

    def build_sde(self) -> SDE:
        """Build the forward SDE of this run."""
        if self.sde == "ve":
            return VESDE(self.sigma_min, self.sigma_max)
        return VPSDE(self.beta_min, self.beta_max)

    def normaliser(self) -> Normaliser:
        """Normaliser of the modality (MRI: the fixed ``/65535`` of the shipped data)."""
        return ct_normaliser() if self.modality == "ct" else mri_normaliser()

    def output_dir(self) -> Path:
        """Where checkpoints and logs go."""
        return Path(self.out_dir) if self.out_dir else default_out_dir(self.run)


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else data_root() / p


def load_slices(paths: Sequence[str], modality: str) -> Tensor:
    """Read ``images`` from ``.npz`` files and normalise them; returns float16 ``(N, H, W)``.

    CT files are HU (int16) → ``(HU + 1024) / 4096`` clipped; MRI files are uint16 scaled
    ``[0, 1]·65535`` → ``/ 65535``.  (:func:`load_training_data` also returns each slice's
    valid region and file.)

    Raises
    ------
    InputError
        A file is missing, unreadable or has no 3-D ``images`` array.
    """
    return load_training_data(paths, modality)[0]


def load_training_data(paths: Sequence[str], modality: str) -> tuple[Tensor, Tensor, Tensor]:
    """Slices of ``.npz`` files, normalised, with the region of real data in each.

    Parameters
    ----------
    paths : sequence of str
        ``.npz`` files with ``images`` ``(N, H, W)`` (relative paths are under
        :func:`data_root`), optionally ``valid_box`` ``(N, 4)``.
    modality : {"ct", "mri"}

    Returns
    -------
    images : Tensor, shape (N, H, W), float16
        As :func:`load_slices`.
    boxes : Tensor, shape (N, 4), int64
        ``(row0, row1, col0, col1)`` half-open: ``valid_box`` where the file has it (cropped
        series padded onto the canvas), else the whole slice.
    owner : Tensor, shape (N,), int64
        Index into ``paths`` of each slice's file.

    Raises
    ------
    InputError
        A file is missing, unreadable, has no 3-D ``images`` array or a bad ``valid_box``.
    SettingsError
        The files' slices differ in size.
    """
    out, boxes, owner = [], [], []
    for k, p in enumerate(paths):
        f = _resolve(p)
        try:
            with np.load(f) as z:
                if "images" not in z.files:
                    raise InputError(f, f"no 'images' array (has {', '.join(z.files)})")
                a = z["images"]
                if a.ndim != 3:
                    raise InputError(f, f"'images' must be (N, H, W); got shape {a.shape}")
                box = valid_boxes(z, a.shape[0], a.shape[1:], f)
        except (OSError, ValueError) as err:
            raise InputError(f, f"cannot read training data ({err})") from err
        x = torch.from_numpy(a.astype(np.float32))
        if modality == "ct":
            x = ct_normaliser().normalise(x)
        else:
            x = (x / 65535.0).clamp(0, 1) if a.dtype == np.uint16 else x.clamp(0, 1)
        out.append(x.to(torch.float16))
        boxes.append(torch.from_numpy(box))
        owner.append(torch.full((a.shape[0],), k, dtype=torch.int64))
    shapes = {tuple(x.shape[1:]) for x in out}
    if len(shapes) > 1:
        raise SettingsError(f"load_slices: all slices must share one size; got {sorted(shapes)}")
    return torch.cat(out), torch.cat(boxes), torch.cat(owner)


class PatchSampler:
    """Seeded, resumable batches of augmented crops (and their coordinate channels).

    Parameters
    ----------
    images : Tensor, shape (N, H, W)
    batch_size : int
    patch_size : int or None
        One patch size (``None``: whole slices); must be ``None`` with ``patch_sizes``.
    seed : int
    boxes : Tensor, shape (N, 4), optional
        Valid region of each slice (``(row0, row1, col0, col1)``, half-open); patches stay
        inside it, and a whole-slice draw (``patch_size=None``) takes only slices whose region
        is the whole slice.  Default: whole slices.
    patch_sizes : sequence of int, optional
        Mixed sizes: each batch draws one (probabilities ``patch_probs``, batch size
        ``patch_batch``).  A slice whose region cannot hold the size is passed over for
        that batch (it comes back with the next permutation).
    patch_probs, patch_batch : sequence, optional
        As in :class:`TrainConfig`.
    weights : Tensor, shape (N,), optional
        Relative draw probability of each slice: an epoch is then ``N`` weighted draws with
        replacement instead of a permutation.
    augment : bool
        Random flips and 90° rotations.

    Notes
    -----
    **Coordinates follow the flip and rotation** (:meth:`next_batch_coords`).  A patch at
    ``(top, left)`` of an ``H x W`` slice gets ``image_coords(p, p, top=top, left=left,
    frame=(H, W))`` — the coordinates of its pixels in the slice's display frame (row 0
    anterior, column 0 the patient's right) — and the same :func:`dihedral` transform is then
    applied to the image and the coordinate channels, so every pixel keeps its true position
    in the slice, wherever the transform puts it.  This is the convention consistent with
    whole-image inference: there the net sees an image in the display frame with the plain grid
    ``image_coords(H, W)``, which is exactly a training input drawn with the identity
    transform, so what the net learns for the plain grid is the distribution of unrotated
    slices (anatomy where it belongs: spine posterior, table below).  The rotated draws carry
    visibly rotated coordinate fields (x no longer increasing along the columns), so they do
    not blur that; they still teach the filters the rotated textures.  The other convention,
    the plain grid of the augmented patch's own frame, would make the net learn the
    8-fold symmetrised distribution for that grid, and at inference it would find a patient
    upside down as likely as upright.  ``augment=False`` trains on the identity alone.

    The random stream is that of the single-size sampler whenever one size is used (the
    whole-slice box gives the same corners), so runs started before boxes, sizes and
    coordinates existed resume exactly.
    """

    def __init__(
        self,
        images: Tensor,
        batch_size: int,
        patch_size: int | None,
        seed: int,
        *,
        boxes: Tensor | None = None,
        patch_sizes: Sequence[int] = (),
        patch_probs: Sequence[float] = (),
        patch_batch: Sequence[int] = (),
        weights: Tensor | None = None,
        augment: bool = True,
    ):
        self.images = images
        self.batch_size = batch_size
        self.patch_size = patch_size
        self.augment = augment
        n, h, w = images.shape
        if patch_sizes and patch_size is not None:
            raise SettingsError("PatchSampler: give patch_size=None with patch_sizes")
        self.sizes: list[int | None] = list(patch_sizes) if patch_sizes else [patch_size]
        probs = torch.tensor(
            [float(v) for v in patch_probs] if patch_probs else [1.0] * len(self.sizes),
            dtype=torch.float64,
        )
        self.cum_probs = (probs / probs.sum()).cumsum(0)
        self.batches = [int(b) for b in patch_batch] if patch_batch else [batch_size] * len(self.sizes)
        full = torch.tensor([0, h, 0, w], dtype=torch.int64)
        self.boxes = full.expand(n, 4).clone() if boxes is None else boxes.to(torch.int64)
        if self.boxes.shape != (n, 4):
            raise SettingsError(f"PatchSampler: boxes must be ({n}, 4); got {tuple(self.boxes.shape)}")
        self.weights = None if weights is None else weights.to(torch.float64)
        bh = self.boxes[:, 1] - self.boxes[:, 0]
        bw = self.boxes[:, 3] - self.boxes[:, 2]
        self.eligible = []
        for p in self.sizes:
            if p is not None and (p > h or p > w):
                raise SettingsError(f"PatchSampler: patch_size {p} exceeds image size {h}x{w}")
            ok = (self.boxes == full).all(1) if p is None else (bh >= p) & (bw >= p)
            if self.weights is not None:
                ok = ok & (self.weights > 0)
            if not bool(ok.any()):
                raise SettingsError(
                    f"PatchSampler: no slice can give a {'whole-slice' if p is None else p} "
                    "patch inside its valid region"
                )
            self.eligible.append(ok)
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.pos = 0
        self.perm = self._new_perm()

    def _new_perm(self) -> Tensor:
        if self.weights is None:
            return torch.randperm(len(self.images), generator=self.gen)
        return torch.multinomial(self.weights, len(self.images), replacement=True, generator=self.gen)

    def state_dict(self) -> dict[str, Any]:
        """Return the data position and RNG state."""
        return {
            "gen": self.gen.get_state(),
            "epoch": self.epoch,
            "pos": self.pos,
            "perm": self.perm.clone(),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.gen.set_state(s["gen"])
        self.epoch, self.pos, self.perm = int(s["epoch"]), int(s["pos"]), s["perm"].clone()

    def _next_index(self) -> int:
        if self.pos >= len(self.perm):
            self.epoch += 1
            self.pos = 0
            self.perm = self._new_perm()
        i = int(self.perm[self.pos])
        self.pos += 1
        return i

    def next_batch(self) -> Tensor:
        """Draw the next float32 batch ``(B, 1, P, P)``."""
        return self._draw(with_coords=False)[0]

    def next_batch_coords(self) -> tuple[Tensor, Tensor]:
        """Draw the next batch and its coordinate channels: ``(B, 1, P, P)`` images and
        ``(B, 2, P, P)`` x/y coordinates of each pixel in its whole slice, transformed with the
        image (see the class notes)."""
        x, c = self._draw(with_coords=True)
        assert c is not None
        return x, c

    def _draw(self, with_coords: bool) -> tuple[Tensor, Tensor | None]:
        k = 0
        if len(self.sizes) > 1:  # one extra draw only when sizes are mixed
            u = float(torch.rand(1, generator=self.gen, dtype=torch.float64))
            k = min(int(torch.searchsorted(self.cum_probs, torch.tensor([u], dtype=torch.float64))),
                    len(self.sizes) - 1)
        p, ok = self.sizes[k], self.eligible[k]
        h, w = self.images.shape[1:]
        out, coords = [], []
        for _ in range(self.batches[k]):
            i = self._next_index()
            while not bool(ok[i]):
                i = self._next_index()
            img = self.images[i]
            r = torch.randint(0, 2**31 - 1, (10,), generator=self.gen).tolist()
            crop, top, left = img, 0, 0
            if p is not None:
                for j in range(4):  # up to 4 candidates; keep the first that is not flat air
                    top, left = patch_origin(self.boxes[i].tolist(), p, r[2 * j], r[2 * j + 1])
                    crop = img[top : top + p, left : left + p]
                    if float(crop.float().std()) > 0.01:
                        break
            rot, flip = (r[8] % 4, bool(r[9] % 2)) if self.augment else (0, False)
            out.append(dihedral(crop, rot, flip))
            if with_coords:
                c = image_coords(crop.shape[0], crop.shape[1], top=top, left=left, frame=(h, w))
                coords.append(dihedral(c[0], rot, flip))
        x = torch.stack(out).unsqueeze(1).float()
        return x, (torch.stack(coords) if with_coords else None)


def sample_t(
    sde: SDE,
    n: int,
    gen: torch.Generator,
    device: torch.device | str = "cpu",
    dist: str = "uniform",
    focus_sigma: float = 0.5,
    high_share: float = 0.25,
) -> Tensor:
    """``n`` training diffusion times: uniform in ``[eps, 1]`` (``dist="uniform"``), or
    ``"focused"``: each draw is uniform with probability ``high_share`` and otherwise uniform in
    ``[eps, t(focus_sigma)]`` (log-uniform noise levels for the VE SDE).  Two uniforms are
    drawn per item in either case, so the random stream does not depend on ``dist``."""
    u = torch.rand(2, n, generator=gen, device=device)
    t = sde.eps + (1.0 - sde.eps) * u[0]
    if dist == "focused":
        t_hi = float(sigma_to_t(sde, focus_sigma))
        low = sde.eps + (t_hi - sde.eps) * u[0]
        t = torch.where(u[1] < high_share, t, low)
    elif dist != "uniform":
        raise SettingsError(f"sample_t: dist must be one of {', '.join(T_DISTS)}; got {dist!r}")
    return t


def train_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 when a training step with this ``precision`` should autocast to it, else None
    (float32): ``"auto"`` asks whether the CPU computes bfloat16 natively."""
    if precision == "bfloat16" or (precision == "auto" and device.type == "cpu" and native_bf16()):
        return torch.bfloat16
    return None


def dsm_loss(
    net: torch.nn.Module,
    sde: SDE,
    x0: Tensor,
    gen: torch.Generator,
    coords: Tensor | None = None,
    t: Tensor | None = None,
    cast: torch.dtype | None = None,
) -> Tensor:
    """Denoising score-matching loss ``mean || F(x_t, t) + z ||^2`` (weighting ``std^2``);
    ``coords`` (position-aware nets) are passed to the net with the noisy patches; ``t``
    (default: uniform, :func:`sample_t`) the diffusion times; ``cast`` (bfloat16) autocasts
    the network, the loss is summed in float32."""
    if t is None:
        t = sample_t(sde, x0.shape[0], gen, x0.device)
    t = t.to(x0.dtype)
    xt, z, _ = sde.perturb(x0, t, generator=gen)
    with torch.autocast(x0.device.type, dtype=cast or torch.bfloat16, enabled=cast is not None):
        out = net(xt, t) if coords is None else net(xt, t, coords)
    return ((out.float() + z) ** 2).mean()


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


class _Stop:
    """SIGTERM/SIGINT → finish the step, checkpoint, exit."""

    def __init__(self) -> None:
        self.flag = False
        self.old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only`` loading: no arbitrary unpickling)."""
    path = Path(path)
    try:
        from torch.torch_version import TorchVersion

        with torch.serialization.safe_globals([TorchVersion]):  # early checkpoints stored it
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise InputError(path, f"not a readable training checkpoint ({err})") from err
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise InputError(
            path, f"not a medrecon training checkpoint (expected format {CKPT_FORMAT})"
        )
    return ck


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
    ck = load_checkpoint(checkpoint)
    cfg = TrainConfig(**_cfg_from_dict(ck["config"]))
    net = ScoreNet(cfg.network_spec(), cfg.build_sde(), cfg.sigma_data)
    net.load_state_dict(ck["ema"])
    prior = ScorePrior(net, cfg.normaliser())
    earlier = ck.get("earlier", {"steps": 0, "wall_time_s": 0.0})
    training = {
        "steps": earlier["steps"] + ck["step"],
        "wall_time_s": round(earlier["wall_time_s"] + ck["wall_s"], 1),
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
    extra: dict[str, Any] = dict(card or {})
    extra["training"] = {**training, **extra.get("training", {})}
    extra["training_data"] = card_training_data(cfg.data, extra.get("training_data"))
    summary = licence_summary(extra["training_data"])
    if summary:
        extra["licence_summary"] = summary
    replaced = Path(directory) / f"{name}.json"
    if overwrite and replaced.exists():
        # measurements made on the prior (tuned solver settings, uncertainty calibrations) are
        # kept with the sha256 of the weights they were measured on, so that they are not applied
        # to the new weights (solvers.cards.tuned_on_other_weights) until re-measured
        before_card = read_card(replaced)
        kept = {k: before_card[k] for k in ("tuned", "calibration") if k in before_card and k not in extra}
        if before_card.get("sha256"):
            for section in kept.values():  # entries older than the hash field
                for methods in section.values():
                    for entry in methods.values():
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
        high = fit_high_noise(back, load_slices(cfg.data, cfg.modality), val[:: max(1, len(val) // 8)][:8])
        card_now["high_noise"] = {
            **high,
            "how": "score = w·network + (1 − w)·Gaussian(mean, var) score, w = 1/(1 + (σ/sigma_c)^4); "
            "sigma_c = the noise level above which the Gaussian Tweedie estimate beats the network's "
            "on the validation images (medrecon.priors.prior.fit_high_noise)",
        }
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
        history = read_val_log(Path(checkpoint).parent / "val.csv")
        if history:  # the run's validation curve (first val_slices slices, during training)
            card_now["validation"]["during_training"] = {
                "slices": ck["config"].get("val_slices"),
                "steps_offset": earlier["steps"],
                "rows": validation_curve(earlier, history, upto_step=ck["step"]),
            }
        write_card(path, card_now)
    return path


def card_training_data(
    data: Sequence[str], curated: Sequence[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The card's list of training files with their licences.

    ``curated`` entries (a preset's :data:`CARD_INFO`, one or more per file, with
    ``non_commercial`` / ``origin_documented`` where reviewed) are kept as written; every file
    of ``data`` that none of them names is added as found in the file
    (:func:`medrecon.datasets.training.npz_source_info`: slices, patients, source, collection,
    licence) with ``"licence_reviewed": False``, so no training file goes unlisted.
    """
    out = [dict(e) for e in (curated or [])]
    named = {e.get("file") for e in out}
    for f in data:
        if f not in named:
            info = npz_source_info(_resolve(f), name=f)
            out.append({**info, "licence_reviewed": False})
    return out


def licence_summary(entries: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Files of a card's ``training_data`` that are non-commercial, of undocumented origin or
    whose licence nobody reviewed (empty lists left out)."""
    groups = {
        "non_commercial": [e["file"] for e in entries if e.get("non_commercial")],
        "origin_undocumented": [e["file"] for e in entries if e.get("origin_documented") is False],
        "licence_not_reviewed": [e["file"] for e in entries if e.get("licence_reviewed") is False],
    }
    return {k: sorted(set(v)) for k, v in groups.items() if v}


def cpu_model() -> str:
    """The CPU's model name and whether it computes bfloat16 natively (for timing records)."""
    name = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    flags = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    isa = "AVX512-BF16" if "avx512_bf16" in flags else ("AVX2" if "avx2" in flags else "")
    return f"{name or 'unknown CPU'} ({isa or 'no AVX2'}, {os.cpu_count()} cores)"


def runtime_info() -> dict[str, Any]:
    """How this process computes: intra-op threads, whether tcmalloc is preloaded (it is
    mapped into the process), ``OMP_WAIT_POLICY``, device — for comparing thread settings
    (one run at 2 threads with tcmalloc against two runs at 1 thread)."""
    tcmalloc = False
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as f:
            tcmalloc = any("tcmalloc" in line for line in f)
    return {
        "threads": torch.get_num_threads(),
        "tcmalloc": tcmalloc,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def _cfg_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    tuples = {f.name for f in fields(TrainConfig) if str(f.type).startswith("tuple")}
    names = {f.name for f in fields(TrainConfig)}
    d = {k: v for k, v in d.items() if k in names}
    for k in tuples & set(d):
        d[k] = tuple(d[k])
    return d


def _make_sampler(
    config: TrainConfig, images: Tensor, boxes: Tensor, owner: Tensor, seed: int
) -> PatchSampler:
    weights = None
    if config.data_weights:  # each file's share of the draws, spread over its slices
        share = torch.tensor(config.data_weights, dtype=torch.float64)
        counts = torch.bincount(owner, minlength=len(config.data)).to(torch.float64)
        weights = (share / counts.clamp_min(1))[owner]
    return PatchSampler(
        images,
        config.batch_size,
        config.patch_size,
        seed,
        boxes=boxes,
        patch_sizes=config.patch_sizes,
        patch_probs=config.patch_probs,
        patch_batch=config.patch_batch,
        weights=weights,
        augment=config.augment,
    )


def _agree(world: int, *flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all ranks (one tiny all-reduce under DDP)."""
    if world == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def _ddp() -> tuple[int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank() if ws > 1 else 0), ws


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary dict.

    Parameters
    ----------
    config : TrainConfig

    Returns
    -------
    dict
        ``step``, ``wall_s``, ``last_loss``, ``out_dir``, ``checkpoint``, ``stopped_by``,
        ``runtime`` (:func:`runtime_info`).

    Raises
    ------
    SettingsError
        Resuming with settings that differ from the checkpoint's.
    InputError
        Unreadable data or checkpoint.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    runtime = runtime_info()
    rank, world = _ddp()
    if rank == 0 and runtime["device"] == "cpu" and runtime["threads"] > 1 and not runtime["tcmalloc"]:
        print(f"train: {runtime['threads']} threads without tcmalloc: on a shared 2-core host "
              "preload it (LD_PRELOAD=.../libtcmalloc_minimal.so.4) and set "
              "OMP_WAIT_POLICY=PASSIVE (docs/priors.md)", file=sys.stderr)
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    )
    out = config.output_dir()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    sde = config.build_sde()
    with torch.random.fork_rng(devices=[]):  # seeded initialisation; global RNG untouched
        torch.manual_seed(config.seed)
        net = ScoreNet(config.network_spec(), sde, config.sigma_data).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    images, boxes, owner = load_training_data(config.data, config.modality)
    sampler = _make_sampler(config, images, boxes, owner, config.seed * 1000 + rank)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed * 1000 + 500 + rank)
    step, wall = 0, 0.0
    earlier = {"steps": 0, "wall_time_s": 0.0}  # training the init_from weights had already had
    ckpath = out / "last.pt"
    if config.resume and ckpath.exists():
        ck = load_checkpoint(ckpath)
        old = TrainConfig(**_cfg_from_dict(ck["config"]))  # fields added since: defaults
        diff = [k for k in TrainConfig.ARCH_FIELDS if getattr(old, k) != getattr(config, k)]
        if diff:
            raise SettingsError(
                f"train: {ckpath} was made with other settings ({', '.join(diff)}); "
                "use another run name/out_dir or resume=False"
            )
        net.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        step, wall = int(ck["step"]), float(ck["wall_s"])
        earlier = dict(ck.get("earlier", earlier))
        ranks = ck.get("rank_states") or [{"sampler": ck["sampler"], "noise_rng": ck["noise_rng"]}]
        if len(ranks) == world:  # exact resume: every rank continues its own data and noise
            sampler.load_state_dict(ranks[rank]["sampler"])
            noise_gen.set_state(ranks[rank]["noise_rng"])
        else:  # another number of processes: fresh, distinct streams from the step on
            sampler = _make_sampler(config, images, boxes, owner,
                                    config.seed * 1000 + rank + 7919 * step)
            noise_gen.manual_seed(config.seed * 1000 + 500 + rank + 7919 * step)
            if rank == 0:
                print(f"train: {ckpath} was written by {len(ranks)} process(es), this run has {world}: "
                      "resuming the weights and optimiser with new data/noise streams (not bit-exact)",
                      file=sys.stderr)
        _truncate_log(out / "loss.csv", step)
        _truncate_log(out / "val.csv", step)
    elif config.init_from:
        init = ScorePrior.load(config.init_from)
        widen = net.spec.coords and not init.net.spec.coords
        base = replace(net.spec, coords=False) if widen else net.spec
        if init.net.spec != base or init.sde.to_dict() != sde.to_dict():
            raise SettingsError(f"train: init_from {config.init_from} has another architecture/SDE")
        state = init.net.unet.state_dict()
        # a position-aware net may start from weights without coordinates: the coordinate
        # channels get zero input weights, so it starts as exactly the net it came from
        net.unet.load_state_dict(widen_for_coords(state) if widen else state)
        ema.load_state_dict(net.state_dict())
        # shipped weights carry no optimiser state: AdamW starts fresh (warm-up again)
        before = init.card.get("training", {})
        earlier = {
            "steps": int(before.get("steps", 0)),
            "wall_time_s": float(before.get("wall_time_s", 0.0)),
            # the validation curve of those steps, which the exported card's curve continues
            "validation_rows": [
                r for r in init.card.get("validation", {}).get("during_training", {}).get("rows", [])
                if r.get("step", 0) <= int(before.get("steps", 0))
            ],
        }
    model: torch.nn.Module = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net)
    if config.compile:
        model = torch.compile(model)
    cast = train_autocast(config.precision, device)
    runtime["precision"] = "bfloat16" if cast is not None else "float32"
    runtime["compile"] = bool(config.compile)
    runtime["cpu"] = cpu_model()
    val_images = (
        load_slices([config.val_data], config.modality)[: config.val_slices]
        if config.val_data
        else None
    )

    def checkpoint(keep: bool = False) -> Path:
        # collective under DDP: every rank's data position and noise RNG go into the file
        mine = {"sampler": sampler.state_dict(), "noise_rng": noise_gen.get_state()}
        ranks = [mine]
        if world > 1:
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, mine)
        state = {
            "format": CKPT_FORMAT,
            "config": {**asdict(config), "data": list(config.data)},
            "step": step,
            "wall_s": wall,
            "model": net.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "sampler": sampler.state_dict(),
            "noise_rng": noise_gen.get_state(),
            "rank_states": ranks,
            "earlier": earlier,
            "runtime": runtime,
            "torch_version": str(torch.__version__),
        }
        if rank == 0:
            _atomic_save(state, ckpath)
            if keep:
                _atomic_save(state, out / f"step_{step:07d}.pt")
        return ckpath

    bar = None
    if config.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(
            total=config.max_steps,
            initial=step,
            mininterval=30,
            desc=config.run,
            file=sys.stderr,
            dynamic_ncols=False,
        )
    log_f = open(out / "loss.csv", "a", newline="") if rank == 0 else None
    writer = csv.writer(log_f) if log_f else None
    if log_f and log_f.tell() == 0 and writer:
        writer.writerow(["step", "wall_s", "loss", "lr", "grad_norm"])
    t_start = time.monotonic()
    t_last_ck = t_last_val = t_last_sample = t_start
    acc_loss, acc_n, gnorm = 0.0, 0, 0.0
    stopped_by, last_loss = "max_steps", float("nan")
    plateau = False  # set on rank 0 by a validation, agreed by all ranks at the next step
    try:
        with _Stop() as stop:
            t_prev = time.monotonic()
            while step < config.max_steps:
                net.train()
                c0 = None
                if config.coords:
                    x0, c0 = sampler.next_batch_coords()
                    x0, c0 = x0.to(device), c0.to(device)
                else:
                    x0 = sampler.next_batch().to(device)
                lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
                for g in opt.param_groups:
                    g["lr"] = lr
                t = sample_t(sde, x0.shape[0], noise_gen, device, config.t_dist,
                             config.focus_sigma, config.high_share)
                loss = dsm_loss(model, sde, x0, noise_gen, coords=c0, t=t, cast=cast)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip))
                opt.step()
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for pe, pn in zip(ema.parameters(), net.parameters(), strict=True):
                        pe.lerp_(pn, 1.0 - decay)
                    for be, bn in zip(ema.buffers(), net.buffers(), strict=True):
                        be.copy_(bn)
                step += 1
                now = time.monotonic()
                wall += now - t_prev  # whole-loop wall time (validation and previews included)
                t_prev = now
                last_loss = float(loss.detach())
                acc_loss += last_loss
                acc_n += 1
                if bar:
                    bar.update(1)
                if writer and (step % config.log_every == 0 or step == config.max_steps):
                    writer.writerow(
                        [
                            step,
                            f"{wall:.1f}",
                            f"{acc_loss / acc_n:.5f}",
                            f"{lr:.3g}",
                            f"{gnorm:.3f}",
                        ]
                    )
                    assert log_f is not None
                    log_f.flush()
                    if bar:
                        bar.set_postfix(loss=f"{acc_loss / acc_n:.4f}")
                    acc_loss, acc_n = 0.0, 0
                keep = bool(config.snapshot_every_steps) and step % config.snapshot_every_steps == 0
                # decisions taken on the clock or a signal are agreed by all ranks (DDP): a rank
                # that stopped or checkpointed alone would leave the others waiting forever
                timed_out = config.max_time_s is not None and now - t_start >= config.max_time_s
                ck_due, stop_now, plateau_agreed = _agree(
                    world, now - t_last_ck >= config.checkpoint_every_s, stop.flag or timed_out, plateau
                )
                if keep or ck_due:
                    checkpoint(keep)
                    t_last_ck = now
                if (
                    rank == 0
                    and val_images is not None
                    and config.validate_every_s
                    and now - t_last_val >= config.validate_every_s
                ):
                    _log_val(out / "val.csv", step, wall, validate(ema, val_images))
                    t_last_val = time.monotonic()
                    # the whole curve: the init_from card's validations, then this run's
                    plateau = bool(config.patience) and validation_plateau(
                        validation_curve(earlier, read_val_log(out / "val.csv")),
                        config.patience,
                        config.min_delta_db,
                    )
                if (
                    rank == 0
                    and config.sample_every_s
                    and now - t_last_sample >= config.sample_every_s
                ):
                    _preview(ema, config, out / f"samples_{step:07d}.png")
                    t_last_sample = time.monotonic()
                if stop_now:
                    stopped_by = "max_time" if timed_out else "signal"
                    break
                if plateau_agreed:  # the agreed flag: every rank leaves at the same step
                    stopped_by = "plateau"
                    break
            checkpoint(keep=False)
    finally:
        if bar:
            bar.close()
        if log_f:
            log_f.close()
    return {
        "step": step,
        "wall_s": wall,
        "last_loss": last_loss,
        "out_dir": str(out),
        "checkpoint": str(ckpath),
        "stopped_by": stopped_by,
        "runtime": runtime,
    }


def _truncate_log(path: Path, step: int) -> None:
    """Drop loss-log lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if not ln[:1].isdigit() or int(ln.split(",")[0]) <= step]
    path.write_text("\n".join(keep) + ("\n" if keep else ""))


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


# ------------------------------------------------------------------------------------------
# presets for the shipped priors and the command line

# settings both shipped priors share: the "S" VE design on 64-pixel patches, validated every
# 20 minutes and stopped after three validations (an hour) without a gain of 0.02 dB
_SHIPPED_DESIGN: dict[str, Any] = dict(
    size="S",
    sde="ve",
    sigma_min=0.01,
    patch_size=64,
    batch_size=16,
    lr=2e-4,
    ema_decay=0.999,
    val_slices=8,
    validate_every_s=1200.0,
    patience=3,
    min_delta_db=0.02,
)

# the grown CT set (2026-12-06): ct/train.npz, the head volume and ct/extra (ct/extra/SOURCES.md);
# ct/val.npz and the 3-D benchmark volume stay out (RESERVED)
CT_GROWN_DATA: tuple[str, ...] = (
    "ct/train.npz",
    "ct/volumes/promed_ct0051_head.npz",
    "ct/extra/dashvtk_midrc_ricord1a.npz",
    "ct/extra/itkelastix_4dct_phase00.npz",
    "ct/extra/cornerstonedemo_ct_chest.npz",
    "ct/extra/cornerstonetools_bellona_chest.npz",
    "ct/extra/ibsi_ct_radiomics_phantom_lung.npz",
    "ct/extra/ibsi_sts_ct_crops.npz",
)

# the issue-23 design comparison on the grown set, both CT designs at the shipped SDE (the
# largest pairwise distance of the 1,977 grown slices is still 53.7, so sigma_max 60 holds and
# either can start from the shipped ct-256 with --init-from)
_CT_GROWN: dict[str, Any] = dict(
    modality="ct",
    data=CT_GROWN_DATA,
    # draws per file (CT_GROWN_DATA order): the arm/leg crops are 57 % of the slices but get a
    # quarter of the draws, the chest/abdomen files (the validation's anatomy) most of the rest
    data_weights=(0.2, 0.08, 0.17, 0.12, 0.09, 0.04, 0.05, 0.25),
    sigma_max=60.0,
    sigma_data=0.2,
    val_data="ct/val.npz",
    # the comparison continued the 13,844-step ct-256 (v1) weights (--init-from) at this lr
    lr=1e-4,
    warmup_steps=100,
    seed=23,
)

# the CT set grown again (2026-12-07, issue 32): the grown set plus ct/extra2 (ct/extra2/SOURCES.md:
# 278 slices of 210 patients, most of them head CT); ct/val.npz and the 3-D benchmark volume stay out
CT_V3_DATA: tuple[str, ...] = CT_GROWN_DATA + (
    "ct/extra2/rsna_ich_george091.npz",
    "ct/extra2/rsna_ich_ahmad_alqaisi215.npz",
    "ct/extra2/rsna_ich_azza_elkhalifa.npz",
    "ct/extra2/lidc_concept_to_clinic.npz",
    "ct/extra2/tcga_thca_dashvtk_wholebody.npz",
    "ct/extra2/pancreatic_ct_cbct_seg_pyvista.npz",
    "ct/extra2/dcmqi_ct3slice_abdomen.npz",
)
# draws per file (CT_V3_DATA order): the grown set keeps its proportions at 83 % of the draws;
# extra2 gets 17 %, most of it the 201 head-CT patients (the bundled main-job slice is a head)
CT_V3_WEIGHTS: tuple[float, ...] = tuple(round(0.83 * w, 4) for w in _CT_GROWN["data_weights"]) + (
    0.09, 0.01, 0.002, 0.03, 0.015, 0.015, 0.008,
)

PRESETS: dict[str, dict[str, Any]] = {
    # the first shipped CT prior (13,844 steps, 2026-12-05): "S", 64² patches, 240 slices
    "ct-256-v1": dict(
        _SHIPPED_DESIGN,
        run="ct-256-v1",
        modality="ct",
        data=("ct/train.npz", "ct/volumes/promed_ct0051_head.npz"),
        sigma_max=60.0,
        sigma_data=0.2,
        val_data="ct/val.npz",
    ),
    # the first shipped MRI prior (11,973 steps, 2026-12-05): "S", 64² patches, no position
    "mri-256-v1": dict(
        _SHIPPED_DESIGN,
        run="mri-256-v1",
        modality="mri",
        data=("mri/train.npz",),
        sigma_max=110.0,
        sigma_data=0.25,
        val_data="mri/val.npz",
    ),
    "ct-256-grown": dict(_SHIPPED_DESIGN, **_CT_GROWN, run="ct-256-grown"),
    # position-aware (PaDIS): coordinate channels, patches of 64, 128 and whole 256 slices, batch
    # sizes for the same 65,536 pixels per step as the 64-pixel design (so steps cost about the
    # same), whole-image previews; validation is whole-slice Tweedie as for every design
    "ct-256-pos": dict(
        _SHIPPED_DESIGN,
        **_CT_GROWN,
        run="ct-256-pos",
        coords=True,
        patch_size=None,
        patch_sizes=(64, 128, 256),
        patch_probs=(0.5, 0.3, 0.2),
        patch_batch=(16, 4, 1),
        sample_size=256,
        sample_count=2,
        sample_every_s=7200.0,
    ),
}
# the shipped ct-256 (v2, issue 23): the position-aware design on the grown set, the winner of
# the design comparison; a new machine continues from the shipped weights (a checkpoint in the
# run's folder takes precedence: it resumes exactly)
PRESETS["ct-256-v2"] = dict(PRESETS["ct-256-pos"], run="ct-256-v2", init_from="ct-256")
# the shipped ct-256 (v3, issue 32): the v2 design on the CT set grown by ct/extra2, trained with
# the recipe that won the throughput comparison (docs/priors.md)
PRESETS["ct-256"] = dict(
    PRESETS["ct-256-pos"], run="ct-256", init_from="ct-256", data=CT_V3_DATA, data_weights=CT_V3_WEIGHTS
)
# the position-aware design on the unchanged MRI set (issue 23 item 3), ready to continue
# mri-256 (--init-from mri-256 widens it with zero-weight coordinate inputs)
PRESETS["mri-256-pos"] = dict(
    PRESETS["mri-256-v1"],
    run="mri-256-pos",
    **{k: PRESETS["ct-256-pos"][k] for k in ("coords", "patch_size", "patch_sizes", "patch_probs", "patch_batch",
                                             "sample_size", "sample_count", "sample_every_s")},
    lr=1e-4,
    warmup_steps=100,
)
# the shipped mri-256 (v2, issue 23 item 3): mri-256-pos continued from v1; like ct-256, a new
# machine continues the shipped weights and a checkpoint in the run's folder resumes exactly
PRESETS["mri-256"] = dict(PRESETS["mri-256-pos"], run="mri-256", init_from="mri-256")


_COMMON_NOTES = [
    "Research use only; not a medical device.",
    "Weights are the EMA of the network weights, stored as fp16; the optimiser state is not "
    "shipped, so training resumed from these weights (--init-from) re-initialises AdamW.",
]

# every file of CT_GROWN_DATA with its licence as found (ct/SOURCES.md, ct/extra/SOURCES.md,
# data/README.md), marked non-commercial / of undocumented origin for the card's licence_summary
_CT_GROWN_TRAINING_DATA: list[dict[str, Any]] = [
    {
        "file": "ct/train.npz",
        "slices": 82,
        "patients": 48,
        "source": "TCIA TCGA-LUAD / TCGA-LUSC via a Kaggle selection mirrored on GitHub",
        "licence": "CC BY 3.0 (TCIA); the mirror has no licence file: redistribution terms UNVERIFIED",
        "non_commercial": False,
        "origin_documented": True,
    },
    {
        "file": "ct/train.npz",
        "slices": 20,
        "patients": 10,
        "source": "TCIA COVID-19-NY-SBU via SaltyJoke/Image-Registration",
        "licence": "CC BY 4.0 (TCIA); repository Apache-2.0",
        "non_commercial": False,
        "origin_documented": True,
    },
    {
        "file": "ct/train.npz",
        "slices": 30,
        "patients": 1,
        "source": "TCIA Lung-PET-CT-Dx via huyenbui117/lung_CT",
        "licence": "CC BY 4.0 (TCIA); the repository has no licence file: UNVERIFIED",
        "non_commercial": False,
        "origin_documented": True,
    },
    {
        "file": "ct/volumes/promed_ct0051_head.npz",
        "slices": 108,
        "patients": 1,
        "source": "Debian package invesalius-examples, 'ProMED CT 0051' head CT",
        "licence": "GPL-2 (package licence); clinical origin not stated",
        "non_commercial": False,
        "origin_documented": False,
    },
    {
        "file": "ct/extra/dashvtk_midrc_ricord1a.npz",
        "slices": 255,
        "patients": 1,
        "source": "TCIA MIDRC-RICORD-1A via plotly/dash-vtk (chest + upper abdomen)",
        "licence": "CC BY-NC 4.0 (TCIA MIDRC-RICORD-1A); repository MIT: NON-COMMERCIAL",
        "non_commercial": True,
        "origin_documented": True,
    },
    {
        "file": "ct/extra/itkelastix_4dct_phase00.npz",
        "slices": 141,
        "patients": 1,
        "source": "InsightSoftwareConsortium/ITKElastix example data (thorax, one phase of a 4D CT)",
        "licence": "repository Apache-2.0; image origin NOT documented (geometry matches the "
        "POPI 4D-CT model, unverified)",
        "non_commercial": False,
        "origin_documented": False,
    },
    {
        "file": "ct/extra/cornerstonedemo_ct_chest.npz",
        "slices": 109,
        "patients": 1,
        "source": "chafey/cornerstoneDemo example study (chest + upper abdomen)",
        "licence": "repository has no licence file; image origin NOT documented",
        "non_commercial": False,
        "origin_documented": False,
    },
    {
        "file": "ct/extra/cornerstonetools_bellona_chest.npz",
        "slices": 37,
        "patients": 1,
        "source": "cornerstonejs/cornerstoneTools example study (upper abdomen)",
        "licence": "repository MIT; image origin NOT documented",
        "non_commercial": False,
        "origin_documented": False,
    },
    {
        "file": "ct/extra/ibsi_ct_radiomics_phantom_lung.npz",
        "slices": 60,
        "patients": 1,
        "source": "CancerData 'Radiomics Digital Phantom' (a lung-cancer patient) via "
        "theibsi/data_sets; cropped to ~20 cm, valid_box",
        "licence": "CC BY-NC 3.0: NON-COMMERCIAL",
        "non_commercial": True,
        "origin_documented": True,
    },
    {
        "file": "ct/extra/ibsi_sts_ct_crops.npz",
        "slices": 1135,
        "patients": 51,
        "source": "TCIA Soft-tissue-Sarcoma (Vallieres 2015) via theibsi/data_sets: arm/leg "
        "crops around the tumour, every 3rd slice, valid_box",
        "licence": "CC BY 3.0 (TCIA Soft-tissue-Sarcoma)",
        "non_commercial": False,
        "origin_documented": True,
    },
]

_CT_GROWN_NOT_TRAINED_ON = [
    "ct/val.npz (validation)",
    "nifti/totalseg_example_ct.nii.gz (3D benchmark)",
]

_CT_GROWN_NOTES = [
    "Trained on the grown CT set: 1,977 slices of 116 patients (ct/train.npz, the ProMED head "
    "volume, ct/extra). Two sources are NON-COMMERCIAL (CC BY-NC: MIDRC-RICORD-1A, the "
    "CancerData lung crop) and four are of undocumented origin (ProMED head, ITKElastix, "
    "cornerstoneDemo, cornerstoneTools): see licence_summary; research use only.",
    "The 1,195 crop slices (ct/extra/ibsi_*) are padded onto the 256x256 canvas; patches are "
    "drawn inside their valid_box only.",
]

CARD_INFO: dict[str, dict[str, Any]] = {
    "ct-256-v1": {
        "modality": "ct",
        "resolution": [256, 256],
        "units": "HU window [-1024, 3071] -> [0, 1]: x = (HU + 1024) / 4096, clipped",
        "design": "VE-SDE (sigma_min 0.01, sigma_max 60 ~ the largest pairwise L2 distance, 53.7, "
        "between the 240 normalised 256x256 training slices; Song & Ermon's technique 1), 'S' "
        "U-Net (3.15 M parameters, attention only at the lowest level), trained on random 64x64 "
        "patches (batch 16) with flips and 90-degree rotations because the set is small and the "
        "budget is a 2-core CPU; the net is fully convolutional apart from that attention and "
        "is validated on whole 256x256 slices. Loss: DSM with weight sigma^2; AdamW lr 2e-4, "
        "200 warm-up steps, gradient clipping 1.0, EMA 0.999, for the first 11,895 steps; then "
        "continued from those weights at lr 5e-5 (100 warm-up steps, AdamW re-initialised), "
        "chosen over a continuation at lr 2e-4 on validation denoising: see design_comparison.",
        "training_data": [
            {
                "file": "ct/train.npz",
                "slices": 82,
                "source": "TCIA TCGA-LUAD / TCGA-LUSC via a Kaggle selection mirrored on GitHub",
                "licence": "CC BY 3.0 (TCIA); the mirror has "
                "no licence file: redistribution terms UNVERIFIED",
            },
            {
                "file": "ct/train.npz",
                "slices": 20,
                "source": "TCIA COVID-19-NY-SBU via SaltyJoke/Image-Registration",
                "licence": "CC BY 4.0 (TCIA); repository Apache-2.0",
            },
            {
                "file": "ct/train.npz",
                "slices": 30,
                "source": "TCIA Lung-PET-CT-Dx via huyenbui117/lung_CT",
                "licence": "CC BY 4.0 (TCIA); the repository has no licence file: UNVERIFIED",
            },
            {
                "file": "ct/volumes/promed_ct0051_head.npz",
                "slices": 108,
                "source": "Debian package invesalius-examples, 'ProMED CT 0051' head CT",
                "licence": "GPL-2 (package licence; clinical origin not stated)",
            },
        ],
        "not_trained_on": [
            "ct/val.npz (validation)",
            "nifti/totalseg_example_ct.nii.gz (3D benchmark)",
        ],
        "design_comparison": {
            "how": "two continuations of the 11,895-step weights run side by side (AdamW "
            "re-initialised, same data, net and SDE, one CPU thread each), differing only in the "
            "learning rate; the trainer's validation (8 slices of ct/val.npz, the same noise "
            "draws for both): mean Tweedie denoising PSNR (dB) over sigma 0.02/0.05/0.1/0.2 of "
            "the EMA weights at each 20-minute validation",
            "steps_lr_2e-4": [271, 496, 784, 1077, 1362],
            "lr_2e-4_200_warmup": [38.969, 38.980, 39.005, 39.038, 39.049],
            "steps_lr_5e-5": [271, 496, 786, 1082, 1371],
            "lr_5e-5_100_warmup": [39.048, 39.061, 39.065, 39.093, 39.058],
            "before": "39.016 (best of the 11,895-step run's curve)",
            "kept": "lr 5e-5: ahead at every validation (+0.01 to +0.08 dB at equal steps)",
        },
        "solver_defaults": {
            "status": "starting points from Song et al. 2022 (LIDC sparse-view CT, VE, N=1000); "
            "values tuned on this prior, where measured, are under 'tuned' (per operator key)",
            "song": {"lambda": 0.841, "snr": 0.246, "n_steps": 1000},
        },
        "notes": _COMMON_NOTES
        + [
            "Some training sources have unverified redistribution terms and one is GPL-2; check "
            "them before any use beyond research.",
            "240 real slices from 61 patients (132 chest/abdomen slices of 59 patients plus one "
            "108-slice head volume): a small set; expect limited generality.",
        ],
    },
    # the first shipped MRI prior (v1, 11,973 steps): its card text, for --preset mri-256-v1
    "mri-256-v1": {
        "modality": "mri",
        "resolution": [256, 256],
        "units": "magnitude / (99.5th percentile of the volume) -> [0, 1]",
        "design": "VE-SDE (sigma_min 0.01, sigma_max 110 ~ the largest pairwise L2 distance, 111.9, "
        "between the normalised 256x256 training slices), 'S' U-Net (3.15 M parameters, "
        "attention only at the lowest level), trained on random 64x64 patches (batch 16) with "
        "flips and 90-degree rotations on a 2-core CPU; fully convolutional apart from that "
        "attention, validated on whole 256x256 slices. Loss: DSM with weight sigma^2; AdamW lr "
        "2e-4, 200 warm-up steps, gradient clipping 1.0, EMA 0.999. Chosen over a VP-SDE twin "
        "(same net, data and steps) on validation denoising: see design_comparison.",
        "training_data": [
            {
                "file": "mri/train.npz",
                "slices": 1128,
                "source": "TCIA TCGA-LGG brain FLAIR via the Buda et al. 'kaggle_3m' derivative",
                "licence": "CC BY 3.0 (TCIA); the derivative's licence is UNVERIFIED",
            },
        ],
        "not_trained_on": ["mri/val.npz (validation)"],
        "design_comparison": {
            "how": "benchmarks/prior_designs.py --val mri/val.npz --every 2 (60 validation "
            "slices, the same noise draws for both): Tweedie denoising PSNR (dB) of the EMA "
            "weights of two runs identical but for the SDE, both at training step 700",
            "sigmas": [0.02, 0.05, 0.1, 0.2],
            "ve_sigma_max_110": [39.01, 34.16, 30.79, 27.57],
            "vp_beta_0.1_20": [38.59, 33.73, 30.45, 27.43],
            "kept": "VE: better at every sigma (+0.42, +0.43, +0.34, +0.15 dB)",
        },
        "solver_defaults": {
            "status": "starting points from Song et al. 2022 (BraTS) and score-MRI; values tuned "
            "on this prior, where measured, are under 'tuned' (per operator key)",
            "song": {"lambda": 1.0, "snr": 0.517, "n_steps": 1000},
            "score-mri": {"snr": 0.16, "n_steps": 500},
        },
        "notes": _COMMON_NOTES
        + [
            "Magnitude prior. Complex images are scored as real and imaginary parts with the same "
            "network (score-MRI, Alg. 3).",
        ],
    },
    "ct-256-grown": {
        "modality": "ct",
        "resolution": [256, 256],
        "units": "HU window [-1024, 3071] -> [0, 1]: x = (HU + 1024) / 4096, clipped",
        "design": "today's ct-256 design on the grown CT set: VE-SDE (sigma_min 0.01, "
        "sigma_max 60; the largest pairwise L2 distance between the 1,977 normalised grown "
        "slices is 53.7), 'S' U-Net without coordinates, random 64x64 patches (batch 16, inside "
        "valid_box for the crops) with flips and 90-degree rotations; DSM with weight sigma^2, "
        "AdamW, EMA 0.999; validated on whole 256x256 slices.",
        "training_data": _CT_GROWN_TRAINING_DATA,
        "not_trained_on": _CT_GROWN_NOT_TRAINED_ON,
        "notes": _COMMON_NOTES + _CT_GROWN_NOTES,
    },
    "ct-256-pos": {
        "modality": "ct",
        "resolution": [256, 256],
        "units": "HU window [-1024, 3071] -> [0, 1]: x = (HU + 1024) / 4096, clipped",
        "design": "position-aware patch prior (PaDIS, Hu et al. NeurIPS 2024) on the grown CT "
        "set: VE-SDE (sigma_min 0.01, sigma_max 60), 'S' U-Net with two coordinate input "
        "channels (x, y of each pixel centre in the whole slice, in [-1, 1]); patches of 64 / "
        "128 / 256 (= whole slices) pixels with probabilities 0.5 / 0.3 / 0.2 and batches "
        "16 / 4 / 1 (65,536 pixels per step), inside valid_box for the crops; flips and "
        "90-degree rotations move the coordinate channels with the image, so each pixel keeps "
        "its true position; at inference a whole image gets the plain coordinate grid of its "
        "own size. DSM with weight sigma^2, AdamW, EMA 0.999; validated on whole slices.",
        "training_data": _CT_GROWN_TRAINING_DATA,
        "not_trained_on": _CT_GROWN_NOT_TRAINED_ON,
        "notes": _COMMON_NOTES + _CT_GROWN_NOTES,
    },
}
# the shipped ct-256 (v2): ct-256-pos continued from v1, chosen by the issue-23 comparison
CARD_INFO["ct-256"] = {
    **CARD_INFO["ct-256-pos"],
    "design": CARD_INFO["ct-256-pos"]["design"] + " Continued from ct-256 v1 (13,844 steps of the "
    "64x64-patch design without coordinates on 240 slices; the coordinate inputs start at zero "
    "weight) at AdamW lr 1e-4 (100 warm-up steps, re-initialised), gradient clipping 1.0, with "
    "per-file draw shares 0.2 / 0.08 / 0.17 / 0.12 / 0.09 / 0.04 / 0.05 / 0.25 (ct/train, head "
    "volume, MIDRC, ITKElastix, cornerstoneDemo, cornerstoneTools, IBSI lung crop, IBSI sarcoma "
    "crops: the limb crops are 57 % of the slices but a quarter of the draws). Chosen over the "
    "same continuation without coordinates: see design_comparison.",
    "design_comparison": {
        "how": "both designs continued the v1 weights on the grown set for the same 4,500 s, side "
        "by side on one core each of the 2-core CPU (one thread each, tcmalloc), with the same "
        "data shares, lr, seed and steps cost (65,536 pixels per step). Judged by "
        "benchmarks/prior_designs.py: Tweedie denoising PSNR (dB, normalised space) on all 31 "
        "slices of ct/val.npz, and the DDS reconstruction (2 samples, v1's tuned DDS settings for "
        "every design, so that only the prior differs) of ct/val.npz rows 4, 7, 18, 24 (not the "
        "rows benchmarks/recon.py --quick reports) against TV at its swept weight",
        "sigmas": [0.02, 0.05, 0.1, 0.2],
        "designs": {
            "v1 (start)": {"steps": 13844, "tweedie_db": [45.23, 40.54, 37.03, 33.45],
                           "dds_10_views_db": 30.01, "dds_23_views_db": 38.22},
            "S, 64x64 patches, no coordinates": {
                "steps": 19787, "tweedie_db": [45.33, 40.66, 37.07, 33.52],
                "dds_10_views_db": 30.05, "dds_23_views_db": 38.52},
            "S + coordinates, patches 64/128/256 (kept)": {
                "steps": 19568, "tweedie_db": [45.42, 40.82, 37.41, 33.97],
                "dds_10_views_db": 30.07, "dds_23_views_db": 38.79},
        },
        "tv_db": {"10_views": 29.98, "23_views": 36.22},
        "trainer_validation_8_slices": {
            "no_coordinates": {"steps": [1553, 3165, 4770],
                               "db": [[45.352, 40.633, 37.060, 33.561], [45.357, 40.657, 37.018, 33.545],
                                      [45.400, 40.653, 36.983, 33.510]]},
            "coordinates": {"steps": [1493, 3051, 4593],
                            "db": [[45.429, 40.725, 37.214, 33.854], [45.419, 40.743, 37.225, 33.850],
                                   [45.437, 40.764, 37.313, 33.909]]},
        },
        "kept": "coordinates: ahead at every sigma (+0.09 / +0.16 / +0.34 / +0.45 dB over the "
        "design without them) and in reconstruction (+0.27 dB at 23 views, +0.02 dB at 10 views)",
        "not_run": "a step up in capacity ('M') or larger patches without coordinates: the 2-core "
        "clock of the session allowed two designs",
    },
}
CARD_INFO["ct-256-v2"] = CARD_INFO["ct-256"]

# ct/extra2 (2026-12-07): 278 whole slices of 210 patients, licences as in ct/extra2/SOURCES.md
_CT_EXTRA2_TRAINING_DATA: list[dict[str, Any]] = [
    {
        "file": "ct/extra2/rsna_ich_george091.npz",
        "slices": 202,
        "patients": 201,
        "source": "RSNA Intracranial Hemorrhage Detection (Kaggle 2019) head CT via "
        "George091/Brain-Hemorrhage-Detection-Model (one slice per study; 116 gantry-tilted)",
        "licence": "RSNA-ICH: non-commercial research/education only (cite Flanders et al., "
        "Radiol AI 2020, doi:10.1148/ryai.2020190211); repository has no licence file: NON-COMMERCIAL",
        "non_commercial": True,
        "origin_documented": True,
    },
    {
        "file": "ct/extra2/rsna_ich_ahmad_alqaisi215.npz",
        "slices": 11,
        "patients": 1,
        "source": "RSNA-ICH head CT, one contiguous 5 mm series, via "
        "ahmad-alqaisi215/Automated-Brain-Hemorrhage-Detection-in-CT-Scans",
        "licence": "RSNA-ICH non-commercial (as above); repository has no licence file: NON-COMMERCIAL",
        "non_commercial": True,
        "origin_documented": True,
    },
    {
        "file": "ct/extra2/rsna_ich_azza_elkhalifa.npz",
        "slices": 2,
        "patients": 2,
        "source": "RSNA-ICH head CT via Azza-ElKhalifa/CT-Brain-Hemorrhage-Classification",
        "licence": "RSNA-ICH non-commercial (as above); repository has no licence file: NON-COMMERCIAL",
        "non_commercial": True,
        "origin_documented": True,
    },
    {
        "file": "ct/extra2/lidc_concept_to_clinic.npz",
        "slices": 36,
        "patients": 3,
        "source": "TCIA LIDC-IDRI (patients 0001-0003, chest) via drivendataorg/concept-to-clinic",
        "licence": "CC BY 3.0 (TCIA LIDC-IDRI; cite Armato et al. 2015, "
        "doi:10.7937/K9/TCIA.2015.LO9QL9SX); repository MIT-style",
        "non_commercial": False,
        "origin_documented": True,
    },
    {
        "file": "ct/extra2/tcga_thca_dashvtk_wholebody.npz",
        "slices": 12,
        "patients": 1,
        "source": "TCIA TCGA-THCA low-dose PET/CT, skull base to mid-thigh, via plotly/dash-vtk",
        "licence": "TCIA TCGA collections are CC BY 3.0 (not stated in the repository, not "
        "verified); repository MIT",
        "non_commercial": False,
        "origin_documented": True,
    },
    {
        "file": "ct/extra2/pancreatic_ct_cbct_seg_pyvista.npz",
        "slices": 12,
        "patients": 1,
        "source": "TCIA Pancreatic-CT-CBCT-SEG planning CT (chest + abdomen) via pyvista/vtk-data",
        "licence": "CC BY 4.0 (TCIA Pancreatic-CT-CBCT-SEG; cite Hong et al. 2021, "
        "doi:10.7937/TCIA.ESHQ-4D90); repository Apache-2.0",
        "non_commercial": False,
        "origin_documented": True,
    },
    {
        "file": "ct/extra2/dcmqi_ct3slice_abdomen.npz",
        "slices": 3,
        "patients": 1,
        "source": "dcmqi test data, upper-abdomen CT (3 slices)",
        "licence": "repository BSD-3-Clause; image origin not documented",
        "non_commercial": False,
        "origin_documented": False,
    },
]
# the shipped ct-256 (v3, issue 32): the v2 design continued on the CT set grown by ct/extra2
CARD_INFO["ct-256"] = {
    **CARD_INFO["ct-256-v2"],
    "training_data": _CT_GROWN_TRAINING_DATA + _CT_EXTRA2_TRAINING_DATA,
    "notes": _COMMON_NOTES + [
        "Trained on the CT set grown twice: 2,255 slices of 326 patients (ct/train.npz, the ProMED "
        "head volume, ct/extra, ct/extra2). Five sources are NON-COMMERCIAL (CC BY-NC: "
        "MIDRC-RICORD-1A, the CancerData lung crop; the RSNA intracranial-haemorrhage head CTs) "
        "and five are of undocumented origin: see licence_summary; research use only.",
        _CT_GROWN_NOTES[1],
        "The 215 RSNA head-CT slices have stripped headers (no slice thickness, age or sex; children "
        "may be included) and 116 of them are gantry-tilted (oblique planes, kept as acquired).",
    ],
}
CARD_INFO["mri-256-pos"] = {
    **{k: v for k, v in CARD_INFO["mri-256-v1"].items() if k not in ("design", "design_comparison")},
    "design": "position-aware patch prior (PaDIS, Hu et al. NeurIPS 2024) on the mri-256 set: the "
    "mri-256 VE-SDE (sigma_max 110) and 'S' U-Net with two coordinate input channels; patches of "
    "64 / 128 / 256 pixels with probabilities 0.5 / 0.3 / 0.2 and batches 16 / 4 / 1; flips and "
    "90-degree rotations move the coordinates with the image; whole-image inference.",
}
# the shipped mri-256 (v2): mri-256-pos continued from v1, chosen by the issue-23 comparison
CARD_INFO["mri-256"] = {
    **CARD_INFO["mri-256-pos"],
    "design": CARD_INFO["mri-256-pos"]["design"] + " Continued from mri-256 v1 (11,973 steps of "
    "the 64x64-patch design without coordinates; the coordinate inputs start at zero weight) at "
    "AdamW lr 1e-4 (100 warm-up steps, re-initialised), gradient clipping 1.0, EMA 0.999. Chosen "
    "over the same continuation without coordinates: see design_comparison.",
    "design_comparison": {
        "how": "both designs continued the v1 weights for the same 1,800 s, side by side on one "
        "core each of the 2-core CPU (one thread each, tcmalloc), same data, lr, seed and step "
        "cost (65,536 pixels per step); judged by benchmarks/prior_designs.py --val mri/val.npz: "
        "Tweedie denoising PSNR (dB, normalised space) on all 120 validation slices, the same "
        "noise draws for every design. The shipped weights are a separate, longer run of the "
        "kept design from v1 (training.steps)",
        "sigmas": [0.02, 0.05, 0.1, 0.2],
        "designs": {
            "v1 (start)": {"steps": 11973, "tweedie_db": [39.52, 34.77, 31.61, 28.63]},
            "S, 64x64 patches, no coordinates": {"steps": 14335, "tweedie_db": [39.55, 34.81, 31.64, 28.66]},
            "S + coordinates, patches 64/128/256 (kept)": {"steps": 14212,
                                                          "tweedie_db": [39.56, 34.84, 31.70, 28.75]},
        },
        "kept": "coordinates: ahead at every sigma (+0.01 / +0.03 / +0.06 / +0.09 dB over the "
        "design without them); the margin is small because this set is small, one contrast and "
        "8-bit (1/255 intensity steps), so denoising gains level off early",
        "not_run": "reconstruction per design at equal settings (MRI DDS costs 35-120 s per "
        "slice on the CPU) and a step up in capacity ('M')",
        "v1_sde": CARD_INFO["mri-256-v1"]["design_comparison"],
    },
}


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``medrecon train``: ``--preset`` plus any :class:`TrainConfig` field."""
    p = argparse.ArgumentParser(prog="medrecon train", description="Train a score prior (DSM).")
    p.add_argument("--preset", choices=sorted(PRESETS), help="settings of a shipped prior")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "data":
            p.add_argument(flag, nargs="+", help="training .npz files")
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
    """Entry point of ``medrecon train`` / ``python -m medrecon.priors.train``."""
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


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
