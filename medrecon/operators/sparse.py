"""Precomputed sparse system matrices, applied with torch CSR (int32 indices) in both directions.

A projector is built once per geometry as a SciPy CSR matrix, cached on disk (content-addressed
by the geometry, written atomically) and turned into a pair of torch CSR tensors, ``M`` and its
precomputed transpose, on each device and dtype it is used with.  torch's CPU CSR product is
3–10× faster with int32 indices than with its default int64, and ``M.mT @ y`` without a stored
transpose is two orders of magnitude slower (ENVIRONMENT.md), hence both choices.

The disk cache (:func:`cache_dir`) holds at most :func:`cache_limit_bytes` (default 4 GiB,
``MEDRECON_CACHE_LIMIT_GB``): after each write the least recently used files are deleted until
it fits.  A matrix larger than the caller's budget or the limit is never stored, and the first
write into a new cache folder announces itself with a :class:`CacheNotice` warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from medrecon.errors import SettingsError

__all__ = ["SparseMatrix", "cache_dir", "cached_matrix", "cache_limit_bytes", "CacheNotice", "CACHE_LIMIT_ENV"]

_CACHE_VERSION = 2
#: environment variable with the cache's size limit in GiB (default 4)
CACHE_LIMIT_ENV = "MEDRECON_CACHE_LIMIT_GB"
_DEFAULT_LIMIT_GIB = 4.0


class CacheNotice(UserWarning):
    """medrecon starts writing system matrices to a disk cache (said once, when it creates it)."""


def cache_dir() -> Path | None:
    """Folder for cached system matrices: ``$MEDRECON_CACHE/operators`` or ``~/.cache/medrecon/operators``.

    Setting ``MEDRECON_CACHE`` to an empty string or ``off`` disables the disk cache.
    """
    root = os.environ.get("MEDRECON_CACHE")
    if root is not None and root.strip().lower() in ("", "off", "0", "none"):
        return None
    base = Path(root) if root else Path.home() / ".cache" / "medrecon"
    return base / "operators"


def env_gib(name: str, default_gib: float, example: str) -> int:
    """Bytes from the environment variable ``name`` in GiB (``default_gib`` when unset).

    Raises
    ------
    SettingsError
        The variable is not a number ≥ 0.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return int(default_gib * 2**30)
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not (gib >= 0 and math.isfinite(gib)):
        raise SettingsError(f"{name} must be a number of GiB ≥ 0 (e.g. {example}); got {text!r}")
    return int(gib * 2**30)


def cache_limit_bytes() -> int:
    """Largest total size of the operator cache: ``MEDRECON_CACHE_LIMIT_GB`` GiB, else 4 GiB
    (:func:`env_gib`)."""
    return env_gib(CACHE_LIMIT_ENV, _DEFAULT_LIMIT_GIB, "4 or 0.5")


def _nbytes(m: sp.csr_matrix) -> int:
    return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)


def _evict(folder: Path, limit: int, keep: Path) -> None:
    """Delete the least recently used cache files until the folder holds at most ``limit`` bytes."""
    entries = []
    for f in folder.glob("*.npz"):
        try:
            st = f.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    for _, size, f in sorted(entries):
        if total <= limit:
            break
        if f == keep:
            continue
        try:
            f.unlink()
            total -= size
        except OSError:
            pass


def _announce(folder: Path, limit: int) -> None:
    warnings.warn(
        f"medrecon: caching CT system matrices in {folder} (at most {limit / 2**30:.1g} GiB, least recently "
        f"used deleted first; {CACHE_LIMIT_ENV} sets the limit, MEDRECON_CACHE=off turns the cache off)",
        CacheNotice, stacklevel=3,
    )


def cached_matrix(key: dict, build: Callable[[], sp.csr_matrix], *, budget: int | None = None) -> sp.csr_matrix:
    """Return the CSR matrix for ``key``, from the disk cache or by calling ``build``.

    The cache file name is the sha256 of the JSON-encoded key; files are written to a temporary
    name and renamed, so concurrent processes never read a half-written matrix.  A file read is
    marked as used (its time stamp), so eviction deletes the least recently used first.  An
    unreadable cache entry is rebuilt; an unwritable cache folder is skipped with a warning.

    Parameters
    ----------
    key : dict
        What the matrix depends on (JSON-serialisable); ``key["kind"]`` starts the file name.
    build : callable
        Returns the matrix when it is not cached.
    budget : int, optional
        Bytes above which a built matrix is not stored (nor is one above the cache's limit).
    """
    folder = cache_dir()
    if folder is None:
        return build()
    digest = hashlib.sha256(
        json.dumps({"v": _CACHE_VERSION, **key}, sort_keys=True).encode()
    ).hexdigest()[:32]
    path = folder / f"{key.get('kind', 'matrix')}-{digest}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                m = _compact(sp.csr_matrix(
                    (f["data"], f["indices"], f["indptr"]), shape=tuple(f["shape"]), copy=False
                ))
            try:
                os.utime(path)
            except OSError:
                pass
            return m
        except (OSError, ValueError, KeyError):
            pass  # corrupt or foreign file: rebuild and overwrite it
    m = build()
    limit = cache_limit_bytes()
    size = _nbytes(m)
    if size > limit or (budget is not None and size > budget):
        return m
    try:
        if not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            _announce(folder, limit)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, data=m.data, indices=m.indices, indptr=m.indptr, shape=np.array(m.shape))
        os.replace(tmp, path)
        _evict(folder, limit, keep=path)
    except OSError as err:
        warnings.warn(f"medrecon: cannot write operator cache {folder}: {err}", stacklevel=2)
    return m


