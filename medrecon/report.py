"""Figures and reports: a PNG per case (initial estimate | reconstruction | uncertainty | error,
with colour bars and units), thumbnails, and the HTML report of a batch.

Everything is written atomically (temporary name in the target folder, then rename).  Reports show
case IDs only, never patient names.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medrecon.datasets._atomic import open_temp

__all__ = ["case_figure", "thumbnail", "batch_report", "display_orientation", "orient_for_display"]


def _atomic_write(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_temp(path.parent, path.suffix + ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


#: screen directions (right, down) in RAS+ world coordinates for the three slice planes, by the
#: world axis closest to the slice normal: radiological convention (patient's right on the
#: viewer's left), anterior up on axial slices, superior up on coronal and sagittal ones
#: (anterior on the left of sagittal slices)
_SCREEN = {2: ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),  # axial
           1: ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),  # coronal
           0: ((0.0, -1.0, 0.0), (0.0, 0.0, -1.0))}  # sagittal


def display_orientation(affine: np.ndarray) -> tuple[bool, bool, bool, float]:
    """How to show a slice ``array[z][y, x]`` of a volume with ``affine`` in the usual viewer layout.

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        RAS+ voxel-to-world affine of the volume, columns for the x, y and z array axes
        (:class:`~medrecon.datasets.Volume`).

    Returns
    -------
    transpose, flip_rows, flip_cols : bool
        Apply in this order (:func:`orient_for_display`).  Axial slices are shown with anterior
        up and the patient's right on the left (radiological), coronal ones with superior up,
        sagittal ones with superior up and anterior on the left.
    aspect : float
        Height / width of a displayed pixel (its spacing along screen rows over columns).

    Examples
    --------
    >>> import numpy as np
    >>> display_orientation(np.diag([1.0, 1.0, 1.0, 1.0]))  # RAS-stored axial: flip both axes
    (False, True, True, 1.0)
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    col, row = a[:, 0], a[:, 1]
    col_mm, row_mm = float(np.linalg.norm(col)) or 1.0, float(np.linalg.norm(row)) or 1.0
    col, row = col / col_mm, row / row_mm
    normal = int(np.argmax(np.abs(np.cross(col, row))))
    right, down = (np.asarray(v) for v in _SCREEN[normal])
    transpose = abs(float(row @ right)) > abs(float(col @ right))
    across, along = (row, col) if transpose else (col, row)  # array axes shown as screen x, y
    aspect = (col_mm / row_mm) if transpose else (row_mm / col_mm)
    return transpose, float(along @ down) < 0, float(across @ right) < 0, aspect


def orient_for_display(image: np.ndarray, affine: np.ndarray | None) -> tuple[np.ndarray, float]:
    """``image`` (H, W) turned as :func:`display_orientation` says, and its pixel aspect.

    ``affine=None`` (images without patient geometry: image folders, k-space, raw sinograms):
    the image as stored, aspect 1.
    """
    img = np.asarray(image)
    if affine is None:
        return img, 1.0
    transpose, flip_rows, flip_cols, aspect = display_orientation(affine)
    if transpose:
        img = img.T
    if flip_rows:
        img = img[::-1]
    if flip_cols:
        img = img[:, ::-1]
    return img, aspect


def _figure(
    panels: list[tuple[str, np.ndarray, str]],
    display: tuple[float, float] | None,
    title: str,
    affine: np.ndarray | None,
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # constrained layout makes room for colour-bar ticks and labels (tight_layout clipped them)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.8), squeeze=False,
                             layout="constrained")
    for ax, (name, img, unit) in zip(axes[0], panels, strict=True):
        own = any(k in name.lower() for k in ("uncertainty", "error", "std"))
        kw = {} if own or display is None else {"vmin": display[0], "vmax": display[1]}
        shown, aspect = orient_for_display(img, affine)
        im = ax.imshow(shown, cmap="magma" if own else "gray", aspect=aspect, **kw)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        bar = fig.colorbar(im, ax=ax, shrink=0.85)
        bar.set_label(unit, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def case_figure(
    path: str | Path,
    panels: list[tuple[str, np.ndarray, str]],
    *,
    display: tuple[float, float] | None = None,
    title: str = "",
    affine: np.ndarray | None = None,
) -> Path:
    """Write a row of image panels with colour bars to ``path`` (PNG, written atomically).

    Parameters
    ----------
    panels : list of (title, image (H, W), unit)
        Image panels; a title containing "uncertainty" or "error" gets its own colour scale.
    display : (low, high), optional
        Display range shared by the image panels (e.g. a CT window in HU).
    title : str
        Figure title (which case, which slice).
    affine : ndarray (4, 4), optional
        RAS+ affine of the volume the panels are slices of: panels are turned to the usual
        viewer layout (:func:`display_orientation`).  None: shown as stored.
    """
    import matplotlib.pyplot as plt

    fig = _figure(panels, display, title, affine)
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
        (absolute, or relative to the report's folder) and ``warnings`` (list of one-line
        texts, listed under "Warnings").
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
        lines += [f"<li><b>{html.escape(str(r['case_id']))}</b> ({html.escape(str(r.get('input') or ''))}): "
                  f"{html.escape(str(r.get('reason', '')))}</li>" for r in failed]
        lines.append("</ul>")
    warned = [(r, w) for r in rows for w in (r.get("warnings") or [])]
    if warned:  # settings ignored, geometry the outputs cannot hold, a failing method, ...
        lines.append("<h2>Warnings</h2><ul>")
        lines += [f"<li><b>{html.escape(str(r['case_id']))}</b>: {html.escape(str(w))}</li>" for r, w in warned]
        lines.append("</ul>")
    lines.append("<h2>Cases</h2><table><tr><th>case</th><th>input</th><th>status</th><th>modality</th><th>method</th>"
                 "<th>PSNR (dB)</th><th>SSIM</th><th>time (s)</th><th>reconstruction</th>"
                 "<th>uncertainty</th><th>figure</th></tr>")
    for r in rows:
        cells = [html.escape(str(r.get("case_id", ""))),
                 html.escape(str(r.get("input") or "")) + (f"<br><small>{html.escape(str(r['description']))}</small>"
                                                           if r.get("description") else ""),
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
