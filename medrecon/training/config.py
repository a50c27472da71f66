"""Settings of a training run: :class:`TrainConfig` (flat, typed, frozen, with defaults).

Every field is also a flag of ``medrecon train`` (:mod:`medrecon.training.cli`).  The fields in
:attr:`TrainConfig.ARCH_FIELDS` define the network, the SDE and the data stream: a run resumes
only from a checkpoint made with the same values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from medrecon.errors import SettingsError
from medrecon.priors.networks import NetworkSpec, network_spec
from medrecon.priors.normalise import Normaliser, ct_normaliser, mri_normaliser
from medrecon.priors.sde import SDE, VESDE, VPSDE
from medrecon.training.data import RESERVED

__all__ = ["TrainConfig", "PRECISIONS", "T_DISTS", "default_out_dir"]

PRECISIONS = ("float32", "bfloat16", "auto")
T_DISTS = ("uniform", "focused")


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
        ``.npz`` files with ``images`` (N, H, W); relative paths are under
        :func:`~medrecon.training.data.data_root`.
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
    lr_decay_steps : int
        Length of a cooldown: the learning rate falls from ``lr`` to ``lr_final`` on a half cosine
        over this many steps, and the run ends when it is over (0: constant ``lr`` after the
        warm-up, no cooldown).  A campaign at constant ``lr`` exports from a cooled branch: copy
        ``last.pt`` into another run's folder and continue it there with a cooldown.
    lr_final : float
        Learning rate at the end of the cooldown.
    lr_decay_from : int or None
        Run step at which the cooldown starts (None: the step this invocation starts or resumes
        at; the resolved value is written into the checkpoint, so a resumed cooldown continues
        the same curve).
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
        preloaded and how many threads ran are recorded
        (:func:`~medrecon.training.runtime.runtime_info`) in the checkpoint, the summary and the
        exported card.
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
    lr_decay_steps: int = 0
    lr_final: float = 1e-6
    lr_decay_from: int | None = None
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
        if self.lr_decay_steps < 0 or self.lr_final < 0 or (self.lr_decay_steps and self.lr_final > self.lr) or (
            self.lr_decay_from is not None and self.lr_decay_from < 0
        ):
            raise SettingsError(
                f"TrainConfig: lr_decay_steps and lr_decay_from must be >= 0 and lr_final in "
                f"[0, lr={self.lr}]; got {self.lr_decay_steps}, {self.lr_decay_from}, {self.lr_final}"
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
        "batch_size",
        "seed",
    )
    # the data stream: a run may resume with other values (the weights and optimiser carry over,
    # the data and noise streams start afresh, and the checkpoint records what was trained on before)
    STREAM_FIELDS = ("data", "data_weights")

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


def cfg_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    tuples = {f.name for f in fields(TrainConfig) if str(f.type).startswith("tuple")}
    names = {f.name for f in fields(TrainConfig)}
    d = {k: v for k, v in d.items() if k in names}
    for k in tuples & set(d):
        d[k] = tuple(d[k])
    return d

