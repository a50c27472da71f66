"""Normalisers: map images in their physical units to the prior's [0, 1] space and back.

* CT: the HU window ``[-1024, 3071]`` maps linearly to ``[0, 1]``:
  ``x_n = (HU + 1024) / 4096``, clipped to ``[0, 1]`` when ``clip=True`` (training data and
  priors' own inputs); the map is affine, so a solver can carry it through a linear operator.
* MRI: magnitude images are divided by their 99.5th percentile (``percentile`` kind); the
  concrete scale is fixed per volume with :meth:`Normaliser.fit`, which returns a window
  normaliser ``[0, p99.5] -> [0, 1]``.  The shipped MRI training data are already scaled this way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from medrecon.errors import SettingsError

__all__ = ["Normaliser", "CT_HU_WINDOW", "ct_normaliser", "mri_normaliser"]

CT_HU_WINDOW: tuple[float, float] = (-1024.0, 3071.0)


@dataclass(frozen=True)
class Normaliser:
    """Affine map ``x -> (x - low) / (high + 1 - low)`` (window) or a per-volume percentile scale.

    Parameters
    ----------
    kind : {"window", "percentile"}
        ``window`` uses ``low``/``high`` as given; ``percentile`` must be :meth:`fit` first.
    low, high : float
        Window in input units.  For CT the window is ``[-1024, 3071]`` and the width is
        ``high - low + 1 = 4096`` (integer HU levels); for other windows ``width`` is
        ``high - low`` unless ``integer_levels`` is true.
    percentile : float
        For ``percentile``: the percentile of ``|x|`` that maps to 1.
    clip : bool
        Clip normalised values to ``[0, 1]``.
    integer_levels : bool
        Width is ``high - low + 1`` (integer-valued data such as HU).
    unit : str
        Unit of the input (documentation only, e.g. "HU").
    """

    kind: str = "window"
    low: float = 0.0
    high: float = 1.0
    percentile: float = 99.5
    clip: bool = False
    integer_levels: bool = False
    unit: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("window", "percentile"):
            raise SettingsError(
                f"Normaliser: kind must be 'window' or 'percentile'; got {self.kind!r}"
            )
        if self.kind == "window" and not self.high > self.low:
            raise SettingsError(
                f"Normaliser: need high > low; got low={self.low}, high={self.high}"
            )

    @property
    def width(self) -> float:
        """Scale of the affine map in input units."""
        return self.high - self.low + (1.0 if self.integer_levels else 0.0)

    def fit(self, x: Tensor) -> Normaliser:
        """Fix a percentile normaliser's scale from ``x`` (any shape, complex → magnitude)."""
        if self.kind == "window":
            return self
        mag = x.abs().flatten().to(torch.float64)
        if mag.numel() > 2_000_000:
            mag = mag[:: mag.numel() // 2_000_000 + 1]
        p = float(torch.quantile(mag, self.percentile / 100.0))
        if p <= 0:
            raise SettingsError("Normaliser.fit: the image is all zeros; cannot fix a scale")
        return replace(self, kind="window", low=0.0, high=p)

    def _check(self) -> None:
        if self.kind != "window":
            raise SettingsError("Normaliser: a 'percentile' normaliser must be fit(x) before use")

    def normalise(self, x: Tensor) -> Tensor:
        """Input units → prior space; keeps dtype (integer inputs become float32)."""
        self._check()
        if not (x.is_floating_point() or x.is_complex()):
            x = x.to(torch.float32)
        y = (x - self.low) / self.width if not x.is_complex() else x / self.width
        return y.clamp(0.0, 1.0) if (self.clip and not y.is_complex()) else y

    def denormalise(self, x: Tensor) -> Tensor:
        """Prior space → input units."""
        self._check()
        return x * self.width + (self.low if not x.is_complex() else 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normaliser:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(**d)
        except TypeError as err:
            raise SettingsError(f"Normaliser.from_dict: bad settings {d}") from err


def ct_normaliser() -> Normaliser:
    """HU window ``[-1024, 3071]`` → ``[0, 1]``: ``(HU + 1024) / 4096``, clipped.

    Examples
    --------
    >>> float(ct_normaliser().normalise(torch.tensor(1024.0)))
    0.5
    """
    return Normaliser(
        "window", CT_HU_WINDOW[0], CT_HU_WINDOW[1], clip=True, integer_levels=True, unit="HU"
    )


def mri_normaliser(percentile: float = 99.5) -> Normaliser:
    """Magnitude divided by its ``percentile`` (per volume; call :meth:`Normaliser.fit`)."""
    return Normaliser("percentile", percentile=percentile, unit="a.u.")
