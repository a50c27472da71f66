"""Training data: 2-D slices from DICOM folders, NIfTI files and image folders, cached once.

Flow::

    sources = find_sources([...])                       # one source per series / file / image folder
    splits = split_sources(sources, {"train": 0.8, "val": 0.2}, seed=0)   # by patient / series
    cache = SliceCache.build(splits["train"], cache_dir, normaliser=ct_normaliser(), size=(256, 256))
    ds = SliceDataset(cache, patch_size=64, flips=True, seed=0)           # torch Dataset

The trainer of the shipped priors (:mod:`medrecon.training`) reads ``.npz`` slice files
instead and uses the pure helpers here: :func:`valid_boxes` (the region of real data in each
slice: the ``valid_box`` of cropped series, else the whole slice), :func:`patch_origin`
(a patch inside that region), :func:`dihedral` (flips and 90° rotations, applied alike to
image and coordinate channels) and :func:`npz_source_info` (patients, slices, source and
licence of a file, for the model card).

Each source is decoded once, passed through the prior's normaliser (the HU window for CT;
MRI: per-volume percentile scaling, :meth:`Normaliser.fit` on the whole volume), resized and
stored as uint16 (prior space [0, 1] in 1/65535 steps) in one ``.npy`` file that is opened
memory-mapped: training never decodes DICOM twice, and DataLoader workers share the pages.
The cache folder name is a hash of the sources (paths, sizes, mtimes) and the settings, so a
changed input or setting builds a new cache.  The index stores hashed group IDs, never patient
identifiers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medrecon.datasets._atomic import atomic_files
from medrecon.datasets.orientation import display_orientation
from medrecon.errors import InputError, SettingsError

__all__ = [
    "Source",
    "find_sources",
    "split_sources",
    "SliceCache",
    "SliceDataset",
    "valid_boxes",
    "patch_origin",
    "dihedral",
    "npz_source_info",
    "axial_display_slices",
]


@dataclass(frozen=True)
class Source:
    """One volume to take slices from.

    ``kind`` is ``"dicom"`` (a series folder), ``"nifti"`` (a file) or ``"images"`` (a folder of
    2-D images); ``group`` is the unit of splitting (patient / series), already hashed.
    """

    path: str
    kind: str
    group: str


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def find_sources(paths: list[str | Path], *, group_by: str = "patient") -> list[Source]:
    """Find the volumes under ``paths`` (files or folders, searched recursively).

    Parameters
    ----------
    paths : list of str or Path
        NIfTI files, DICOM series folders, image folders, or folders holding any of these.
    group_by : {"patient", "series"}
        Split unit: PatientID for DICOM (NIfTI / image sources: the file / folder) or the
        source itself.

    Returns
    -------
    list of Source
        Sorted by path.
    """
    from medrecon.datasets.dicom import _read_header
    from medrecon.datasets.images import IMAGE_SUFFIXES

    if group_by not in ("patient", "series"):
        raise SettingsError(
            f"find_sources(): group_by must be 'patient' or 'series'; got {group_by!r}"
        )
    out: dict[str, Source] = {}
    for root in map(Path, paths):
        if not root.exists():
            raise InputError(root, "no such file or folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            name = f.name.lower()
            if name.endswith((".nii", ".nii.gz")):
                out[str(f)] = Source(str(f), "nifti", _hash(str(f)))
            elif f.suffix.lower() in IMAGE_SUFFIXES:
                out.setdefault(str(f.parent), Source(str(f.parent), "images", _hash(str(f.parent))))
            elif str(f.parent) not in out:
                ds = _read_header(f)
                if ds is not None and "Rows" in ds:
                    key = str(ds.get("PatientID", "")) if group_by == "patient" else str(f.parent)
                    out[str(f.parent)] = Source(str(f.parent), "dicom", _hash(key or str(f.parent)))
    if not out:
        raise InputError(
            Path(str(paths[0]) if paths else "."), "no DICOM series, NIfTI files or images found"
        )
    return sorted(out.values(), key=lambda s: s.path)


def split_sources(
    sources: list[Source], fractions: dict[str, float], *, seed: int = 0
) -> dict[str, list[Source]]:
    """Split by group: every source of one patient / series lands in the same split.

    Each group is placed by a hash of ``(seed, group)``, so the assignment does not depend on the
    order or the number of other sources.
    """
    total = sum(fractions.values())
    if not fractions or any(v < 0 for v in fractions.values()) or not np.isclose(total, 1.0):
        raise SettingsError(
            f"split_sources(): fractions must be non-negative and sum to 1; got {fractions}"
        )
    edges = np.cumsum(list(fractions.values()))
    out: dict[str, list[Source]] = {k: [] for k in fractions}
    for s in sources:
        u = int(_hash(f"{seed}:{s.group}"), 16) / 16**16
        out[
            list(fractions)[int(np.searchsorted(edges, u, side="right").clip(0, len(edges) - 1))]
        ].append(s)
    return out


def _load(source: Source) -> np.ndarray:
    from medrecon.datasets.dicom import load_dicom_series
    from medrecon.datasets.images import load_image_folder
    from medrecon.datasets.nifti import load_nifti

    loader = {"dicom": load_dicom_series, "nifti": load_nifti, "images": load_image_folder}[
        source.kind
    ]
    if source.kind == "dicom":
        import warnings

        with warnings.catch_warnings():  # tilt / spacing do not matter for 2-D training slices
            warnings.simplefilter("ignore")
            return loader(source.path).array
    return loader(source.path).array


def _resize(vol: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or vol.shape[1:] == tuple(size):
        return vol
    import torch.nn.functional as F  # noqa: N812

    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[:, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[
        :, 0
    ].numpy()


class SliceCache:
    """Normalised 2-D slices in one memory-mapped uint16 ``.npy`` file plus a JSON index.

    Use :meth:`build` (which reuses an existing cache with the same key).  ``len(cache)`` is the
    number of slices; ``cache[i]`` a float32 (H, W) slice in prior space [0, 1].
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / "index.json").read_text())
        except (OSError, ValueError) as err:
            raise InputError(
                self.folder / "index.json", f"not a slice cache index ({err})"
            ) from err
        self._data: np.ndarray | None = None

    @property
    def data(self) -> np.ndarray:
        """(N, H, W) uint16 memmap, opened lazily (so each DataLoader worker maps it itself)."""
        if self._data is None:
            self._data = np.load(self.folder / "slices.npy", mmap_mode="r")
        return self._data

    def __len__(self) -> int:
        return int(self.index["n_slices"])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[i].astype(np.float32) / 65535.0

    @property
    def groups(self) -> list[str]:
        """Hashed group ID of each slice."""
        return [self.index["sources"][k]["group"] for k in self.index["slice_source"]]

    @classmethod
    def build(
        cls,
        sources: list[Source],
        cache_dir: str | Path,
        *,
        normaliser: Any,
        size: tuple[int, int] | None = None,
        min_foreground: float = 0.0,
    ) -> SliceCache:
        """Decode, normalise, resize and store every slice of ``sources`` (or reuse the cache).

        Parameters
        ----------
        sources : list of Source
        cache_dir : str or Path
            Parent folder; the cache goes into ``cache_dir/<key>/``.
        normaliser : medrecon.priors.normalise.Normaliser
            A window normaliser, or a percentile one (fitted per source volume).
        size : (H, W), optional
            Resize every slice (bilinear, antialiased).  Required if the sources differ in size.
        min_foreground : float
            Drop slices whose fraction of pixels above 0.05 (prior space) is below this.
        """
        if not sources:
            raise SettingsError("SliceCache.build(): no sources")
        stamp = [(s.path, s.kind, s.group, _stat(s.path)) for s in sources]
        key = _hash(json.dumps([stamp, normaliser.to_dict(), size, min_foreground], default=str))
        folder = Path(cache_dir) / key
        if (folder / "index.json").is_file() and (folder / "slices.npy").is_file():
            return cls(folder)
        slices, owner = [], []
        for k, s in enumerate(sources):
            vol = _load(s)
            norm = (
                normaliser.fit(torch.from_numpy(vol))
                if normaliser.kind == "percentile"
                else normaliser
            )
            x = norm.normalise(torch.from_numpy(vol)).clamp(0, 1).numpy()
            x = np.clip(_resize(x, size), 0.0, 1.0)
            if slices and x.shape[1:] != slices[0].shape[1:]:
                raise InputError(
                    Path(s.path),
                    f"slices of {x.shape[1:]} differ from {slices[0].shape[1:]}; pass size=",
                )
            keep = (x > 0.05).mean(axis=(1, 2)) >= min_foreground
            slices.append(np.round(x[keep] * 65535).astype(np.uint16))
            owner += [k] * int(keep.sum())
        data = np.concatenate(slices)
        index = {
            "n_slices": int(data.shape[0]),
            "shape": list(data.shape[1:]),
            "normaliser": normaliser.to_dict(),
            "sources": [{"path": s.path, "kind": s.kind, "group": s.group} for s in sources],
            "slice_source": owner,
        }
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_files([folder / "slices.npy", folder / "index.json"], overwrite=True) as (
            npy,
            js,
        ):
            mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint16, shape=data.shape)
            mm[:] = data
            mm.flush()
            del mm
            js.write_text(json.dumps(index))
        return cls(folder)


