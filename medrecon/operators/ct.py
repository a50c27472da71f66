"""X-ray CT: parallel- and fan-beam projection with exact adjoints, and filtered back-projection.

Conventions (docs/geometry.md has the picture; docs/conventions.md the summary)
-----------------------------------------------------------------------------
* Images are ``(B, C, H, W)``, real, in any unit; a volume is slices on the batch axis.
* Pixel coordinates: ``x`` = column index (right on screen), ``y`` = row index (down on screen,
  row 0 at the top).  The rotation centre is the pixel ``(H // 2, W // 2)`` (as in
  ``skimage.transform.radon``) unless ``center`` gives another point ``(row, col)``; ASTRA's
  volumes turn about ``((H − 1) / 2, (W − 1) / 2)``.
* Sinograms are ``(B, C, views, bins)``: line integrals of the image per pixel of path length.
* Angles increase counter-clockwise on screen.  At view angle θ the rays run along
  ``r = (sin θ, cos θ)`` and the detector axis ``u = (cos θ, −sin θ)`` (``u`` is ``r`` turned
  90° counter-clockwise on screen), both in ``(x, y)``.
* Parallel beam (θ on ``[0, 2π)``; a view at θ + π is the view at θ mirrored): bin ``b`` sits at
  ``s = ±(b − n_bins // 2 − offset) · spacing`` along ``u`` from the rotation centre (``+``
  unless ``flip_detector``).  With the defaults (⌈√2·max(H, W)⌉ bins, unit spacing) the
  projector reproduces ``skimage.transform.radon(image, np.rad2deg(angles), circle=False).T``
  to floating-point precision: each ray is sampled at unit steps with bilinear interpolation.
* Fan beam (source angle β on ``[0, 2π)``): the source sits at ``centre − D·r``, so the central
  ray runs along ``r``; element ``k`` of ``n`` is at fan angle ``γ = ±(k − (n−1)/2 − offset)·Δγ``
  (equiangular, curved detector) or at ``u = ±(k − (n−1)/2 − offset)·Δu`` along ``u`` on a
  flat detector at distance ``source_to_detector`` from the source.  Distances are in the unit
  of ``pixel_size`` (e.g. mm) and converted to pixels.
* ``detector_offset`` (bins): the ray through the rotation centre meets the detector at bin
  ``middle + offset`` (``middle`` = ``n // 2`` parallel, ``(n − 1) / 2`` fan): a
  centre-of-rotation offset.

How it is applied.  Below ``matrix_budget`` (default 2 GiB, ``MEDRECON_MATRIX_BUDGET_GB``) the
projector is a precomputed sparse matrix (:mod:`medrecon.operators.sparse`, disk-cached) whose
exact transpose is the adjoint, and FBP back-projects with a precomputed pixel-driven matrix.
Above it (clinical sizes: 512², 720 views × 560 bins would need about 13 GB) the same model is
applied matrix-free in chunks of views (:mod:`medrecon.operators.raytrace`); the two agree to
rounding.  FBP filters the sinogram and back-projects pixel by pixel with linear
interpolation (and the 1/L² or 1/U² distance weights for fan beam); it never needs the
forward matrix.  Its angular weights (:func:`medrecon.operators.fbp.angular_weights`) are in
the right units for full, limited-angle and fan-beam short scans (Parker weights).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from medrecon.errors import SettingsError, ShapeError
from medrecon.operators.base import SamplingOperator
from medrecon.operators.fbp import FBP_FILTERS, AngularWeights, angular_weights, fbp_filter, view_weights
from medrecon.operators.raytrace import (
    CHUNK_BYTES,
    backproject_pixels,
    backproject_rays,
    project_rays,
    ray_matrix,
    ray_plan,
)
from medrecon.operators.sparse import SparseMatrix, cached_matrix, env_gib
from medrecon.operators.torch_radon_backend import BACKENDS, use_torch_radon

__all__ = [
    "CTProjector",
    "ParallelBeamCT",
    "FanBeamCT",
    "FBP_FILTERS",
    "fbp_filter",
    "view_weights",
    "ray_matrix",
    "projector_nnz",
    "projector_memory_bytes",
    "matrix_free_memory_bytes",
    "default_matrix_budget",
    "MATRIX_BUDGET_ENV",
]

#: environment variable with the matrix budget in GiB (default 2)
MATRIX_BUDGET_ENV = "MEDRECON_MATRIX_BUDGET_GB"
_DEFAULT_MATRIX_BUDGET_GIB = 2.0
FAN_BACKENDS = ("auto", "sparse", "matrix-free")


# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------
#: non-zeros of the forward matrix per view, over bins × max(H, W): measured 1.49-1.56 for
#: parallel and fan beam on 64²-512² grids (a ray crosses about max(H, W) pixel columns and the
#: bilinear weights touch about 1.5 pixels per step)
_FORWARD_NNZ_PER_BIN_PIXEL = 1.6
#: non-zeros of the FBP back-projection matrix per view, over H·W (two detector bins per pixel)
_BACKPROJECTOR_NNZ_PER_PIXEL = 2.0
#: peak resident bytes per non-zero while the matrices are built and used: the forward matrix is
#: assembled in float64 / int64 blocks, stacked, cast to float32 / int32 and transposed; the
#: back-projector likewise without the transpose (measured peak RSS of building both and running
#: FBP and TV: 1.8 GB at 128², 1000 views; 3.7 GB at 256², 500 views; 2.0 GB at 64², 4000 views)
_BYTES_PER_FORWARD_NNZ = 40
_BYTES_PER_BACKPROJECTOR_NNZ = 16


def projector_nnz(image_shape: tuple[int, int], n_views: int, n_bins: int) -> tuple[int, int]:
    """Estimated non-zeros of the forward and the FBP back-projection matrices of a CT geometry.

    Parameters
    ----------
    image_shape : (H, W)
        Reconstruction grid in pixels.
    n_views : int
        Views whose matrices are built (measured views, plus the full set when a method uses it).
    n_bins : int
        Detector bins per view.

    Returns
    -------
    (int, int)
        Forward ``≈ 1.6 · views · bins · max(H, W)`` and back-projector ``≈ 2 · views · H · W``.
    """
    h, w = (int(v) for v in image_shape)
    forward = _FORWARD_NNZ_PER_BIN_PIXEL * n_views * n_bins * max(h, w)
    back = _BACKPROJECTOR_NNZ_PER_PIXEL * n_views * h * w
    return int(math.ceil(forward)), int(math.ceil(back))


def projector_memory_bytes(image_shape: tuple[int, int], n_views: int, n_bins: int) -> int:
    """Estimated peak memory (bytes) of building and using a CT projector's sparse matrices.

    The forward matrix, its stored transpose and the FBP back-projector of
    :class:`ParallelBeamCT` / :class:`FanBeamCT` (:func:`projector_nnz` non-zeros; about 40 bytes
    per forward and 16 per back-projector non-zero at the peak of building them).  Measured
    within 15 % of the peak resident memory on 64²-256² grids with 500-4000 views.  A pure
    function: nothing is built.

    Examples
    --------
    >>> round(projector_memory_bytes((128, 128), 1000, 182) / 2**30, 1)  # GiB
    1.9
    """
    forward, back = projector_nnz(image_shape, n_views, n_bins)
    return forward * _BYTES_PER_FORWARD_NNZ + back * _BYTES_PER_BACKPROJECTOR_NNZ


def matrix_free_memory_bytes(image_shape: tuple[int, int], n_views: int, n_bins: int, slices: int = 1) -> int:
    """Estimated peak memory (bytes) of applying a CT projector matrix-free to ``slices`` images.

    Twice the working memory of one chunk of views (at least one view's sample grid,
    :data:`medrecon.operators.raytrace.CHUNK_BYTES` otherwise; twice for the gradients of an
    autograd pass), the ray geometry (four float64 numbers per ray, twice) and the images and
    sinograms in and out (float64 for safety), on top of the interpreter and torch themselves
    (about 0.3 GiB).

    Examples
    --------
    >>> round(matrix_free_memory_bytes((512, 512), 720, 560) / 2**20)  # MiB
    53
    """
    h, w = (int(v) for v in image_shape)
    samples = math.ceil(math.sqrt(2) * max(h, w)) + 3
    per_view = max(samples * n_bins * (16 + 8 * slices), h * w * (16 + 4 * slices))
    rays = 2 * 4 * 8 * n_views * n_bins
    data = 2 * 8 * slices * (h * w + n_views * n_bins)
    return 2 * max(CHUNK_BYTES, per_view) + rays + data


def default_matrix_budget() -> int:
    """The memory (bytes) a CT projector's sparse matrices may take before it runs matrix-free:
    ``MEDRECON_MATRIX_BUDGET_GB`` (GiB, e.g. ``0.5``; ``0`` always runs matrix-free), else 2 GiB
    (:func:`~medrecon.operators.sparse.env_gib`, which raises on a value that is not ≥ 0)."""
    return env_gib(MATRIX_BUDGET_ENV, _DEFAULT_MATRIX_BUDGET_GIB, "2 or 0.5")


def _check_angles(angles: np.ndarray, period: float, who: str) -> np.ndarray:
    a = np.asarray(angles, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise SettingsError(f"{who}: angles_rad must be a non-empty 1-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise SettingsError(f"{who}: angles_rad contains NaN or Inf")
    if a.min() < 0 or a.max() >= period + 1e-9:
        raise SettingsError(
            f"{who}: angles_rad must lie in [0, {period:.6g}) radians, got [{a.min():.6g}, {a.max():.6g}]"
        )
    return a


def _check_mask(mask, n: int, who: str) -> np.ndarray:
    if mask is None:
        return np.ones(n, dtype=bool)
    m = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask).astype(bool)
    if m.shape != (n,):
        raise ShapeError(f"{who}: view_mask must have shape ({n},) (one flag per angle), got {m.shape}")
    if not m.any():
        raise SettingsError(f"{who}: view_mask selects no view")
    return m


def _image_shape(image_size) -> tuple[int, int]:
    shape = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(shape) != 2 or not all(isinstance(s, int | np.integer) and s > 0 for s in shape):
        raise SettingsError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return int(shape[0]), int(shape[1])


def _center(center, shape: tuple[int, int], who: str) -> tuple[float, float]:
    if center is None:
        return float(shape[0] // 2), float(shape[1] // 2)
    try:
        row, col = (float(v) for v in center)
    except (TypeError, ValueError) as err:
        raise SettingsError(f"{who}: center must be (row, col) in pixels, got {center!r}") from err
    if not (math.isfinite(row) and math.isfinite(col)):
        raise SettingsError(f"{who}: center must be finite, got {center!r}")
    return row, col


# --------------------------------------------------------------------------------------------
# shared machinery of the two geometries
# --------------------------------------------------------------------------------------------
class CTProjector(SamplingOperator):
    """A CT geometry over a full angle set ``T``, measured on a subset of its views (the mask Λ).

    The interface :class:`ParallelBeamCT` and :class:`FanBeamCT` share, and what code outside
    the operators may rely on (``isinstance(A, CTProjector)`` tells a CT problem):

    Attributes
    ----------
    image_shape : (H, W)
    angles : ndarray, shape (V,)
        The measured views' angles (radians).
    full_angles : ndarray, shape (n,)
        The angles of ``T``.
    view_mask : ndarray of bool, shape (n,)
        Which of ``full_angles`` are measured (``mask`` holds it as a tensor).
    n_bins : int
    period : float
        π (parallel) or 2π (fan): the range a full scan covers.
    center : (float, float)
        Rotation centre ``(row, col)`` in pixels.
    detector_offset : float
        Bin (from the middle) that the ray through the rotation centre meets.
    flip_detector : bool
        Bins run against the detector axis ``u``.
    matrix_budget : int
        Bytes the sparse matrices may take (:func:`default_matrix_budget`); lowering it before
        first use makes the projector matrix-free (the pipeline does so when memory is short).
    matrix_free : bool
        A, Aᵀ and FBP run without stored matrices (the matrices would exceed ``matrix_budget``
        bytes, or ``backend="matrix-free"``).

    Methods
    -------
    forward / adjoint / normal, ``fbp(y, filter_name)``, ``fbp_weights()``, ``T``, ``reduce``,
    ``expand``, ``T_inverse``, ``data_consistency``, ``with_view_mask(mask)``.
    """

    period: float
    #: middle of the detector in bins, as a function of the bin count
    _middle: staticmethod

    def __init__(self, image_shape, angles, view_mask, n_bins, who, *, center, detector_offset: float,
                 flip_detector: bool, backend: str, matrix_budget: int | None):
        self.image_shape = image_shape
        self.full_angles = angles
        self.view_mask = view_mask
        self.angles = angles[view_mask]
        self.n_bins = n_bins
        self.mask = torch.from_numpy(view_mask)
        self.center = _center(center, image_shape, who)
        if not math.isfinite(float(detector_offset)):
            raise SettingsError(f"{who}: detector_offset must be finite, got {detector_offset!r}")
        self.detector_offset = float(detector_offset)
        self.flip_detector = bool(flip_detector)
        self.backend = backend
        self.matrix_budget = default_matrix_budget() if matrix_budget is None else int(matrix_budget)
        super().__init__(
            (None, *image_shape), (None, int(view_mask.sum()), n_bins), name=who
        )
        self._matrix: SparseMatrix | None = None
        self._bp: SparseMatrix | None = None
        self._full: CTProjector | None = None
        self._plans: dict[int, object] = {}
        self._rays_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # per-view back-projection weights of the *full* set (T⁻¹), restricted to measured views
        self.full_weights = view_weights(angles, self.period)

    @property
    def matrix_free(self) -> bool:
        """Whether A, Aᵀ and FBP run without stored matrices."""
        if self.backend == "matrix-free":
            return True
        if self.backend == "sparse" or min(self.image_shape) < 2 or self.n_bins < 2:
            return False
        return projector_memory_bytes(self.image_shape, len(self.angles), self.n_bins) > self.matrix_budget

    # geometry-specific pieces
    def _rays(self, angles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per view and bin a ray origin and unit direction ``(V, n_bins, 2)``, and the sample
        positions ``t`` along every ray."""
        raise NotImplementedError

    def _geometry_key(self) -> dict:
        raise NotImplementedError

    def _geometry_kwargs(self) -> dict:
        """Constructor keywords (in pixel units) that rebuild this geometry for other angles."""
        raise NotImplementedError

    def _filter_and_weight(self, y: Tensor, filter_name: str) -> Tensor:
        raise NotImplementedError

    def _pixel_detector_coords(self, angles: Tensor, xx: Tensor, yy: Tensor) -> tuple[Tensor, Tensor | None]:
        """Fractional bin index of every pixel in every view, and its back-projection weight
        (None: 1); ``xx``, ``yy`` are pixel offsets from the rotation centre."""
        raise NotImplementedError

    def _fan_angles(self) -> np.ndarray | None:
        """Fan angle of each detector element (fan beam), for Parker weights."""
        return None

    # shared geometry helpers
    def _positions(self) -> np.ndarray:
        """Signed position of each bin along ``u`` in detector units (bins × spacing)."""
        sign = -1.0 if self.flip_detector else 1.0
        return sign * (np.arange(self.n_bins) - self._middle(self.n_bins) - self.detector_offset)

    def _bin_of(self, position: Tensor) -> Tensor:
        """Fractional bin index of a signed position along ``u`` (in units of the spacing)."""
        sign = -1.0 if self.flip_detector else 1.0
        return sign * position + (self._middle(self.n_bins) + self.detector_offset)

    def _reach(self) -> float:
        """Distance from the rotation centre beyond which no ray sample touches the image."""
        h, w = self.image_shape
        cy, cx = self.center
        far = max(math.hypot(px - cx, py - cy) for px in (0, w - 1) for py in (0, h - 1))
        return far + math.sqrt(2.0)

    def with_view_mask(self, view_mask) -> CTProjector:
        """The same geometry over :attr:`full_angles`, measuring the views in ``view_mask``.

        Parameters
        ----------
        view_mask : array-like of bool, shape (n,)

        Examples
        --------
        >>> A = ParallelBeamCT(16, np.arange(8) * np.pi / 8)
        >>> A.with_view_mask(np.arange(8) % 2 == 0).angles.size
        4
        """
        return type(self)(self.image_shape, self.full_angles, view_mask=view_mask, **self._geometry_kwargs())

    # the system matrix
    def _ray_set(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._rays_cache is None:
            self._rays_cache = self._rays(self.angles)
        return self._rays_cache

    @property
    def matrix(self) -> SparseMatrix:
        """The forward matrix ``(views·bins, H·W)`` and its transpose, built once and disk-cached."""
        if self._matrix is None:
            key = {**self._geometry_key(), "angles": self.angles.round(12).tolist()}

            def build() -> sp.csr_matrix:
                o, d, t = self._ray_set()
                return ray_matrix(self.image_shape, o.reshape(-1, 2), d.reshape(-1, 2), t)

            m = cached_matrix(key, build, budget=self.matrix_budget)
            mt = cached_matrix({**key, "transpose": True}, lambda: m.T.tocsr(), budget=self.matrix_budget)
            self._matrix = SparseMatrix(m, mt)
        return self._matrix

    @property
    def backprojector(self) -> SparseMatrix:
        """Pixel-driven FBP back-projection matrix ``(H·W, views·bins)`` (linear interpolation
        between bins, times the geometry's distance weight), built once and disk-cached."""
        if self._bp is None:
            key = {**self._geometry_key(), "angles": self.angles.round(12).tolist()}
            key["kind"] = key["kind"] + "-fbp"
            self._bp = SparseMatrix(cached_matrix(key, self._build_backprojector, budget=self.matrix_budget))
        return self._bp

    def _pixel_grid(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        h, w = self.image_shape
        cy, cx = self.center
        yy, xx = torch.meshgrid(
            torch.arange(h, dtype=dtype, device=device) - cy,
            torch.arange(w, dtype=dtype, device=device) - cx,
            indexing="ij",
        )
        return xx, yy

    def _build_backprojector(self) -> sp.csr_matrix:
        h, w = self.image_shape
        xx, yy = self._pixel_grid(torch.float64)
        angles = torch.as_tensor(self.angles, dtype=torch.float64)
        pixels = np.arange(h * w)
        blocks = []
        for v in range(len(self.angles)):
            pos, wt = self._pixel_detector_coords(angles[v : v + 1], xx, yy)
            pos = pos.reshape(-1).numpy()
            wt = np.ones_like(pos) if wt is None else wt.reshape(-1).numpy()
            i0 = np.floor(pos)
            frac = pos - i0
            i0 = i0.astype(np.int64)
            rows, cols, vals = [], [], []
            for di, wi in ((0, 1 - frac), (1, frac)):
                idx = i0 + di
                ok = (idx >= 0) & (idx < self.n_bins) & (wi > 0)
                rows.append(pixels[ok])
                cols.append(idx[ok])
                vals.append((wi * wt)[ok])
            blocks.append(sp.csr_matrix(
                (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                shape=(h * w, self.n_bins),
            ))
        return sp.hstack(blocks, format="csr")

    def _plan(self, channels: int):
        if channels not in self._plans:
            o, d, t = self._ray_set()
            self._plans[channels] = ray_plan(self.image_shape, o, d, t, channels)
        return self._plans[channels]

    def _project(self, x: Tensor) -> Tensor:
        """A x by the sparse matrix or matrix-free (never torch-radon): the reference model."""
        b, c = x.shape[:2]
        if self.matrix_free:
            return project_rays(x, self._plan(b * c))
        y = self.matrix.apply(x.reshape(b, c, -1))
        return y.reshape(b, c, len(self.angles), self.n_bins)

    def _forward(self, x: Tensor) -> Tensor:
        radon = use_torch_radon(self, x)
        if radon is not None:
            return radon.forward(x)
        return self._project(x)

    def _adjoint(self, y: Tensor) -> Tensor:
        radon = use_torch_radon(self, y)
        if radon is not None:
            return radon.backprojection(y)
        b, c = y.shape[:2]
        if self.matrix_free:
            return backproject_rays(y, self._plan(b * c))
        x = self.matrix.apply(y.reshape(b, c, -1), transpose=True)
        return x.reshape(b, c, *self.image_shape)

    # the decomposition A = P Λ T
    @property
    def T(self) -> CTProjector:  # noqa: N802
        """The projector over the full angle set."""
        if self.view_mask.all():
            return self
        if self._full is None:
            self._full = type(self)(self.image_shape, self.full_angles, **self._geometry_kwargs())
        return self._full

    def reduce(self, z: Tensor) -> Tensor:
        return z[:, :, self.mask.to(z.device), :]

    def expand(self, y: Tensor) -> Tensor:
        z = y.new_zeros(*y.shape[:2], len(self.full_angles), self.n_bins)
        z[:, :, self.mask.to(y.device), :] = y
        return z

    def T_inverse(self, z: Tensor) -> Tensor:  # noqa: N802
        """FBP (ramp) over the full angle set."""
        return self.T.fbp(z)

    def _inverse_of_measured(self, r: Tensor) -> Tensor:
        w = self.full_weights[self.view_mask]
        return self._fbp(r, "ramp", w, None)

    # filtered back-projection
    def fbp_weights(self) -> AngularWeights:
        """The angular weights :meth:`fbp` uses for the measured views
        (:func:`medrecon.operators.fbp.angular_weights`): ``scan`` says whether they make a
        full, limited-angle or (fan beam) short scan."""
        return angular_weights(self.angles, self.period, self._fan_angles())

    def fbp(self, y: Tensor, filter_name: str = "ramp") -> Tensor:
        """Filtered back-projection of a measured sinogram.

        Parameters
        ----------
        y : Tensor, shape (B, C, views, bins), real
        filter_name : {"ramp", "shepp-logan", "cosine", "hamming", "hann"}

        Returns
        -------
        Tensor, shape (B, C, H, W)
            The image, in the units of the image the sinogram was projected from.  A
            limited-angle scan is normalised to the range its views cover and a fan-beam short
            scan is Parker-weighted (:meth:`fbp_weights`).
        """
        y = self._check(y, self.out_shape, False, "fbp")
        aw = self.fbp_weights()
        return self._fbp(y, filter_name, aw.views, aw.bins)

    def _fbp(self, y: Tensor, filter_name: str, views: np.ndarray, rays: np.ndarray | None) -> Tensor:
        if rays is not None:
            y = y * torch.as_tensor(rays, dtype=y.dtype, device=y.device)
        q = self._filter_and_weight(y, filter_name)
        q = q * torch.as_tensor(views, dtype=y.dtype, device=y.device)[:, None]
        b, c = q.shape[:2]
        if self.matrix_free:
            return backproject_pixels(q, self._pixel_coords_fn(q), self.image_shape)
        return self.backprojector.apply(q.reshape(b, c, -1)).reshape(b, c, *self.image_shape)

    def _pixel_coords_fn(self, like: Tensor):
        angles = torch.as_tensor(self.angles, dtype=like.dtype, device=like.device)

        def grids(views: slice) -> tuple[Tensor, Tensor | None]:
            return self._backprojection_grid(angles[views])

        return grids

    def _affine_grid(self, rows: Tensor) -> Tensor:
        """``(V, H, W, 2)``: channel ``k`` is ``a·x + b·y + c`` for the ``(V, 2, 3)`` rows of
        coefficients ``(a, b, c)``, with ``(x, y)`` the pixel offsets from the rotation centre
        (``rows[:, 1] = None`` leaves the second channel zero).  One broadcast add per channel
        (``affine_grid``'s thin matrix product took 5–10 ms per 512² view)."""
        h, w = self.image_shape
        cy, cx = self.center
        xs = torch.arange(w, dtype=rows.dtype, device=rows.device) - cx
        ys = torch.arange(h, dtype=rows.dtype, device=rows.device) - cy
        out = torch.empty(rows.shape[0], h, w, 2, dtype=rows.dtype, device=rows.device)
        for ch in range(2):
            if ch == 1 and not bool(rows[:, 1].any()):
                out[..., 1].zero_()
                continue
            a, b, c = rows[:, ch, 0, None], rows[:, ch, 1, None], rows[:, ch, 2, None]
            torch.add((a * xs)[:, None, :], (b * ys + c)[:, :, None], out=out[..., ch])
        return out

    def _backprojection_grid(self, angles: Tensor) -> tuple[Tensor, Tensor | None]:
        """The ``grid_sample`` grid of every pixel's bin in each view ``(V, H, W, 2)`` and its
        weight (matrix-free FBP; the same numbers as :meth:`_pixel_detector_coords`)."""
        xx, yy = self._pixel_grid(angles.dtype, angles.device)
        pos, wt = self._pixel_detector_coords(angles, xx, yy)
        grid = torch.zeros(*pos.shape, 2, dtype=pos.dtype, device=pos.device)
        grid[..., 0] = pos * (2.0 / (self.n_bins - 1)) - 1.0
        return grid, wt

    def _apply_filter(self, y: Tensor, response: np.ndarray, scale: float) -> Tensor:
        n_pad = response.shape[0]
        resp = torch.as_tensor(response * scale, dtype=y.dtype, device=y.device)
        spec = torch.fft.rfft(y, n=n_pad, dim=-1) * resp[: n_pad // 2 + 1]
        return torch.fft.irfft(spec, n=n_pad, dim=-1)[..., : self.n_bins]


# --------------------------------------------------------------------------------------------
# parallel beam
# --------------------------------------------------------------------------------------------
class ParallelBeamCT(CTProjector):
    """2D parallel-beam projection ``(B, C, H, W) -> (B, C, views, bins)``.

    Parameters
    ----------
    image_size : int or (H, W)
    angles_rad : array-like, shape (n,), optional
        The full angle set T projects over, radians on ``[0, 2π)`` (a full scan covers
        ``[0, π)``).  Default: 180 equally spaced views on ``[0, π)``.
    view_mask : array-like of bool, shape (n,), optional
        The measured views Λ (default: all); A projects only these.
    n_bins : int, optional
        Detector bins; default ⌈√2·max(H, W)⌉ (scikit-image ``circle=False``).
    detector_spacing : float
        Bin width in pixels.
    detector_offset : float
        Centre-of-rotation offset: the bin, from the middle bin ``n_bins // 2``, that the ray
        through the rotation centre meets.
    flip_detector : bool
        Bins run against the detector axis ``u = (cos θ, −sin θ)``.
    center : (row, col), optional
        Rotation centre in pixels; default ``(H // 2, W // 2)``.
    backend : {"auto", "sparse", "matrix-free", "torch-radon"}
        ``auto`` uses torch-radon for CUDA tensors when it is installed and passes a geometry
        check against the reference projector (:mod:`medrecon.operators.torch_radon_backend`),
        else the sparse matrix while it fits ``matrix_budget``, else the matrix-free projector.
    matrix_budget : int, optional
        Bytes the sparse matrices may take (:func:`default_matrix_budget`).

    Examples
    --------
    >>> import torch
    >>> from medrecon.operators import ParallelBeamCT
    >>> A = ParallelBeamCT.sparse_view(64, n_views=8)
    >>> A(torch.ones(1, 1, 64, 64)).shape
    torch.Size([1, 1, 8, 91])
    """

    period = math.pi
    _middle = staticmethod(lambda n: n // 2)

    def __init__(
        self,
        image_size: int | tuple[int, int],
        angles_rad=None,
        *,
        view_mask=None,
        n_bins: int | None = None,
        detector_spacing: float = 1.0,
        detector_offset: float = 0.0,
        flip_detector: bool = False,
        center: tuple[float, float] | None = None,
        backend: str = "auto",
        matrix_budget: int | None = None,
    ):
        shape = _image_shape(image_size)
        who = "ParallelBeamCT"
        if backend not in BACKENDS:
            raise SettingsError(f"{who}: backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if angles_rad is None:
            angles_rad = np.arange(180) * (math.pi / 180)
        angles = _check_angles(
            angles_rad.cpu().numpy() if isinstance(angles_rad, Tensor) else angles_rad, 2 * math.pi, who
        )
        mask = _check_mask(view_mask, angles.size, who)
        n_bins = int(math.ceil(math.sqrt(2) * max(shape))) if n_bins is None else int(n_bins)
        if n_bins < 1 or not detector_spacing > 0:
            raise SettingsError(f"{who}: n_bins and detector_spacing must be positive, got {n_bins}, {detector_spacing}")
        self.detector_spacing = float(detector_spacing)
        super().__init__(shape, angles, mask, n_bins, who, center=center, detector_offset=detector_offset,
                         flip_detector=flip_detector, backend=backend, matrix_budget=matrix_budget)

    @classmethod
    def sparse_view(cls, image_size, n_views: int, n_full: int | None = None, **kw) -> ParallelBeamCT:
        """``n_views`` equally spaced views on [0, π), measured within a full set of ``n_full``."""
        from medrecon.operators.masks import sparse_view_angles

        angles, mask = sparse_view_angles(n_views, n_full)
        return cls(image_size, angles, view_mask=mask, **kw)

    @classmethod
    def limited_angle(
        cls, image_size, range_rad: float, n_full: int = 180, start_rad: float = 0.0, **kw
    ) -> ParallelBeamCT:
        """The views of a full ``n_full``-view set that fall in ``[start, start + range)``."""
        from medrecon.operators.masks import limited_angle_angles

        angles, mask = limited_angle_angles(range_rad, n_full, start_rad)
        return cls(image_size, angles, view_mask=mask, **kw)

    def _geometry_key(self) -> dict:
        return {
            "kind": "parallel",
            "shape": list(self.image_shape),
            "bins": self.n_bins,
            "spacing": self.detector_spacing,
            "center": list(self.center),
            "offset": self.detector_offset,
            "flip": self.flip_detector,
        }

    def _geometry_kwargs(self) -> dict:
        return {"n_bins": self.n_bins, "detector_spacing": self.detector_spacing,
                "detector_offset": self.detector_offset, "flip_detector": self.flip_detector,
                "center": self.center, "backend": self.backend, "matrix_budget": self.matrix_budget}

    def _rays(self, angles):
        cy, cx = self.center
        reach = math.ceil(self._reach())
        t = np.arange(-reach, reach + 1, dtype=np.float64)
        s = self._positions() * self.detector_spacing
        cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
        origins = np.stack([cx + cos * s[None, :], cy - sin * s[None, :]], axis=-1)
        dirs = np.broadcast_to(np.stack([sin, cos], axis=-1), origins.shape)
        return origins, np.ascontiguousarray(dirs), t

    def _filter_and_weight(self, y: Tensor, filter_name: str) -> Tensor:
        return self._apply_filter(y, fbp_filter(self.n_bins, filter_name), 1.0 / self.detector_spacing)

    def _pixel_detector_coords(self, angles, xx, yy):
        s = torch.cos(angles)[:, None, None] * xx - torch.sin(angles)[:, None, None] * yy
        return self._bin_of(s / self.detector_spacing), None

    def _backprojection_grid(self, angles):
        # the bin is affine in the pixel's position: one affine_grid call makes the whole grid
        k = (-2.0 if self.flip_detector else 2.0) / (self.detector_spacing * (self.n_bins - 1))
        c = 2.0 * (self._middle(self.n_bins) + self.detector_offset) / (self.n_bins - 1) - 1.0
        cos, sin = torch.cos(angles), torch.sin(angles)
        zero = torch.zeros_like(cos)
        rows = torch.stack([torch.stack([k * cos, -k * sin, zero + c], -1), torch.stack([zero, zero, zero], -1)], 1)
        return self._affine_grid(rows), None


# --------------------------------------------------------------------------------------------
# fan beam
# --------------------------------------------------------------------------------------------
class FanBeamCT(CTProjector):
    """2D fan-beam projection ``(B, C, H, W) -> (B, C, views, bins)``.

    Parameters
    ----------
    image_size : int or (H, W)
    angles_rad : array-like, shape (n,), optional
        Source angles, radians on ``[0, 2π)``; default 360 equally spaced views.
    source_to_isocenter, source_to_detector : float
        Distances in the unit of ``pixel_size``; the source must lie outside the image's circle.
    n_bins : int, optional
        Detector elements; default ⌈√2·max(H, W)⌉.
    detector_spacing : float, optional
        Δγ in radians (equiangular) or Δu in ``pixel_size`` units on the detector (flat).  The
        default spreads the bins over the fan that just covers the image's circumscribed circle.
    detector : {"equiangular", "flat"}
    view_mask : array-like of bool, optional
        Measured views within ``angles_rad``.
    pixel_size : float
        Size of one pixel in the distance unit.
    detector_offset : float
        Centre-of-rotation offset: the element, from the middle ``(n_bins − 1) / 2``, that the
        ray through the rotation centre meets.
    flip_detector : bool
        Elements run against the detector axis ``u = (cos β, −sin β)``.
    center : (row, col), optional
        Rotation centre in pixels; default ``(H // 2, W // 2)``.
    backend : {"auto", "sparse", "matrix-free"}
        ``auto``: the sparse matrix while it fits ``matrix_budget``, else matrix-free.
    matrix_budget : int, optional
        Bytes the sparse matrices may take (:func:`default_matrix_budget`).

    Notes
    -----
    :meth:`fbp` is the fan-beam FBP of Kak & Slaney (§3.4): cosine (or D/√(D²+s²))
    pre-weighting, a (γ/sin γ)²-corrected ramp for the equiangular detector, and back-projection
    with 1/L² (equiangular) or 1/U² (flat) weights.  A full 2π scan weights every view equally;
    a short scan (π + fan angle up to 2π) gets Parker weights; a shorter scan is limited-angle
    and normalised to the range it covers (:func:`medrecon.operators.fbp.angular_weights`).
    """

    period = 2 * math.pi
    _middle = staticmethod(lambda n: (n - 1) / 2)

    def __init__(
        self,
        image_size: int | tuple[int, int],
        angles_rad=None,
        *,
        source_to_isocenter: float,
        source_to_detector: float,
        n_bins: int | None = None,
        detector_spacing: float | None = None,
        detector: str = "equiangular",
        view_mask=None,
        pixel_size: float = 1.0,
        detector_offset: float = 0.0,
        flip_detector: bool = False,
        center: tuple[float, float] | None = None,
        backend: str = "auto",
        matrix_budget: int | None = None,
    ):
        shape = _image_shape(image_size)
        who = "FanBeamCT"
        if detector not in ("equiangular", "flat"):
            raise SettingsError(f"{who}: detector must be 'equiangular' or 'flat', got {detector!r}")
        if backend not in FAN_BACKENDS:
            raise SettingsError(f"{who}: backend must be one of {', '.join(FAN_BACKENDS)}; got {backend!r}")
        if not pixel_size > 0:
            raise SettingsError(f"{who}: pixel_size must be positive, got {pixel_size}")
        d_so = float(source_to_isocenter) / pixel_size
        d_sd = float(source_to_detector) / pixel_size
        radius = 0.5 * math.hypot(*shape) + 1
        if not d_so > radius:
            raise SettingsError(
                f"{who}: source_to_isocenter must exceed the image's half-diagonal "
                f"({radius * pixel_size:.4g}), got {source_to_isocenter}"
            )
        if not d_sd > d_so:
            raise SettingsError(
                f"{who}: source_to_detector ({source_to_detector}) must exceed source_to_isocenter ({source_to_isocenter})"
            )
        if angles_rad is None:
            angles_rad = np.arange(360) * (2 * math.pi / 360)
        angles = _check_angles(
            angles_rad.cpu().numpy() if isinstance(angles_rad, Tensor) else angles_rad, 2 * math.pi, who
        )
        mask = _check_mask(view_mask, angles.size, who)
        n_bins = int(math.ceil(math.sqrt(2) * max(shape))) if n_bins is None else int(n_bins)
        half_fan = math.asin(radius / d_so)
        if detector_spacing is None:
            if detector == "equiangular":
                detector_spacing = 2 * half_fan / (n_bins - 1)
            else:
                detector_spacing = 2 * d_sd * math.tan(half_fan) / (n_bins - 1) * pixel_size
        if not detector_spacing > 0 or n_bins < 2:
            raise SettingsError(f"{who}: need n_bins ≥ 2 and a positive detector_spacing")
        self.d_so, self.d_sd, self.detector = d_so, d_sd, detector
        # spacing in radians, or in pixels on the physical detector
        self.detector_spacing = float(detector_spacing) / (1.0 if detector == "equiangular" else pixel_size)
        self.pixel_size = pixel_size
        super().__init__(shape, angles, mask, n_bins, who, center=center, detector_offset=detector_offset,
                         flip_detector=flip_detector, backend=backend, matrix_budget=matrix_budget)

    def _geometry_key(self) -> dict:
        return {
            "kind": f"fan-{self.detector}",
            "shape": list(self.image_shape),
            "bins": self.n_bins,
            "spacing": self.detector_spacing,
            "dso": self.d_so,
            "dsd": self.d_sd,
            "center": list(self.center),
            "offset": self.detector_offset,
            "flip": self.flip_detector,
        }

    def _geometry_kwargs(self) -> dict:
        # distances and the flat spacing are already in pixels (pixel_size 1)
        return {"source_to_isocenter": self.d_so, "source_to_detector": self.d_sd, "n_bins": self.n_bins,
                "detector": self.detector, "detector_spacing": self.detector_spacing,
                "detector_offset": self.detector_offset, "flip_detector": self.flip_detector,
                "center": self.center, "backend": self.backend, "matrix_budget": self.matrix_budget}

    def _element_offsets(self) -> np.ndarray:
        """Signed fan angle (equiangular, radians) or position along ``u`` (flat, pixels) of
        each element."""
        return self._positions() * self.detector_spacing

    def _fan_angles(self) -> np.ndarray:
        off = self._element_offsets()
        return off if self.detector == "equiangular" else np.arctan2(off, self.d_sd)

    def _rays(self, angles):
        cy, cx = self.center
        reach = self._reach()
        sin, cos = np.sin(angles)[:, None], np.cos(angles)[:, None]
        d0 = (sin, cos)
        e = (cos, -sin)
        off = self._element_offsets()[None, :]
        if self.detector == "equiangular":
            dx = np.cos(off) * d0[0] + np.sin(off) * e[0]
            dy = np.cos(off) * d0[1] + np.sin(off) * e[1]
        else:
            dx = self.d_sd * d0[0] + off * e[0]
            dy = self.d_sd * d0[1] + off * e[1]
            norm = np.hypot(dx, dy)
            dx, dy = dx / norm, dy / norm
        sx = np.broadcast_to(cx - self.d_so * d0[0], dx.shape)
        sy = np.broadcast_to(cy - self.d_so * d0[1], dx.shape)
        t = np.arange(max(0, math.floor(self.d_so - reach)), math.ceil(self.d_so + reach) + 1, dtype=np.float64)
        return np.stack([sx, sy], -1), np.stack([dx, dy], -1), t

    def _filter_and_weight(self, y: Tensor, filter_name: str) -> Tensor:
        n_pad = max(64, int(2 ** math.ceil(math.log2(2 * self.n_bins))))
        k = np.fft.fftfreq(n_pad) * n_pad
        odd = (np.abs(k) % 2) == 1
        kernel = np.zeros(n_pad)
        off = torch.as_tensor(self._element_offsets(), dtype=y.dtype, device=y.device)
        if self.detector == "equiangular":
            a = self.detector_spacing
            kernel[0] = 1 / (8 * a * a)
            kernel[odd] = -1 / (2 * np.pi**2 * np.sin(k[odd] * a) ** 2)
            pre = self.d_so * torch.cos(off)
            scale = a
        else:
            a = self.detector_spacing * self.d_so / self.d_sd  # virtual detector at the isocentre
            s = off * (self.d_so / self.d_sd)
            kernel[0] = 1 / (8 * a * a)
            kernel[odd] = -1 / (2 * np.pi**2 * (k[odd] * a) ** 2)
            pre = self.d_so / torch.sqrt(self.d_so**2 + s**2)
            scale = a
        return self._apply_filter(y * pre, fbp_filter(self.n_bins, filter_name, kernel), scale)

    def _pixel_detector_coords(self, angles, xx, yy):
        sin, cos = torch.sin(angles)[:, None, None], torch.cos(angles)[:, None, None]
        along = self.d_so + sin * xx + cos * yy  # distance from the source along the central ray
        across = cos * xx - sin * yy
        if self.detector == "equiangular":
            gamma = torch.atan2(across, along)
            pos = self._bin_of(gamma / self.detector_spacing)
            wt = 1.0 / (along**2 + across**2)
        else:
            u = self.d_sd * across / along
            pos = self._bin_of(u / self.detector_spacing)
            wt = (self.d_so / along) ** 2
        return pos, wt

    def _backprojection_grid(self, angles):
        # (across, along) are affine in the pixel's position: one affine_grid call, then in place
        cos, sin = torch.cos(angles), torch.sin(angles)
        zero = torch.zeros_like(cos)
        grid = self._affine_grid(torch.stack([torch.stack([cos, -sin, zero], -1),
                                              torch.stack([sin, cos, zero + self.d_so], -1)], 1))
        across, along = grid[..., 0], grid[..., 1]
        k = (-2.0 if self.flip_detector else 2.0) / (self.detector_spacing * (self.n_bins - 1))
        c = 2.0 * (self._middle(self.n_bins) + self.detector_offset) / (self.n_bins - 1) - 1.0
        if self.detector == "equiangular":
            wt = (across.square() + along.square()).reciprocal_()
            across.copy_(torch.atan2(across, along).mul_(k).add_(c))
        else:
            wt = along.reciprocal()
            across.mul_(wt).mul_(k * self.d_sd).add_(c)
            wt.mul_(self.d_so).square_()
        along.zero_()
        return grid, wt