def _matmul(m: Tensor, x: Tensor) -> Tensor:
    # a single column goes through the sparse matrix-vector kernel, about 1.4x faster
    if x.shape[1] == 1:
        return torch.mv(m, x[:, 0])[:, None]
    return m @ x


class _CSRApply(torch.autograd.Function):
    """``M @ x`` whose gradient applies the stored transpose (and vice versa)."""

    @staticmethod
    def forward(ctx, x: Tensor, owner: SparseMatrix, transpose: bool) -> Tensor:  # type: ignore[override]
        ctx.owner, ctx.transpose = owner, transpose
        return _matmul(owner.get(x.device, x.dtype, transpose), x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return _CSRApply.apply(g.contiguous(), ctx.owner, not ctx.transpose), None, None


class SparseMatrix:
    """A real sparse matrix applied to the trailing axis of batched tensors, with its transpose.

    Parameters
    ----------
    matrix : scipy.sparse.csr_matrix, shape (m, n)
        Stored once on the host (float32, int32 indices); torch copies are made per device and
        dtype on first use.
    transpose : scipy.sparse.csr_matrix, shape (n, m), optional
        The transpose as CSR (e.g. from the disk cache); built on first use otherwise.
    """

    def __init__(self, matrix: sp.csr_matrix, transpose: sp.csr_matrix | None = None):
        if matrix.shape[0] >= 2**31 or matrix.nnz >= 2**31:
            raise ValueError(f"system matrix too large for int32 indices: {matrix.shape}, nnz {matrix.nnz}")
        self.matrix = _compact(matrix)
        self._transpose = None if transpose is None else _compact(transpose)
        self.shape = matrix.shape
        self._torch: dict[tuple[torch.device, torch.dtype, bool], Tensor] = {}

    @property
    def transpose(self) -> sp.csr_matrix:
        """The transpose as a CSR matrix (built once)."""
        if self._transpose is None:
            self._transpose = _compact(self.matrix.T.tocsr())
        return self._transpose

    def get(self, device: torch.device, dtype: torch.dtype, transpose: bool = False) -> Tensor:
        """The torch CSR matrix (or its transpose) on ``device`` in ``dtype``."""
        key = (torch.device(device), dtype, transpose)
        if key not in self._torch:
            m = self.transpose if transpose else self.matrix
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                self._torch[key] = torch.sparse_csr_tensor(
                    torch.from_numpy(m.indptr), torch.from_numpy(m.indices),
                    torch.from_numpy(m.data).to(dtype), size=m.shape,
                ).to(device)
        return self._torch[key]

    def apply(self, x: Tensor, transpose: bool = False) -> Tensor:
        """Multiply the trailing axis of ``x`` (size n, or m if ``transpose``) by the matrix.

        ``x`` has shape ``(..., n)``; the result ``(..., m)``.  Differentiable.
        """
        lead = x.shape[:-1]
        cols = x.reshape(-1, x.shape[-1]).T.contiguous()
        if torch.is_grad_enabled() and x.requires_grad:
            out = _CSRApply.apply(cols, self, transpose)
        else:
            out = _matmul(self.get(x.device, x.dtype, transpose), cols)
        return out.T.reshape(*lead, out.shape[0])


def _compact(m: sp.csr_matrix) -> sp.csr_matrix:
    """float32 data and int32 indices (torch's CPU CSR product is 3–10× faster with int32),
    without copying arrays that already have those types."""
    out = sp.csr_matrix((m.data, m.indices, m.indptr), shape=m.shape, copy=False)
    if out.data.dtype != np.float32:
        out.data = out.data.astype(np.float32)
    if out.indices.dtype != np.int32:
        out.indices = out.indices.astype(np.int32)
    if out.indptr.dtype != np.int32:
        out.indptr = out.indptr.astype(np.int32)
    return out
