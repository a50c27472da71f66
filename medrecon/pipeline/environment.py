"""What ``medrecon info`` reports: versions, the torch device, optional backends and priors."""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["describe"]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe() -> list[str]:
    """Lines describing this installation (no patient data, no paths of inputs)."""
    import torch

    import medrecon

    lines = [f"medrecon {medrecon.__version__}, Python {platform.python_version()}"]
    lines.append("packages: " + ", ".join(
        f"{d} {_version(d)}" for d in ("torch", "numpy", "scipy", "sigpy", "pydicom", "nibabel", "dask", "distributed")
    ))
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)})"
    else:
        dev = "cpu (no CUDA device)"
    lines.append(f"device: {dev}; torch threads {torch.get_num_threads()}")
    try:
        import torch_radon  # noqa: F401

        lines.append("torch-radon: available")
    except ImportError:
        lines.append("torch-radon: not installed (CUDA-only, optional)")
    try:
        from medrecon.priors.registry import shipped_registry

        names = list(shipped_registry().names())
        lines.append(f"priors: {', '.join(names) if names else 'none shipped yet'}")
    except Exception as err:  # noqa: BLE001 - info must always print
        lines.append(f"priors: unavailable ({type(err).__name__}: {err})")
    from medrecon.api import METHODS

    try:
        from medrecon.solvers.presets import DIFFUSION_METHODS
    except ImportError:
        DIFFUSION_METHODS = ()  # noqa: N806
    lines.append(f"methods: {', '.join(METHODS)}" + (f"; diffusion: {', '.join(DIFFUSION_METHODS)}"
                                                      if DIFFUSION_METHODS else ""))
    return lines
