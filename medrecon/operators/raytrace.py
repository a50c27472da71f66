"""The CT projection model, stored as a sparse matrix or applied matrix-free in torch.

One model, two ways to apply it:

* **Ray-driven projection** (A and its exact adjoint Aᵀ).  Every ray ``r`` is sampled at the
  points ``origin_r + t·direction_r`` for the positions ``t`` (unit steps, pixel units); the
  image is interpolated bilinearly at each point (zero outside the image) and the samples are
  summed, each standing for ``step`` pixels of path.  :func:`ray_matrix` stores this as a SciPy
  CSR matrix; :func:`project_rays` and :func:`backproject_rays` apply it without storing it,
  with ``torch.nn.functional.grid_sample`` and its exact transpose, chunk by chunk of views,
  skipping the samples where no ray meets the image.  The two agree to rounding.
* **Pixel-driven back-projection** (FBP).  Every pixel is projected onto the detector of every
  view, the filtered view is interpolated linearly there and multiplied by a weight (1 for
  parallel beam, a distance weight for fan beam).  :func:`backproject_pixels` applies it
  matrix-free; ``CTProjector.backprojector`` stores the same sums as a matrix.

Pixel coordinates are ``(x, y) = (column, row)``; image pixel ``(row, col)`` is at
``(col, row)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import Tensor

__all__ = ["ray_matrix", "ray_box_span", "ray_plan", "project_rays", "backproject_rays", "backproject_pixels",
           "CHUNK_BYTES"]

#: working memory of one chunk of views in the matrix-free functions (grids and samples): small
#: enough to stay in the cache (32 MiB of L3 here), which made them 3–5× faster than 96 MiB chunks
CHUNK_BYTES = 8 * 2**20


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


def ray_box_span(image_shape: tuple[int, int], origins: np.ndarray, directions: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Where each ray runs through the open box ``(−1, W) × (−1, H)``, outside which bilinear
    interpolation of the image is zero: ``(t_enter, t_exit)``, with ``t_enter > t_exit`` for a
    ray that misses it.

    Parameters
    ----------
    origins, directions : ndarray, shape (..., 2)
        Points and directions in ``(x, y)`` pixel coordinates.

    Returns
    -------
    (ndarray, ndarray)
        Shape ``(...)`` each.

    Examples
    --------
    >>> ray_box_span((4, 4), np.array([[1.5, -10.0]]), np.array([[0.0, 1.0]]))
    (array([9.]), array([14.]))
    """
    h, w = image_shape
    lo = np.full(origins.shape[:-1], -np.inf)
    hi = np.full(origins.shape[:-1], np.inf)
    for axis, size in ((0, w), (1, h)):
        o, d = origins[..., axis], directions[..., axis]
        with np.errstate(divide="ignore", invalid="ignore"):
            a = (-1.0 - o) / d
            b = (size - o) / d
        parallel = d == 0
        inside = (o > -1.0) & (o < size)
        t0 = np.where(parallel, np.where(inside, -np.inf, np.inf), np.minimum(a, b))
        t1 = np.where(parallel, np.where(inside, np.inf, -np.inf), np.maximum(a, b))
        lo, hi = np.maximum(lo, t0), np.minimum(hi, t1)
    return lo, hi


