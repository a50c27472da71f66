"""Figures and reports: a PNG per case (initial estimate | reconstruction | uncertainty | error,
with colour bars and units), thumbnails, and the HTML report of a batch.

Image panels share one display window (:func:`display_window`: chosen per modality from the
image's intensities, or given); error and uncertainty panels get their own colour scale from
their 1st to 99th percentile (:func:`robust_range`), so one wild pixel does not flatten the map.

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
from medrecon.datasets.orientation import display_orientation, orient_for_display
from medrecon.metrics import SOFT_TISSUE_HU  # W400/L40

__all__ = ["case_figure", "thumbnail", "batch_report", "display_orientation", "orient_for_display",
           "display_window", "robust_range"]

#: CT values at or below this are air, left out when the window is chosen
AIR_HU = -500.0
#: narrowest window chosen for CT objects outside the soft-tissue window, HU
MIN_WIDTH_HU = 400.0


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


def display_window(image: np.ndarray, modality: str) -> tuple[tuple[float, float], str]:
    """Display range of a figure's image panels, chosen per modality from the image's intensities.

    Parameters
    ----------
    image : ndarray
        The image (or volume) the window is chosen on: the reference, else the initial estimate.
    modality : {"ct", "mri"}
        ``"ct"`` (also ``"CT"``): values in HU.  Anything else: magnitudes in arbitrary units.

    Returns
    -------
    (low, high) : tuple of float
        The window, in the image's units.
    how : str
        Why this window, for the record.

    Notes
    -----
    CT: the object is every pixel above −500 HU (not air).  When the object's median lies in the
    soft-tissue window W400/L40 (a head, a chest, an abdomen), that window; otherwise (a phantom
    at +700 HU, a crop of bone) the object's 1st to 99th percentile, at least 400 HU wide and
    rounded outwards to 10 HU.  MRI: 0 to the 99.5th percentile of the magnitude.

    Examples
    --------
    >>> import numpy as np
    >>> display_window(np.full((8, 8), 40.0), "ct")[0]
    (-160.0, 240.0)
    >>> display_window(np.full((8, 8), 700.0), "ct")[0]
    (500.0, 900.0)
    """
    a = np.asarray(image, dtype=np.float64)
    a = a[np.isfinite(a)]
    if str(modality).lower() == "ct":
        body = a[a > AIR_HU]
        low, high = SOFT_TISSUE_HU
        if body.size == 0:
            return (low, high), "soft-tissue window W400/L40 (nothing above -500 HU)"
        median = float(np.median(body))
        if low <= median <= high:
            return (low, high), f"soft-tissue window W400/L40 (the object's median, {median:.0f} HU, lies in it)"
        p1, p99 = (float(v) for v in np.percentile(body, [1.0, 99.0]))
        centre, half = 0.5 * (p1 + p99), max(0.5 * (p99 - p1), 0.5 * MIN_WIDTH_HU)
        low, high = 10.0 * np.floor((centre - half) / 10.0), 10.0 * np.ceil((centre + half) / 10.0)
        return (float(low), float(high)), (
            f"W{high - low:g}/L{0.5 * (low + high):g} from the object's 1st-99th percentile (its median, "
            f"{median:.0f} HU, lies outside the soft-tissue window W400/L40)")
    mag = np.abs(a)
    high = float(np.percentile(mag, 99.5)) if mag.size else 0.0
    high = high or (float(mag.max()) if mag.size else 0.0) or 1.0
    return (0.0, high), "0 to the 99.5th percentile of the magnitude"


def robust_range(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """The colour range of an error or uncertainty map: its 1st to 99th percentile (finite values).

    A constant map gets its value ± 0.5; an empty or all-NaN map (0, 1).

    Examples
    --------
    >>> import numpy as np
    >>> err = np.arange(100.0)
    >>> err[0] = 1e6  # one wild pixel does not set the scale
    >>> robust_range(err)
    (1.99, 98.01)
    """
    a = np.asarray(image, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(a, percentiles))
    if not high > low:
        low, high = float(a.min()), float(a.max())
    if not high > low:
        low, high = low - 0.5, high + 0.5
    return low, high


def _extend(img: np.ndarray, low: float, high: float) -> str:
    """Colour-bar arrows for values beyond the range shown."""
    a = np.asarray(img, dtype=np.float64)
    a = a[np.isfinite(a)]
    below, above = bool(a.size and a.min() < low), bool(a.size and a.max() > high)
    return {(True, True): "both", (True, False): "min", (False, True): "max"}.get((below, above), "neither")


#: an image panel with less than this fraction of its pixels inside the shared display window
#: shows (nearly) nothing in it, and gets a window of its own
SHOWS_NOTHING = 0.02


def panel_range(name: str, img: np.ndarray, unit: str, display: tuple[float, float] | None
                ) -> tuple[float, float, str]:
    """The colour range and colour-bar label of one figure panel.

    Uncertainty, error and std panels (by ``name``) get their own robust range
    (:func:`robust_range`).  Image panels share ``display``, unless fewer than
    :data:`SHOWS_NOTHING` of their pixels fall inside it (say, a limited-angle FBP far below
    the reference's window): such a panel gets its own 1st-99th percentile window, named on its
    colour bar.  Without ``display``, each panel shows its full range.

    Examples
    --------
    >>> import numpy as np
    >>> panel_range("initial estimate (fbp)", np.full((4, 4), -900.0), "HU", (-160.0, 240.0))[2]
    'HU (own window W1 L-900: nothing in the shared one)'
    """
    own = any(k in name.lower() for k in ("uncertainty", "error", "std"))
    if own:  # its own scale, robust to outliers
        low, high = robust_range(img)
        return low, high, unit
    if display is None:
        low, high = robust_range(img, (0.0, 100.0))
        return low, high, unit
    low, high = display
    a = np.asarray(img, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size and np.mean((a > low) & (a < high)) < SHOWS_NOTHING:
        low, high = robust_range(a)
        return low, high, f"{unit} (own window W{high - low:.4g} L{0.5 * (low + high):.4g}: nothing in the shared one)"
    return low, high, f"{unit} (W{high - low:.4g} L{0.5 * (low + high):.4g})"


def _figure(
    panels: list[tuple[str, np.ndarray, str]],
    display: tuple[float, float] | None,
    title: str,
    affine: np.ndarray | None,
    caption: str = "",
):
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # constrained layout makes room for colour-bar ticks and labels (tight_layout clipped them)
    lines = [w for line in caption.splitlines() if line.strip()
             for w in textwrap.wrap(line, width=int(30 * len(panels)))]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.8 + 0.18 * len(lines)), squeeze=False,
                             layout="constrained")
    for ax, (name, img, unit) in zip(axes[0], panels, strict=True):
        own = any(k in name.lower() for k in ("uncertainty", "error", "std"))
        low, high, label = panel_range(name, img, unit, display)
        shown, aspect = orient_for_display(img, affine)
        im = ax.imshow(shown, cmap="magma" if own else "gray", aspect=aspect, vmin=low, vmax=high)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        bar = fig.colorbar(im, ax=ax, shrink=0.85, extend=_extend(img, low, high))
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    if lines:
        fig.supxlabel("\n".join(lines), fontsize=8, color="firebrick")
    return fig


def case_figure(
    path: str | Path,
    panels: list[tuple[str, np.ndarray, str]],
    *,
    display: tuple[float, float] | None = None,
    title: str = "",
    affine: np.ndarray | None = None,
    caption: str = "",
) -> Path:
    """Write a row of image panels with colour bars to ``path`` (PNG, written atomically).

    Parameters
    ----------
    panels : list of (title, image (H, W), unit)
        Image panels; a title containing "uncertainty" or "error" gets its own colour scale, from
        its 1st to its 99th percentile (:func:`robust_range`; arrows on the colour bar mark
        values beyond it); so does an image panel that would show nothing in ``display``
        (:func:`panel_range`).
    display : (low, high), optional
        Display range shared by the image panels (e.g. a CT window in HU,
        :func:`display_window`); it is named on their colour bars.  None: each panel's range.
    title : str
        Figure title (which case, which slice).
    affine : ndarray (4, 4), optional
        RAS+ affine of the volume the panels are slices of: panels are turned to the usual
        viewer layout (:func:`display_orientation`).  None: shown as stored.
    caption : str
        Lines printed under the panels (cautions: an input outside the prior's domain, an
        uncertainty map that is not calibrated).
    """
    import matplotlib.pyplot as plt

    fig = _figure(panels, display, title, affine, caption)
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
        Display range (e.g. a CT window in HU); None: the image's 1st to 99th percentile
        (:func:`robust_range`), magma colours (uncertainty maps).
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
        low, high = robust_range(img)
        kw = {"cmap": "magma", "vmin": low, "vmax": high}
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
