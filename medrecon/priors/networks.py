"""Score networks: MONAI's ``DiffusionModelUNet`` in named sizes, with SDE preconditioning.

The U-Net is fully convolutional except for self-attention at its lowest level, so a network
trained on patches applies to whole images (any size; inputs are reflect-padded to a multiple
of 8 and cropped back).

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medrecon.errors import SettingsError
from medrecon.priors.sde import SDE, VESDE

__all__ = ["NetworkSpec", "NETWORK_SIZES", "network_spec", "build_unet", "ScoreNet"]


@dataclass(frozen=True)
class NetworkSpec:
    """Architecture of a ``DiffusionModelUNet`` (all the settings needed to rebuild it)."""

    size: str
    channels: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[bool, ...]
    norm_num_groups: int
    num_head_channels: int
    in_channels: int = 1
    out_channels: int = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkSpec:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                **{
                    **d,
                    "channels": tuple(d["channels"]),
                    "attention_levels": tuple(bool(a) for a in d["attention_levels"]),
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


def build_unet(spec: NetworkSpec) -> nn.Module:
    """Instantiate MONAI's 2-D ``DiffusionModelUNet`` for ``spec`` (called as ``net(x, timesteps)``)."""
    from monai.networks.nets import DiffusionModelUNet

    n = len(spec.channels)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=spec.in_channels,
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

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Network output ``F(x, t)`` (an estimate of ``-z``), shape of ``x``.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)
            Noisy images in normalised space.
        t : Tensor, shape (B,)
            Diffusion times.
        """
        if x.ndim != 4 or x.shape[1] != self.spec.in_channels:
            raise SettingsError(
                f"ScoreNet: x must be (B, {self.spec.in_channels}, H, W); got {tuple(x.shape)}"
            )
        t = t.to(device=x.device, dtype=x.dtype)
        h, w = x.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        xin = x * self.c_in(t).reshape(-1, 1, 1, 1)
        if ph or pw:
            mode = "reflect" if (ph < h and pw < w) else "replicate"
            xin = F.pad(xin, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode=mode)
        out = self.unet(xin, self.sde.noise_condition(t))
        if ph or pw:
            out = out[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
        return out

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """Score ``F(x, t) / std(t)``, shape of ``x``."""
        return self(x, t) / self.sde.std(t.to(device=x.device, dtype=x.dtype)).reshape(-1, 1, 1, 1)