def _normalised(image_shape: tuple[int, int], origins: np.ndarray, directions: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Origins and directions in grid_sample's coordinates (align_corners=True: pixel 0 ↔ −1)."""
    h, w = image_shape
    scale = np.array([2.0 / (w - 1), 2.0 / (h - 1)])
    return origins * scale - 1.0, directions * scale


class _Plan:
    """The chunks of views of a ray set, each with the samples and bins that can meet the image."""

    def __init__(self, image_shape, origins, directions, t, per_sample_bytes: int):
        v, n_bins = origins.shape[:2]
        self.shape = image_shape
        self.n_views, self.n_bins = v, n_bins
        enter, leave = ray_box_span(image_shape, origins, directions)
        hit = enter < leave
        per_view = max(1, t.size * n_bins * per_sample_bytes)
        # at least one view per thread: grid_sample's backward (Aᵀ) runs in parallel over views only
        size = max(torch.get_num_threads(), CHUNK_BYTES // per_view)
        o_n, d_n = _normalised(image_shape, origins, directions)
        self.chunks = []
        for v0 in range(0, v, size):
            v1 = min(v, v0 + size)
            h = hit[v0:v1]
            if not h.any():
                continue
            bins = np.flatnonzero(h.any(axis=0))
            b0, b1 = int(bins[0]), int(bins[-1]) + 1
            k = np.flatnonzero((t >= enter[v0:v1][h].min()) & (t <= leave[v0:v1][h].max()))
            if k.size == 0:
                continue
            self.chunks.append((v0, v1, b0, b1, t[k[0] : k[-1] + 1], o_n[v0:v1, b0:b1], d_n[v0:v1, b0:b1]))

    def grids(self, like: Tensor):
        """Per chunk: (v0, v1, b0, b1, grid (V_c, S_c, B_c, 2)) in ``like``'s dtype and device."""
        for v0, v1, b0, b1, t, o, d in self.chunks:
            o_t = torch.as_tensor(o, dtype=like.dtype, device=like.device)[:, None]
            d_t = torch.as_tensor(d, dtype=like.dtype, device=like.device)[:, None]
            t_t = torch.as_tensor(t, dtype=like.dtype, device=like.device)[None, :, None, None]
            yield v0, v1, b0, b1, torch.addcmul(o_t, t_t, d_t)


def _project(x: Tensor, plan: _Plan, step: float) -> Tensor:
    b, c, h, w = x.shape
    flat = x.reshape(1, b * c, h, w)
    y = x.new_zeros(b * c, plan.n_views, plan.n_bins)
    for v0, v1, b0, b1, grid in plan.grids(x):
        samples = F.grid_sample(flat.expand(v1 - v0, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=True)  # (V_c, B·C, S_c, B_c)
        y[:, v0:v1, b0:b1] = samples.sum(2).transpose(0, 1) * step
    return y.reshape(b, c, plan.n_views, plan.n_bins)


def _backproject(y: Tensor, plan: _Plan, step: float) -> Tensor:
    b, c = y.shape[:2]
    h, w = plan.shape
    flat = y.reshape(b * c, plan.n_views, plan.n_bins).transpose(0, 1)  # (V, B·C, bins)
    like = y.new_zeros(1, b * c, h, w)
    x = y.new_zeros(b * c, h, w)
    for v0, v1, b0, b1, grid in plan.grids(y):
        go = (flat[v0:v1, :, None, b0:b1] * step).expand(-1, -1, grid.shape[1], -1)
        gi, _ = torch.ops.aten.grid_sampler_2d_backward(
            go, like.expand(v1 - v0, -1, -1, -1), grid, 0, 0, True, [True, False])
        x += gi.sum(0)
    return x.reshape(b, c, h, w)


class _RayOperator(torch.autograd.Function):
    """Projection (or back-projection) whose gradient is the other one."""

    @staticmethod
    def forward(ctx, z: Tensor, plan: _Plan, step: float, transpose: bool) -> Tensor:  # type: ignore[override]
        ctx.plan, ctx.step, ctx.transpose = plan, step, transpose
        return _backproject(z, plan, step) if transpose else _project(z, plan, step)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return _RayOperator.apply(g.contiguous(), ctx.plan, ctx.step, not ctx.transpose), None, None, None


def ray_plan(image_shape: tuple[int, int], origins: np.ndarray, directions: np.ndarray, t: np.ndarray,
             channels: int = 1) -> _Plan:
    """Chunk the views of a ray set for :func:`project_rays` / :func:`backproject_rays`.

    Parameters
    ----------
    image_shape : (H, W)
        At least 2 × 2.
    origins, directions : ndarray, shape (V, n_bins, 2)
        Per view and bin, a point and a unit direction in ``(x, y)`` pixel coordinates.
    t : ndarray, shape (S,)
        Sample positions along every ray.
    channels : int
        Images projected together (slices × channels); sizes the chunks.
    """
    if min(image_shape) < 2:
        raise ValueError(f"matrix-free projection needs an image of at least 2×2 pixels, got {image_shape}")
    return _Plan(image_shape, origins, directions, np.asarray(t, dtype=np.float64), 8 + 8 * max(1, channels))


def project_rays(x: Tensor, plan: _Plan, step: float = 1.0) -> Tensor:
    """Line integrals of images along the rays of ``plan`` (:func:`ray_plan`), matrix-free.

    Parameters
    ----------
    x : Tensor, shape (B, C, H, W), real
    plan : from :func:`ray_plan`
    step : float
        Path length of one sample (pixels).

    Returns
    -------
    Tensor, shape (B, C, V, n_bins)
        The same numbers as ``ray_matrix(...) @ x`` (to rounding); differentiable.
    """
    return _RayOperator.apply(x, plan, step, False)


def backproject_rays(y: Tensor, plan: _Plan, step: float = 1.0) -> Tensor:
    """The exact adjoint of :func:`project_rays`: ``(B, C, V, n_bins) -> (B, C, H, W)``."""
    return _RayOperator.apply(y, plan, step, True)


def backproject_pixels(
    q: Tensor,
    grids: Callable[[slice], tuple[Tensor, Tensor | None]],
    image_shape: tuple[int, int],
) -> Tensor:
    """Pixel-driven back-projection, matrix-free: ``Σ_v wt_v(p) · q_v(pos_v(p))``.

    Parameters
    ----------
    q : Tensor, shape (B, C, V, n_bins)
        Filtered, weighted views.
    grids : callable
        ``grids(views)`` for a slice of the views gives the ``grid_sample`` grid of every pixel
        in those views, shape (V_c, H, W, 2): its detector position as ``2·bin/(n_bins − 1) − 1``
        in the first channel, 0 in the second; and its weight, shape (V_c, H, W) (or None for 1);
        in ``q``'s dtype and device.  Linear interpolation between bins, zero outside.
    image_shape : (H, W)

    Returns
    -------
    Tensor, shape (B, C, H, W)
    """
    b, c, n_views, n_bins = q.shape
    if n_bins < 2:
        raise ValueError(f"matrix-free back-projection needs at least 2 detector bins, got {n_bins}")
    h, w = image_shape
    rows = q.reshape(b * c, n_views, 1, n_bins).transpose(0, 1)  # (V, B·C, 1, bins)
    x = q.new_zeros(b * c, h, w)
    size = max(1, CHUNK_BYTES // (h * w * (16 + 4 * b * c)))
    for v0 in range(0, n_views, size):
        views = slice(v0, min(n_views, v0 + size))
        grid, wt = grids(views)
        vals = F.grid_sample(rows[views], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        if wt is not None:
            vals = vals * wt[:, None]
        x += vals[0] if vals.shape[0] == 1 else vals.sum(0)
    return x.reshape(b, c, h, w)
