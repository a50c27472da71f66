"""Figures and reports: a PNG per case (initial estimate | reconstruction | uncertainty | error,
with colour bars and units), thumbnails, and the HTML report of a batch.

Everything is written atomically (temporary name in the target folder, then rename).  Reports show
case IDs only, never patient names.
"""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["case_figure", "thumbnail", "batch_report"]


def _atomic_write(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix + ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
    try:
        return _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def thumbnail(path: str | Path, image: np.ndarray, display: tuple[float, float] | None, size: int = 128) -> Path:
    """A small grey-scale (or, without ``display``, magma-coloured) PNG of a 2-D image.

    Parameters
    ----------
    image : ndarray, shape (H, W)
    display : (low, high) or None
        Display range (e.g. a CT window in HU); None: the image's own range, magma colours
        (uncertainty maps).
    size : int
        Longest side in pixels, at most (the image is subsampled by an integer stride).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(image, dtype=np.float32)
    step = max(1, int(np.ceil(max(img.shape) / size)))
    img = img[::step, ::step]
    if display is None:
        kw = {"cmap": "magma", "vmin": float(img.min()), "vmax": float(img.max())}
    else:
        kw = {"cmap": "gray", "vmin": display[0], "vmax": display[1]}
    return _atomic_write(Path(path), lambda tmp: plt.imsave(tmp, img, format="png", **kw))


_CSS = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}
tr.failed{background:#fdd}img{height:96px}"""


def batch_report(path: str | Path, rows: Sequence[dict[str, Any]], *, title: str = "medrecon batch") -> Path:
    """Write the HTML report of a batch: one table row per case, failures with their reason.

    Parameters
    ----------
    path : str or Path
        The ``.html`` file; image links are made relative to its folder.
    rows : sequence of dict
        Summary rows with ``case_id``, ``status``, ``reason``, ``modality``, ``method``,
        ``psnr``, ``ssim``, ``wall_time_s`` and optional ``figure``, ``thumb``, ``std_thumb``
        (absolute, or relative to the report's folder).
    """
    out = Path(path)

    def rel(p: Any) -> str | None:
        if not p:
            return None
        if not Path(p).is_absolute():  # already relative to the report's folder
            return str(p)
        try:
            return os.path.relpath(Path(p).resolve(), out.parent.resolve())
        except ValueError:
            return str(p)

    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, int | float) and not isinstance(v, bool) else ""

    done = sum(r.get("status") == "done" for r in rows)
    failed = [r for r in rows if r.get("status") == "failed"]
    lines = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(rows)} cases: {done} done, {len(failed)} failed.</p>",
    ]
    if failed:
        lines.append("<h2>Failed cases</h2><ul>")
        lines += [f"<li><b>{html.escape(str(r['case_id']))}</b>: {html.escape(str(r.get('reason', '')))}</li>"
                  for r in failed]
        lines.append("</ul>")
    lines.append("<h2>Cases</h2><table><tr><th>case</th><th>status</th><th>modality</th><th>method</th>"
                 "<th>PSNR (dB)</th><th>SSIM</th><th>time (s)</th><th>reconstruction</th>"
                 "<th>uncertainty</th><th>figure</th></tr>")
    for r in rows:
        cells = [html.escape(str(r.get("case_id", ""))),
                 html.escape(str(r.get("status", ""))) + (" (reused)" if r.get("reused") else ""),
                 html.escape(str(r.get("modality", ""))), html.escape(str(r.get("method", ""))),
                 num(r.get("psnr"), ".2f"), num(r.get("ssim"), ".3f"), num(r.get("wall_time_s"), ".1f")]
        for key in ("thumb", "std_thumb"):
            link = rel(r.get(key))
            cells.append(f"<img src='{html.escape(link)}' alt='{key}'>" if link else "")
        fig = rel(r.get("figure"))
        cells.append(f"<a href='{html.escape(fig)}'>PNG</a>" if fig else html.escape(str(r.get("reason", ""))))
        cls = " class='failed'" if r.get("status") == "failed" else ""
        lines.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table></body></html>")
    text = "\n".join(lines) + "\n"
    return _atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
