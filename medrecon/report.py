"""Figures: one PNG per case with the initial estimate, reconstruction, uncertainty and error."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["case_figure"]


def case_figure(
    path: str | Path,
    panels: list[tuple[str, np.ndarray, str]],
    *,
    display: tuple[float, float] | None = None,
    title: str = "",
) -> Path:
    """Write a row of image panels with colour bars to ``path`` (PNG, written atomically).

    Parameters
    ----------
    panels : list of (title, image (H, W), unit)
        Image panels; a title containing "uncertainty" or "error" gets its own colour scale.
    display : (low, high), optional
        Display range shared by the image panels (e.g. a CT window in HU).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (name, img, unit) in zip(axes[0], panels, strict=True):
        own = any(k in name.lower() for k in ("uncertainty", "error", "std"))
        kw = {} if own or display is None else {"vmin": display[0], "vmax": display[1]}
        im = ax.imshow(np.asarray(img), cmap="magma" if own else "gray", **kw)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label(unit, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
