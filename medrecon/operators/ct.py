"""X-ray CT: parallel- and fan-beam projection with exact adjoints, and filtered back-projection.

Conventions (docs/conventions.md)
---------------------------------
* Images are ``(B, C, H, W)``, real, in any unit; a volume is slices on the batch axis.
* Pixel coordinates: ``x`` = column index, ``y`` = row index; the rotation centre is the pixel
  ``(H // 2, W // 2)`` (as in ``skimage.transform.radon``).
* Sinograms are ``(B, C, views, bins)``: line integrals of the image per pixel of path length.
* Parallel beam, view angle θ (radians, on ``[0, π)``): the ray direction is ``(sin θ, cos θ)`` and
  the detector axis ``(cos θ, −sin θ)`` in ``(x, y)``; bin ``b`` sits at
  ``s = (b − n_bins // 2) · spacing``.  With the defaults (⌈√2·max(H, W)⌉ bins, unit spacing) the
  projector reproduces ``skimage.transform.radon(image, np.rad2deg(angles), circle=False).T``
  to floating-point precision: each ray is sampled at unit steps with bilinear interpolation.
* Fan beam, source angle β (radians, on ``[0, 2π)``): the source sits at ``centre − D·(sin β, cos β)``
  and the central ray points at the centre; element ``k`` of ``n`` is at fan angle
  ``γ = (k − (n−1)/2)·Δγ`` (equiangular, curved detector) or at ``u = (k − (n−1)/2)·Δu`` on a flat
  detector at distance ``source_to_detector`` from the source.  Distances are in the unit of
  ``pixel_size`` (e.g. mm) and converted to pixels.

The projectors are precomputed sparse matrices (:mod:`medrecon.operators.sparse`); the adjoint is
their exact transpose.  FBP filters the sinogram and back-projects pixel by pixel with linear
interpolation (and the 1/L² or 1/U² distance weights for fan beam).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from medrecon.errors import SettingsError, ShapeError
from medrecon.operators.base import SamplingOperator
from medrecon.operators.sparse import SparseMatrix, cached_matrix
from medrecon.operators.torch_radon_backend import BACKENDS, use_torch_radon

__all__ = [
    "ParallelBeamCT",
    "FanBeamCT",
    "FBP_FILTERS",
    "fbp_filter",
    "view_weights",
    "ray_matrix",
    "projector_nnz",
    "projector_memory_bytes",
]

FBP_FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")


# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------
def ray_matrix(
    image_shape: tuple[int, int],
    origins: np.ndarray,
    directions: np.ndarray,
    t: np.ndarray,
    step: float = 1.0,
    chunk_samples: int = 4_000_000,
) -> sp.csr_matrix:
    """System matrix of rays sampled at points ``origin + t·direction`` with bilinear interpolation.

    Parameters
    ----------
    image_shape : (H, W)
        Image size; pixel ``(row y, column x)`` has index ``y·W + x``.
    origins, directions : ndarray, shape (R, 2)
        Per ray, a point and a unit direction in ``(x, y)`` pixel coordinates.
    t : ndarray, shape (S,)
        Positions along every ray at which the image is sampled.
    step : float
        Path length each sample stands for (pixels).

    Returns
    -------
    scipy.sparse.csr_matrix, shape (R, H·W), float32
        Row ``r`` holds the weights whose dot product with the flattened image is the line
        integral along ray ``r``.
    """
    h, w = image_shape
    n_rays = origins.shape[0]
    per = max(1, chunk_samples // max(1, t.size))
    blocks = []
    for start in range(0, n_rays, per):
        o = origins[start : start + per]
        d = directions[start : start + per]
        x = o[:, :1] + d[:, :1] * t[None, :]
        y = o[:, 1:] + d[:, 1:] * t[None, :]
        x0 = np.floor(x)
        y0 = np.floor(y)
        fx = x - x0
        fy = y - y0
        x0 = x0.astype(np.int64)
        y0 = y0.astype(np.int64)
        ray = np.broadcast_to(np.arange(o.shape[0])[:, None], x.shape)
        rows, cols, vals = [], [], []
        for dx, dy, wt in (
            (0, 0, (1 - fx) * (1 - fy)),
            (1, 0, fx * (1 - fy)),
            (0, 1, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            xi = x0 + dx
            yi = y0 + dy
            keep = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h) & (wt > 0)
            rows.append(ray[keep])
            cols.append(yi[keep] * w + xi[keep])
            vals.append(wt[keep] * step)
        block = sp.coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(o.shape[0], h * w),
        ).tocsr()
        block.sum_duplicates()
        blocks.append(block)
    m = sp.vstack(blocks, format="csr")
    m.indices = m.indices.astype(np.int32)
    m.indptr = m.indptr.astype(np.int32)
    return m.astype(np.float32)


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


def fbp_filter(n_bins: int, name: str = "ramp", kernel: np.ndarray | None = None) -> np.ndarray:
    """Frequency response of an FBP filter, zero-padded length ``max(64, 2^⌈log2(2·n_bins)⌉)``.

    The ramp is the Fourier transform of the band-limited spatial ramp sampled at unit
    spacing (h(0) = 1/4, h(n) = −1/(π n)² for odd n, 0 for even n; Kak & Slaney §3.3), which
    avoids the DC bias of a sampled |ω|.  The other filters multiply it by a window:
    Shepp–Logan sinc(ω/2π), cosine, Hamming and Hann.

    Parameters
    ----------
    n_bins : int
        Detector bins per view.
    name : {"ramp", "shepp-logan", "cosine", "hamming", "hann"}
    kernel : ndarray, optional
        A spatial kernel of the padded length to use instead of the ramp (fan-beam FBP).

    Returns
    -------
    ndarray, shape (n_pad,), float64
    """
    if name not in FBP_FILTERS:
        raise SettingsError(f"fbp_filter(): unknown filter {name!r}; known: {', '.join(FBP_FILTERS)}")
    n_pad = max(64, int(2 ** math.ceil(math.log2(2 * n_bins))))
    if kernel is None:
        k = np.fft.fftfreq(n_pad) * n_pad  # signed integer offsets
        kernel = np.zeros(n_pad)
        kernel[0] = 0.25
        odd = (np.abs(k) % 2) == 1
        kernel[odd] = -1.0 / (np.pi * k[odd]) ** 2
    resp = np.real(np.fft.fft(kernel))
    omega = 2 * np.pi * np.fft.fftfreq(n_pad)  # [-π, π)
    if name == "shepp-logan":
        with np.errstate(invalid="ignore", divide="ignore"):
            win = np.where(omega == 0, 1.0, np.sin(omega / 2) / (omega / 2))
    elif name == "cosine":
        win = np.cos(omega / 2)
    elif name == "hamming":
        win = 0.54 + 0.46 * np.cos(omega)
    elif name == "hann":
        win = 0.5 + 0.5 * np.cos(omega)
    else:
        win = np.ones(n_pad)
    return resp * win


def view_weights(angles_rad: np.ndarray, period: float) -> np.ndarray:
    """Angular quadrature weight of each view for back-projection.

    Each view gets half the gap to each angular neighbour on a circle of ``period``; gaps wider
    than the median gap (the missing wedge of a limited-angle scan) are capped at the median so
    that no view stands in for angles that were never measured.  Equally spaced views over the
    full period all get ``period / n``.
    """
    a = np.mod(np.asarray(angles_rad, dtype=np.float64), period)
    if a.size == 1:
        return np.array([period / 2])
    order = np.argsort(a)
    s = a[order]
    gaps = np.diff(np.concatenate([s, s[:1] + period]))
    cap = np.median(gaps)
    gaps = np.minimum(gaps, cap)
    w_sorted = 0.5 * (gaps + np.roll(gaps, 1))
    w = np.empty_like(w_sorted)
    w[order] = w_sorted
    return w


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


# --------------------------------------------------------------------------------------------
# shared machinery of the two geometries
# --------------------------------------------------------------------------------------------
class _Projector(SamplingOperator):
    """A CT geometry over a full angle set, measured on a subset of views (the mask Λ)."""

    period: float

    def __init__(self, image_shape, angles, view_mask, n_bins, who):
        self.image_shape = image_shape
        self.full_angles = angles
        self.view_mask_np = view_mask
        self.angles = angles[view_mask]
        self.n_bins = n_bins
        self.mask = torch.from_numpy(view_mask)
        super().__init__(
            (None, *image_shape), (None, int(view_mask.sum()), n_bins), name=who
        )
        self._matrix: SparseMatrix | None = None
        self._bp: SparseMatrix | None = None
        self._full: _Projector | None = None
        # per-view back-projection weights of the *full* set (T⁻¹), restricted to measured views
        self.full_weights = view_weights(angles, self.period)
        self.weights = view_weights(self.angles, self.period)

    # geometry-specific pieces
    def _rays(self, angles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _geometry_key(self) -> dict:
        raise NotImplementedError

    def _with_angles(self, angles: np.ndarray) -> _Projector:
        raise NotImplementedError

    def _filter_and_weight(self, y: Tensor, filter_name: str) -> Tensor:
        raise NotImplementedError

    def _pixel_detector_coords(self, angles: Tensor, xx: Tensor, yy: Tensor) -> tuple[Tensor, Tensor]:
        """Fractional bin index of every pixel in every view, and its back-projection weight."""
        raise NotImplementedError

    # the system matrix
    @property
    def matrix(self) -> SparseMatrix:
        if self._matrix is None:
            key = {**self._geometry_key(), "angles": self.angles.round(12).tolist()}

            def build() -> sp.csr_matrix:
                o, d, t = self._rays(self.angles)
                return ray_matrix(self.image_shape, o, d, t)

            m = cached_matrix(key, build)
            mt = cached_matrix({**key, "transpose": True}, lambda: m.T.tocsr())
            self._matrix = SparseMatrix(m, mt)
        return self._matrix

    @property
    def backprojector(self) -> SparseMatrix:
        """Pixel-driven FBP back-projection matrix ``(H·W, views·bins)`` (linear interpolation
        between bins, times the geometry's distance weight), built once and disk-cached."""
        if self._bp is None:
            key = {**self._geometry_key(), "angles": self.angles.round(12).tolist()}
            key["kind"] = key["kind"] + "-fbp"
            self._bp = SparseMatrix(cached_matrix(key, self._build_backprojector))
        return self._bp

    def _build_backprojector(self) -> sp.csr_matrix:
        h, w = self.image_shape
        yy, xx = torch.meshgrid(
            torch.arange(h, dtype=torch.float64) - h // 2,
            torch.arange(w, dtype=torch.float64) - w // 2,
            indexing="ij",
        )
        angles = torch.as_tensor(self.angles, dtype=torch.float64)
        pixels = np.arange(h * w)
        blocks = []
        for v in range(len(self.angles)):
            pos, wt = self._pixel_detector_coords(angles[v : v + 1], xx, yy)
            pos, wt = pos.reshape(-1).numpy(), wt.reshape(-1).numpy()
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

    backend = "sparse"

    def _forward(self, x: Tensor) -> Tensor:
        radon = use_torch_radon(self, x)
        if radon is not None:
            return radon.forward(x)
        b, c = x.shape[:2]
        y = self.matrix.apply(x.reshape(b, c, -1))
        return y.reshape(b, c, len(self.angles), self.n_bins)

    def _adjoint(self, y: Tensor) -> Tensor:
        radon = use_torch_radon(self, y)
        if radon is not None:
            return radon.backprojection(y)
        b, c = y.shape[:2]
        x = self.matrix.apply(y.reshape(b, c, -1), transpose=True)
        return x.reshape(b, c, *self.image_shape)

    # the decomposition A = P Λ T
    @property
    def T(self) -> _Projector:  # noqa: N802
        """The projector over the full angle set."""
        if self.view_mask_np.all():
            return self
        if self._full is None:
            self._full = self._with_angles(self.full_angles)
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
        w = torch.as_tensor(self.full_weights[self.view_mask_np])
        return self._fbp(r, "ramp", w)

    # filtered back-projection
    def fbp(self, y: Tensor, filter_name: str = "ramp") -> Tensor:
        """Filtered back-projection of a measured sinogram.

        Parameters
        ----------
        y : Tensor, shape (B, C, views, bins), real
        filter_name : {"ramp", "shepp-logan", "cosine", "hamming", "hann"}

        Returns
        -------
        Tensor, shape (B, C, H, W)
            The image, in the units of the image the sinogram was projected from.
        """
        y = self._check(y, self.out_shape, False, "fbp")
        return self._fbp(y, filter_name, torch.as_tensor(self.weights))

    def _fbp(self, y: Tensor, filter_name: str, weights: Tensor) -> Tensor:
        q = self._filter_and_weight(y, filter_name)
        return self._backproject_pixels(q, weights.to(device=y.device, dtype=y.dtype))

    def _apply_filter(self, y: Tensor, response: np.ndarray, scale: float) -> Tensor:
        n_pad = response.shape[0]
        resp = torch.as_tensor(response * scale, dtype=y.dtype, device=y.device)
        spec = torch.fft.rfft(y, n=n_pad, dim=-1) * resp[: n_pad // 2 + 1]
        return torch.fft.irfft(spec, n=n_pad, dim=-1)[..., : self.n_bins]

    def _backproject_pixels(self, q: Tensor, weights: Tensor) -> Tensor:
        """Pixel-driven back-projection of filtered views ``q``, each view weighted."""
        b, c, n_views, n_bins = q.shape
        qw = (q * weights[:, None]).reshape(b, c, n_views * n_bins)
        return self.backprojector.apply(qw).reshape(b, c, *self.image_shape)


# --------------------------------------------------------------------------------------------
# parallel beam
# --------------------------------------------------------------------------------------------
class ParallelBeamCT(_Projector):
    """2D parallel-beam projection ``(B, C, H, W) -> (B, C, views, bins)``.

    Parameters
    ----------
    image_size : int or (H, W)
    angles_rad : array-like, shape (n,), optional
        The full angle set T projects over, radians on ``[0, π)``.  Default: 180 equally
        spaced views.
    view_mask : array-like of bool, shape (n,), optional
        The measured views Λ (default: all); A projects only these.
    n_bins : int, optional
        Detector bins; default ⌈√2·max(H, W)⌉ (scikit-image ``circle=False``).
    detector_spacing : float
        Bin width in pixels.
    backend : {"auto", "sparse", "torch-radon"}
        ``auto`` uses torch-radon for CUDA tensors when it is installed and passes a geometry
        check against the sparse projector (:mod:`medrecon.operators.torch_radon_backend`),
        and the sparse matrix otherwise.

    Examples
    --------
    >>> import torch
    >>> from medrecon.operators import ParallelBeamCT
    >>> A = ParallelBeamCT.sparse_view(64, n_views=8)
    >>> A(torch.ones(1, 1, 64, 64)).shape
    torch.Size([1, 1, 8, 91])
    """

    period = math.pi

    def __init__(
        self,
        image_size: int | tuple[int, int],
        angles_rad=None,
        *,
        view_mask=None,
        n_bins: int | None = None,
        detector_spacing: float = 1.0,
        backend: str = "auto",
    ):
        shape = _image_shape(image_size)
        who = "ParallelBeamCT"
        if backend not in BACKENDS:
            raise SettingsError(f"{who}: backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self.backend = backend
        if angles_rad is None:
            angles_rad = np.arange(180) * (math.pi / 180)
        angles = _check_angles(
            angles_rad.cpu().numpy() if isinstance(angles_rad, Tensor) else angles_rad, math.pi, who
        )
        mask = _check_mask(view_mask, angles.size, who)
        n_bins = int(math.ceil(math.sqrt(2) * max(shape))) if n_bins is None else int(n_bins)
        if n_bins < 1 or not detector_spacing > 0:
            raise SettingsError(f"{who}: n_bins and detector_spacing must be positive, got {n_bins}, {detector_spacing}")
        self.detector_spacing = float(detector_spacing)
        super().__init__(shape, angles, mask, n_bins, who)

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
        }

    def _with_angles(self, angles: np.ndarray) -> ParallelBeamCT:
        return ParallelBeamCT(
            self.image_shape, angles, n_bins=self.n_bins, detector_spacing=self.detector_spacing,
            backend=self.backend,
        )

    def _rays(self, angles):
        h, w = self.image_shape
        n_samples = int(math.ceil(math.sqrt(2) * max(h, w)))
        n_samples = max(n_samples, int(math.ceil(self.n_bins * self.detector_spacing)))
        t = np.arange(n_samples, dtype=np.float64) - n_samples // 2
        s = (np.arange(self.n_bins) - self.n_bins // 2) * self.detector_spacing
        cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
        ox = w // 2 + cos * s[None, :]
        oy = h // 2 - sin * s[None, :]
        dx = np.broadcast_to(sin, ox.shape)
        dy = np.broadcast_to(cos, ox.shape)
        origins = np.stack([ox.ravel(), oy.ravel()], axis=1)
        dirs = np.stack([dx.ravel(), dy.ravel()], axis=1)
        return origins, dirs, t

    def _filter_and_weight(self, y: Tensor, filter_name: str) -> Tensor:
        return self._apply_filter(y, fbp_filter(self.n_bins, filter_name), 1.0 / self.detector_spacing)

    def _pixel_detector_coords(self, angles, xx, yy):
        s = torch.cos(angles)[:, None, None] * xx - torch.sin(angles)[:, None, None] * yy
        pos = s / self.detector_spacing + self.n_bins // 2
        return pos, torch.ones_like(pos)


# --------------------------------------------------------------------------------------------
# fan beam
# --------------------------------------------------------------------------------------------
class FanBeamCT(_Projector):
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

    Notes
    -----
    :meth:`fbp` is the fan-beam FBP of Kak & Slaney (§3.4) for a full 2π scan: cosine (or
    D/√(D²+s²)) pre-weighting, a (γ/sin γ)²-corrected ramp for the equiangular detector, and
    back-projection with 1/L² (equiangular) or 1/U² (flat) weights.  Short scans need Parker
    weights, which are not implemented: FBP of a short scan is approximate.
    """

    period = 2 * math.pi

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
    ):
        shape = _image_shape(image_size)
        who = "FanBeamCT"
        if detector not in ("equiangular", "flat"):
            raise SettingsError(f"{who}: detector must be 'equiangular' or 'flat', got {detector!r}")
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
        super().__init__(shape, angles, mask, n_bins, who)

    def _geometry_key(self) -> dict:
        return {
            "kind": f"fan-{self.detector}",
            "shape": list(self.image_shape),
            "bins": self.n_bins,
            "spacing": self.detector_spacing,
            "dso": self.d_so,
            "dsd": self.d_sd,
        }

    def _with_angles(self, angles):
        return FanBeamCT(
            self.image_shape, angles, source_to_isocenter=self.d_so, source_to_detector=self.d_sd,
            n_bins=self.n_bins, detector=self.detector, detector_spacing=self.detector_spacing,
        )  # distances and the flat spacing are already in pixels (pixel_size 1)

    def _element_offsets(self) -> np.ndarray:
        return (np.arange(self.n_bins) - (self.n_bins - 1) / 2) * self.detector_spacing

    def _rays(self, angles):
        h, w = self.image_shape
        cx, cy = w // 2, h // 2
        radius = 0.5 * math.hypot(h, w) + 1
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
        t = np.arange(math.floor(self.d_so - radius), math.ceil(self.d_so + radius) + 1, dtype=np.float64)
        return np.stack([sx.ravel(), sy.ravel()], 1), np.stack([dx.ravel(), dy.ravel()], 1), t

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
            pos = gamma / self.detector_spacing + (self.n_bins - 1) / 2
            wt = 1.0 / (along**2 + across**2)
        else:
            u = self.d_sd * across / along
            pos = u / self.detector_spacing + (self.n_bins - 1) / 2
            wt = (self.d_so / along) ** 2
        return pos, wt
