"""Score networks: MONAI's ``DiffusionModelUNet`` in named sizes, with SDE preconditioning.

The U-Net is fully convolutional except for self-attention at its lowest level, so a network
trained on patches applies to whole images (any size ``>= 1`` pixel; inputs are reflect-padded
to a multiple of 8 and cropped back).

Sizes (2-D, one channel in and out):

======  ======================  =========  ==========  ===========
name    channels                res blocks attention   parameters
======  ======================  =========  ==========  ===========
tiny    (8, 8, 16, 16)          1          lowest      ~0.03 M (tests)
S       (32, 64, 64, 128)       1          lowest      ~3.2 M
M       (64, 128, 128, 256)     2          lowest      ~18 M
======  ======================  =========  ==========  ===========

Preconditioning (:class:`ScoreNet`): the U-Net sees ``c_in(t) x`` and the time ``999 t``; its
output ``F`` estimates ``-z`` (the negated unit noise), so the score is ``F / std(t)`` — the
``scale_by_sigma`` of NCSN++ for VE and the epsilon parametrisation for VP.  For VE,
``c_in = 1 / sqrt(sigma_data^2 + sigma(t)^2)`` keeps the input at unit scale even at
``sigma_max``; for VP ``c_in = 1``.

Position-aware networks (``NetworkSpec.coords``; PaDIS, Hu et al., NeurIPS 2024): the U-Net
gets two more input channels, the x (column) and y (row) coordinate of every pixel in the frame
of the *whole image* (:func:`image_coords`: pixel centres, ``-1 + (2 j + 1) / W`` for column
``j`` of a ``W``-wide image, so the image spans ``[-1, 1]``).  A patch cropped at
``(top, left)`` from an ``H x W`` image is given the coordinates of those pixels
(``image_coords(p, p, top=top, left=left, frame=(H, W))``, passed as ``coords=``); a whole
image needs nothing, its coordinates are built from its size.  Inputs whose size is not a
multiple of ``2^(levels-1)`` are padded as for any net, and the coordinates of the padded
pixels continue the same affine grid (they lie just outside ``[-1, 1]``) and are cropped away
with them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medrecon.errors import SettingsError, ShapeError
from medrecon.priors.sde import SDE, VESDE

__all__ = [
    "NetworkSpec",
    "NETWORK_SIZES",
    "network_spec",
    "build_unet",
    "ScoreNet",
    "image_coords",
    "widen_for_coords",
]

COORD_CHANNELS_DOC = (
    "2 extra input channels: x (column) and y (row) of each pixel centre in the whole-image "
    "frame, in [-1, 1] (-1 + (2j + 1)/W); built from the input's size unless given (patches)"
)


@dataclass(frozen=True)
class NetworkSpec:
    """Architecture of a ``DiffusionModelUNet`` (all the settings needed to rebuild it).

    ``in_channels`` counts the image channels; ``coords=True`` adds the two coordinate channels
    of a position-aware net (the U-Net then has ``in_channels + 2`` inputs).  Cards written
    before that option have no ``coords`` entry and load as ``coords=False``.
    """

    size: str
    channels: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[bool, ...]
    norm_num_groups: int
    num_head_channels: int
    in_channels: int = 1
    out_channels: int = 1
    coords: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``coords`` and its description only for position-aware nets, so
        the architecture of a net without coordinates reads as it always did)."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["attention_levels"] = list(self.attention_levels)
        if self.coords:
            d["coord_channels"] = COORD_CHANNELS_DOC
        else:
            del d["coords"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkSpec:
        """Inverse of :meth:`to_dict`."""
        d = {k: v for k, v in d.items() if k != "coord_channels"}
        try:
            return cls(
                **{
                    **d,
                    "channels": tuple(d["channels"]),
                    "attention_levels": tuple(bool(a) for a in d["attention_levels"]),
                    "coords": bool(d.get("coords", False)),
                }
            )
        except (TypeError, KeyError) as err:
            raise SettingsError(f"NetworkSpec.from_dict: bad architecture {d}") from err


NETWORK_SIZES: dict[str, NetworkSpec] = {
    "tiny": NetworkSpec("tiny", (8, 8, 16, 16), 1, (False, False, False, True), 4, 8),
    "S": NetworkSpec("S", (32, 64, 64, 128), 1, (False, False, False, True), 32, 32),
    "M": NetworkSpec("M", (64, 128, 128, 256), 2, (False, False, False, True), 32, 32),
}


def network_spec(size: str) -> NetworkSpec:
    """Look up a named size ("tiny", "S", "M").

    Raises
    ------
    SettingsError
        For an unknown name.
    """
    if size not in NETWORK_SIZES:
        raise SettingsError(
            f"network_spec: unknown size {size!r}; known: {', '.join(NETWORK_SIZES)}"
        )
    return NETWORK_SIZES[size]


def image_coords(
    h: int,
    w: int,
    *,
    top: int = 0,
    left: int = 0,
    frame: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Coordinate channels of an ``h x w`` window at ``(top, left)`` of an image of size ``frame``.

    Channel 0 is x (the column), channel 1 is y (the row), each pixel centre mapped to
    ``-1 + (2 i + 1) / n`` of its axis of length ``n`` in ``frame``, so the whole frame spans
    ``[-1, 1]`` symmetrically: a flip of the frame negates the coordinate.  ``top``/``left`` may
    be negative and the window may extend past the frame (padding): the grid continues.

    Parameters
    ----------
    h, w : int
        Window size (pixels).
    top, left : int
        Position of the window's first pixel in the frame.
    frame : (H, W), optional
        The whole image (default: the window itself, ``(h, w)``).
    device, dtype
        Of the result.

    Returns
    -------
    Tensor, shape (1, 2, h, w)

    Examples
    --------
    >>> image_coords(1, 2)[0, 0].tolist()
    [[-0.5, 0.5]]
    >>> image_coords(2, 2, top=254, left=0, frame=(256, 256))[0, 1, :, 0].tolist()
    [0.98828125, 0.99609375]
    """
    fh, fw = frame if frame is not None else (h, w)
    if min(h, w, fh, fw) < 1:
        raise ShapeError(f"image_coords: sizes must be >= 1; got window {h}x{w}, frame {fh}x{fw}")
    ys = (2 * torch.arange(top, top + h, device=device, dtype=torch.float64) + 1) / fh - 1
    xs = (2 * torch.arange(left, left + w, device=device, dtype=torch.float64) + 1) / fw - 1
    grid = torch.stack([xs.reshape(1, w).expand(h, w), ys.reshape(h, 1).expand(h, w)])
    return grid.unsqueeze(0).to(dtype)


