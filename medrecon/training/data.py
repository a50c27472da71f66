"""Training data of the prior trainer: ``.npz`` slices and seeded, resumable patch batches.

* Data: 2-D slices from ``.npz`` files (key ``images``, shape ``(N, H, W)``), normalised with
  the modality's normaliser (CT: HU window → [0, 1]; MRI: uint16 already scaled to
  ``[0, 1]·65535``), held in memory as float16.  A NIfTI file or DICOM series folder is read
  as a volume and resliced into axial training slices of the same frame and scale
  (:func:`volume_training_slices`).
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
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from medrecon.datasets.training import axial_display_slices, dihedral, patch_origin, valid_boxes
from medrecon.errors import InputError, SettingsError
from medrecon.priors.networks import image_coords
from medrecon.priors.normalise import ct_normaliser

if TYPE_CHECKING:
    from medrecon.training.config import TrainConfig

__all__ = [
    "RESERVED", "data_root", "load_slices", "load_training_data", "PatchSampler", "is_volume_source",
    "volume_training_slices", "VOLUME_SPACING_MM",
]

#: never train on these: validation, the 3-D CT report volume, the MRI benchmark and T1 check volume
RESERVED = ("val.npz", "totalseg_example_ct", "IXI012-HH-1211")


def data_root() -> Path:
    """``$MEDRECON_DATA``, default ``../shared/data``."""
    return Path(os.environ.get("MEDRECON_DATA", "../shared/data"))


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


#: pixel size (mm) and canvas of slices taken from volumes (:func:`volume_training_slices`):
#: 240 mm over 256 pixels, a common head field of view, close to the FLAIR slices' scale
VOLUME_SPACING_MM = 0.9375
VOLUME_CANVAS = 256
#: slices of a volume with less of their area above 0.05 (normalised) are left out (air above
#: the head, the neck's edge)
VOLUME_MIN_FOREGROUND = 0.05


def is_volume_source(path: str | Path) -> bool:
    """Whether a training entry is a volume (NIfTI file or DICOM series folder), not ``.npz``."""
    p = Path(path)
    return p.name.lower().endswith((".nii", ".nii.gz")) or p.is_dir()


def volume_training_slices(path: str | Path, modality: str) -> np.ndarray:
    """Training slices of a NIfTI volume or DICOM series, normalised as the ``.npz`` slices.

    The volume is resliced axially in the display frame (anterior up, the patient's right on the
    left), resampled to :data:`VOLUME_SPACING_MM` pixels and centred on a zero-padded
    :data:`VOLUME_CANVAS` square (:func:`medrecon.datasets.training.axial_display_slices`), then
    normalised: MRI by the 99.5th percentile of the whole volume, clipped to [0, 1] (as
    ``mri/train.npz`` was made); CT by the HU window.  Slices with less than
    :data:`VOLUME_MIN_FOREGROUND` of their area above 0.05 are left out.

    Returns
    -------
    ndarray, shape (N, 256, 256), float32

    Raises
    ------
    InputError
        The volume is unreadable, oblique, or has no slice with enough foreground.
    """
    import warnings

    from medrecon.datasets import load_volume

    p = Path(path)
    with warnings.catch_warnings():  # tilt / uneven spacing do not matter for 2-D training slices
        warnings.simplefilter("ignore")
        vol = load_volume(str(p))
    try:
        x = axial_display_slices(vol.array, vol.affine, spacing_mm=VOLUME_SPACING_MM, size=VOLUME_CANVAS)
    except InputError as err:
        raise InputError(p, err.problem) from err
    if modality == "ct":
        x = ct_normaliser().normalise(torch.from_numpy(x)).clamp(0, 1).numpy()
    else:
        top = float(np.percentile(vol.array, 99.5))
        if not top > 0:
            raise InputError(p, f"its 99.5th percentile is {top}: no image to normalise")
        x = np.clip(x / top, 0.0, 1.0)
    keep = (x > 0.05).mean(axis=(1, 2)) >= VOLUME_MIN_FOREGROUND
    if not keep.any():
        raise InputError(p, f"no slice has {VOLUME_MIN_FOREGROUND:.0%} of its area above 0.05 after normalising")
    return np.ascontiguousarray(x[keep], dtype=np.float32)


def load_training_data(paths: Sequence[str], modality: str) -> tuple[Tensor, Tensor, Tensor]:
    """Slices of ``.npz`` files, normalised, with the region of real data in each.

    Parameters
    ----------
    paths : sequence of str
        ``.npz`` files with ``images`` ``(N, H, W)`` (relative paths are under
        :func:`data_root`), optionally ``valid_box`` ``(N, 4)``; or volumes, NIfTI files and
        DICOM series folders (:func:`volume_training_slices`).
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
        if is_volume_source(f):
            x = torch.from_numpy(volume_training_slices(f, modality)).to(torch.float16)
            out.append(x)
            boxes.append(torch.tensor([0, x.shape[1], 0, x.shape[2]], dtype=torch.int64).expand(len(x), 4).clone())
            owner.append(torch.full((len(x),), k, dtype=torch.int64))
            continue
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
        As in :class:`~medrecon.training.config.TrainConfig`.
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
