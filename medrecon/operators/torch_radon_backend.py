"""Optional torch-radon backend for :class:`~medrecon.operators.ParallelBeamCT` on CUDA.

torch-radon (CUDA kernels, not on PyPI) is used when it is importable, the input is on a CUDA
device and the operator's backend is ``"auto"`` or ``"torch-radon"``.  Its geometry conventions
are not ours by construction, so before first use on a device the backend is *validated*: its
forward projection of a random image must match the sparse-matrix projector to 1 % and its
back-projection must be the adjoint of its forward projection to 1e-4.  If either check fails,
``"auto"`` falls back to the sparse matrix with a warning and ``"torch-radon"`` raises.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from medrecon.errors import SettingsError

__all__ = ["validated_torch_radon", "BACKENDS"]

BACKENDS = ("auto", "sparse", "matrix-free", "torch-radon")


def _build(op: Any, device: torch.device) -> tuple[Any | None, str]:
    try:
        import torch_radon
    except ImportError:
        return None, "torch_radon is not installed"
    h, w = op.image_shape
    if h != w:
        return None, f"torch-radon needs square images, got {h}×{w}"
    try:
        angles = torch.as_tensor(op.angles, dtype=torch.float32, device=device)
        radon = torch_radon.Radon(h, angles, det_count=op.n_bins, det_spacing=op.detector_spacing)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.rand(1, 1, h, w, generator=g).to(device)
        y = torch.rand(1, 1, len(op.angles), op.n_bins, generator=g).to(device)
        ours = op._project(x)
        theirs = radon.forward(x)
        rel = float(torch.linalg.norm(theirs - ours) / torch.linalg.norm(ours))
        if rel > 1e-2:
            return None, f"torch-radon's projection differs from the reference geometry by {rel:.3g} (relative)"
        lhs = float((radon.forward(x) * y).sum())
        rhs = float((x * radon.backprojection(y)).sum())
        if abs(lhs - rhs) > 1e-4 * abs(lhs):
            return None, "torch-radon's back-projection is not the adjoint of its projection"
    except Exception as err:  # any failure of the optional library means: do not use it
        return None, f"torch-radon failed: {err}"
    return radon, ""


def validated_torch_radon(op: Any, device: torch.device) -> Any | None:
    """The validated ``torch_radon.Radon`` for ``op`` on ``device``, or None (sparse fallback).

    The result (or the reason it is unusable) is cached on the operator per device.
    """
    cache = op.__dict__.setdefault("_torch_radon", {})
    key = str(device)
    if key not in cache:
        cache[key] = _build(op, device)
        radon, why = cache[key]
        if radon is None and op.backend == "auto" and device.type == "cuda" and "not installed" not in why:
            warnings.warn(f"ParallelBeamCT: not using torch-radon ({why}); using the sparse projector",
                          stacklevel=3)
    radon, why = cache[key]
    if radon is None and op.backend == "torch-radon":
        raise SettingsError(f"ParallelBeamCT(backend='torch-radon'): {why}")
    return radon


def use_torch_radon(op: Any, t: Tensor) -> Any | None:
    """The torch-radon projector to use for tensor ``t``, or None for the reference projector."""
    if op.backend in ("sparse", "matrix-free") or (op.backend == "auto" and t.device.type != "cuda"):
        return None
    return validated_torch_radon(op, t.device)