def _extend_linearly(c: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
    """Pad ``(B, C, H, W)`` coordinate channels by ``(left, right, top, bottom)`` pixels, each row
    and column continued linearly from its two edge values (exact for any affine grid,
    e.g. a flipped or rotated :func:`image_coords`); a single pixel is repeated."""
    pl, pr, pt, pb = pads

    def along(x: Tensor, before: int, after: int, dim: int) -> Tensor:
        n = x.shape[dim]
        if not (before or after):
            return x
        first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
        step0 = x.narrow(dim, 1, 1) - first if n > 1 else torch.zeros_like(first)
        step1 = last - x.narrow(dim, n - 2, 1) if n > 1 else torch.zeros_like(last)
        shape = [1] * x.ndim
        parts = []
        if before:
            shape[dim] = before
            k = torch.arange(before, 0, -1, device=x.device, dtype=x.dtype).reshape(shape)
            parts.append(first - k * step0)
        parts.append(x)
        if after:
            shape[dim] = after
            k = torch.arange(1, after + 1, device=x.device, dtype=x.dtype).reshape(shape)
            parts.append(last + k * step1)
        return torch.cat(parts, dim=dim)

    return along(along(c, pl, pr, 3), pt, pb, 2)


def widen_for_coords(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """U-Net weights of a net without coordinates, widened for its position-aware twin.

    The input convolution gets two more input channels with zero weights, so the position-aware
    net computes exactly what the given one did until training moves those weights (how a
    position-aware design can start from shipped weights, ``init_from``).

    Parameters
    ----------
    state : dict
        ``ScoreNet.unet.state_dict()`` of a net with ``coords=False``.

    Returns
    -------
    dict
        The same tensors, ``conv_in.conv.weight`` ``(C, c, 3, 3)`` → ``(C, c + 2, 3, 3)``.
    """
    key = "conv_in.conv.weight"
    if key not in state:
        raise SettingsError(f"widen_for_coords: no {key!r} in the state dict")
    w = state[key]
    return {**state, key: torch.cat([w, w.new_zeros(w.shape[0], 2, *w.shape[2:])], dim=1)}


def build_unet(spec: NetworkSpec) -> nn.Module:
    """Instantiate MONAI's 2-D ``DiffusionModelUNet`` for ``spec`` (called as ``net(x, timesteps)``)."""
    from monai.networks.nets import DiffusionModelUNet

    n = len(spec.channels)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=spec.in_channels + (2 if spec.coords else 0),
        out_channels=spec.out_channels,
        num_res_blocks=(spec.num_res_blocks,) * n,
        channels=spec.channels,
        attention_levels=spec.attention_levels,
        norm_num_groups=spec.norm_num_groups,
        num_head_channels=spec.num_head_channels,
    )


class ScoreNet(nn.Module):
    """U-Net plus SDE preconditioning; ``forward`` returns the raw output ``F`` (≈ ``-z``).

    Parameters
    ----------
    spec : NetworkSpec
        Architecture.
    sde : SDE
        Forward SDE (gives ``std(t)``, ``c_in`` and the time input).
    sigma_data : float
        Typical standard deviation of the normalised training images (VE input scaling).
    """

    def __init__(self, spec: NetworkSpec, sde: SDE, sigma_data: float = 0.2):
        super().__init__()
        self.spec = spec
        self.sde = sde
        self.sigma_data = float(sigma_data)
        self.unet = build_unet(spec)
        self.multiple = 2 ** (len(spec.channels) - 1)

    def c_in(self, t: Tensor) -> Tensor:
        """Input scale, shape ``(B,)``."""
        if isinstance(self.sde, VESDE):
            return torch.rsqrt(self.sigma_data**2 + self.sde.std(t) ** 2)
        return torch.ones_like(t)

    def forward(self, x: Tensor, t: Tensor, coords: Tensor | None = None) -> Tensor:
        """Network output ``F(x, t)`` (an estimate of ``-z``), shape of ``x``.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)
            Noisy images in normalised space; any ``H, W >= 1`` (sizes that are not a
            multiple of ``self.multiple`` are padded and cropped back).
        t : Tensor, shape (B,)
            Diffusion times.
        coords : Tensor, shape (B or 1, 2, H, W), optional
            Position-aware nets only: the coordinate channels of ``x``'s pixels in the whole
            image's frame (:func:`image_coords`; patches in training).  Default: ``x`` is the
            whole image, ``image_coords(H, W)``.

        Raises
        ------
        SettingsError
            ``x`` has another channel count than the spec, or ``coords`` is given to a net
            without coordinate channels.
        ShapeError
            ``x`` is empty, or ``coords`` does not have the shape above.
        """
        if x.ndim != 4 or x.shape[1] != self.spec.in_channels:
            raise SettingsError(
                f"ScoreNet: x must be (B, {self.spec.in_channels}, H, W); got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h < 1 or w < 1:
            raise ShapeError(f"ScoreNet: images must be at least 1x1 pixels; got {h}x{w}")
        if coords is not None and not self.spec.coords:
            raise SettingsError(
                "ScoreNet: coords given, but this network has no coordinate channels "
                "(NetworkSpec.coords is False)"
            )
        if coords is not None and (
            coords.ndim != 4 or coords.shape[0] not in (1, x.shape[0]) or tuple(coords.shape[1:]) != (2, h, w)
        ):
            raise ShapeError(
                f"ScoreNet: coords must be ({x.shape[0]} or 1, 2, {h}, {w}) for x of shape "
                f"{tuple(x.shape)}; got {tuple(coords.shape)}"
            )
        t = t.to(device=x.device, dtype=x.dtype)
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        xin = x * self.c_in(t).reshape(-1, 1, 1, 1)
        if ph or pw:
            mode = "reflect" if (ph < h and pw < w) else "replicate"
            xin = F.pad(xin, pads, mode=mode)
        if self.spec.coords:
            if coords is None:  # the whole image: its grid, continued over the padding
                c = image_coords(h + ph, w + pw, top=-pads[2], left=-pads[0], frame=(h, w),
                                 device=x.device, dtype=x.dtype)
            else:
                c = _extend_linearly(coords.to(device=x.device, dtype=x.dtype), pads)
            xin = torch.cat([xin, c.expand(x.shape[0], -1, -1, -1)], dim=1)
        out = self.unet(xin, self.sde.noise_condition(t))
        if ph or pw:
            out = out[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
        return out

    def score(self, x: Tensor, t: Tensor, coords: Tensor | None = None) -> Tensor:
        """Score ``F(x, t) / std(t)``, shape of ``x`` (``coords`` as in :meth:`forward`)."""
        out = self(x, t) if coords is None else self(x, t, coords)
        return out / self.sde.std(t.to(device=x.device, dtype=x.dtype)).reshape(-1, 1, 1, 1)