def _stat(path: str) -> list[Any]:
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]


class SliceDataset(Dataset):
    """torch ``Dataset`` over a :class:`SliceCache` with random patches, flips and 90° rotations.

    Parameters
    ----------
    cache : SliceCache
    indices : sequence of int, optional
        Subset of slice indices (default: all).
    patch_size : int, optional
        Random square patches of this size (default: the whole slice).
    flips : bool
        Random horizontal / vertical flips.
    rot90 : bool
        Random rotations by multiples of 90° (square slices or patches only).
    seed : int
        Randomness of item ``i`` in epoch ``e`` comes from ``(seed, e, i)`` only, so results do
        not depend on worker count or order; call :meth:`set_epoch` each epoch.

    Returns (per item)
    ------------------
    Tensor, shape (1, h, w), float32 in [0, 1].
    """

    def __init__(
        self,
        cache: SliceCache,
        indices: Any = None,
        *,
        patch_size: int | None = None,
        flips: bool = False,
        rot90: bool = False,
        seed: int = 0,
    ):
        self.cache = cache
        self.indices = (
            np.arange(len(cache)) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        h, w = cache.index["shape"]
        if patch_size is not None and not 0 < patch_size <= min(h, w):
            raise SettingsError(
                f"SliceDataset: patch_size must be in [1, {min(h, w)}]; got {patch_size}"
            )
        if rot90 and patch_size is None and h != w:
            raise SettingsError("SliceDataset: rot90 needs square slices or a patch_size")
        self.patch_size, self.flips, self.rot90, self.seed, self.epoch = (
            patch_size,
            flips,
            rot90,
            seed,
            0,
        )

    def set_epoch(self, epoch: int) -> None:
        """Change the random draws for a new epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.cache[int(self.indices[i])]
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        if self.patch_size is not None:
            p = self.patch_size
            top, left = rng.integers(0, x.shape[0] - p + 1), rng.integers(0, x.shape[1] - p + 1)
            x = x[top : top + p, left : left + p]
        if self.flips:
            if rng.random() < 0.5:
                x = x[:, ::-1]
            if rng.random() < 0.5:
                x = x[::-1]
        if self.rot90:
            x = np.rot90(x, int(rng.integers(0, 4)))
        return torch.from_numpy(np.ascontiguousarray(x))[None]


# --- helpers of the .npz trainer (medrecon.training) ------------------------------------------
def valid_boxes(files: Any, n: int, shape: tuple[int, int], path: str | Path) -> np.ndarray:
    """Region of real image data in each of the ``n`` slices of an ``.npz`` file.

    Parameters
    ----------
    files : mapping
        The opened ``.npz`` (anything with ``.files`` / ``in`` and ``[key]``).
    n : int
        Number of slices in its ``images``.
    shape : (H, W)
        Slice size.
    path : str or Path
        The file (named in errors).

    Returns
    -------
    ndarray, shape (n, 4), int64
        ``(row0, row1, col0, col1)``, half-open: rows ``row0 .. row1 - 1`` and columns
        ``col0 .. col1 - 1`` are real data.  The key ``valid_box`` of cropped series (padded to
        the canvas with -1024 HU, ``ct/extra/SOURCES.md``) when the file has one, else the whole
        slice.

    Raises
    ------
    InputError
        ``valid_box`` is not ``(n, 4)`` or a box is empty or leaves the slice.
    """
    h, w = shape
    keys = getattr(files, "files", files)
    if "valid_box" not in keys:
        return np.tile(np.array([0, h, 0, w], np.int64), (n, 1))
    box = np.asarray(files["valid_box"])
    if box.shape != (n, 4) or not np.issubdtype(box.dtype, np.integer):
        raise InputError(
            Path(path), f"'valid_box' must be ({n}, 4) integers (row0, row1, col0, col1); "
            f"got {box.dtype} {box.shape}"
        )
    box = box.astype(np.int64)
    bad = (box[:, 0] < 0) | (box[:, 1] > h) | (box[:, 0] >= box[:, 1]) | (box[:, 2] < 0) | (
        box[:, 3] > w
    ) | (box[:, 2] >= box[:, 3])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            Path(path), f"'valid_box' row {i} = {box[i].tolist()} is empty or leaves the "
            f"{h}x{w} slice"
        )
    return box


def patch_origin(box: Any, size: int, u_row: int, u_col: int) -> tuple[int, int]:
    """Top-left corner of a ``size`` x ``size`` patch inside ``box`` from two random integers.

    Parameters
    ----------
    box : (row0, row1, col0, col1)
        Half-open region (:func:`valid_boxes`); must hold the patch.
    size : int
    u_row, u_col : int
        Non-negative random integers; the corner is ``row0 + u_row % (row1 - row0 - size + 1)``
        (and alike for columns), so every position inside the box is possible and none outside.

    Returns
    -------
    (top, left) : tuple of int

    Raises
    ------
    SettingsError
        The box is smaller than the patch.

    Examples
    --------
    >>> patch_origin((27, 229, 29, 227), 64, 0, 10**9)
    (27, 84)
    """
    r0, r1, c0, c1 = (int(v) for v in box)
    if r1 - r0 < size or c1 - c0 < size:
        raise SettingsError(
            f"patch_origin: a {size}x{size} patch does not fit the box {[r0, r1, c0, c1]}"
        )
    return r0 + int(u_row) % (r1 - r0 - size + 1), c0 + int(u_col) % (c1 - c0 - size + 1)


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """One of the 8 flips/rotations of the last two axes: ``torch.rot90`` by ``k`` quarter turns
    (counter-clockwise as displayed: row 0 at the top), then, if ``flip``, a left-right flip.

    Image and coordinate channels given the same ``(k, flip)`` move together: every pixel
    keeps its values, coordinates included, and only its place changes.
    """
    x = torch.rot90(x, k=int(k) % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _npz_shape(path: Path, key: str, opened: Any) -> tuple[int, ...]:
    """Shape of ``key`` in an ``.npz`` from its ``.npy`` header alone (the members may be
    bzip2-compressed: decompressing a 1,000-slice array only to count it takes seconds)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read is not None:
                return tuple(read(f)[0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        pass
    return tuple(opened[key].shape)


def npz_source_info(path: str | Path, *, name: str | None = None) -> dict[str, Any]:
    """What a model card says about one training ``.npz``: slices, patients and, where the file
    records them, its ``source``, ``collection`` and ``licence`` (as found) and whether it has
    ``valid_box`` crops.  Patient IDs are counted, never listed.

    Parameters
    ----------
    path : str or Path
    name : str, optional
        How the card names the file (default: its last two path parts, e.g. ``ct/train.npz``;
        the trainer passes the path as configured, e.g. ``ct/extra/ibsi_sts_ct_crops.npz``).

    Raises
    ------
    InputError
        The file is missing or has no ``images``.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise InputError(path, f"no 'images' array (has {', '.join(z.files)})")
            info: dict[str, Any] = {
                "file": name or "/".join(path.parts[-2:]),
                "slices": int(_npz_shape(path, "images", z)[0]),
            }
            if "patient_id" in z.files:
                info["patients"] = int(np.unique(np.asarray(z["patient_id"]).astype(str)).size)
            for key in ("source", "collection", "licence"):
                if key in z.files:
                    vals = sorted({str(v) for v in np.atleast_1d(z[key])})
                    if len(vals) > 8:  # per-slice file paths: too many for a card
                        info[key] = f"{len(vals)} distinct per-slice values (see the file)"
                    else:
                        info[key] = vals[0] if len(vals) == 1 else vals
            info["valid_box"] = "valid_box" in z.files
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read training data ({err})") from err
    return info


def axial_display_slices(
    array: np.ndarray, affine: np.ndarray, *, spacing_mm: float | None = None, size: int | None = None
) -> np.ndarray:
    """Axial slices of a volume in the display frame of the training slices, at one pixel size.

    The volume is resliced along its most superior–inferior array axis (an isotropic sagittal
    acquisition gives axial slices), and each slice is turned so that row 0 is anterior and
    column 0 the patient's right: the radiological layout of the ``.npz`` training slices, and
    the one :func:`medrecon.datasets.orientation.display_orientation` gives the figures.  With
    ``spacing_mm`` the slices are resampled (bilinear, antialiased) to square pixels of that
    size; with ``size`` they are then cropped or zero-padded about their centre to ``size`` x
    ``size``.

    Parameters
    ----------
    array : ndarray, shape (Z, Y, X)
        Voxel values (:class:`~medrecon.datasets.Volume` layout).
    affine : ndarray, shape (4, 4)
        RAS+ voxel-to-world affine, columns for the x, y and z array axes.
    spacing_mm : float, optional
        In-plane pixel size of the result (default: as stored, no resampling).
    size : int, optional
        Side of the square result (default: as resampled).

    Returns
    -------
    ndarray, shape (N, H, W), float32
        Superior slices last.

    Raises
    ------
    InputError
        The affine has no axis along each of right, anterior and superior (an oblique volume
        whose axes are ambiguous).
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    dirs = [a[:, 2 - k] for k in range(3)]  # array axis 0, 1, 2 ↔ affine column 2, 1, 0
    world = [int(np.argmax(np.abs(d))) for d in dirs]  # 0 R, 1 A, 2 S
    if sorted(world) != [0, 1, 2]:
        raise InputError(Path("<volume>"), f"its axes do not map one-to-one onto R, A, S (affine {a.tolist()})")
    axial = world.index(2)  # the array axis along superior
    rows, cols = (k for k in range(3) if k != axial)
    x = np.moveaxis(np.asarray(array, dtype=np.float32), axial, 0)
    if dirs[axial][2] < 0:  # superior slices last
        x = x[::-1]
    plane = np.eye(4)
    plane[:3, 0], plane[:3, 1], plane[:3, 2] = dirs[cols], dirs[rows], dirs[axial]
    transpose, flip_rows, flip_cols, _ = display_orientation(plane)  # the figures' axial layout
    if transpose:
        x, rows, cols = x.transpose(0, 2, 1), cols, rows
    if flip_rows:
        x = x[:, ::-1]
    if flip_cols:
        x = x[:, :, ::-1]
    if spacing_mm is not None:
        row_mm = float(np.linalg.norm(dirs[rows]))
        col_mm = float(np.linalg.norm(dirs[cols]))
        shape = (max(1, round(x.shape[1] * row_mm / spacing_mm)), max(1, round(x.shape[2] * col_mm / spacing_mm)))
        x = _resize(np.ascontiguousarray(x), shape)
    if size is not None:
        out = np.zeros((x.shape[0], size, size), np.float32)
        src, dst = [], []
        for n in x.shape[1:]:
            lo = max(0, (n - size) // 2)  # crop start in the slice
            off = max(0, (size - n) // 2)  # pad start in the result
            m = min(n, size)
            src.append(slice(lo, lo + m))
            dst.append(slice(off, off + m))
        out[:, dst[0], dst[1]] = x[:, src[0], src[1]]
        x = out
    return np.ascontiguousarray(x, dtype=np.float32)
