"""``ScorePrior`` = score network + SDE + normaliser + model card; safetensors save/load.

A shipped prior is two files side by side: ``NAME.safetensors`` (the weights, usually fp16) and
``NAME.json`` (the model card: architecture, SDE, normaliser, resolution, modality, training data
and licences, steps, wall time, hardware, validation numbers, solver defaults and the sha256 of
the weights file).  Loading checks the hash before it parses the weights and never unpickles.

Complex images (MRI): the shipped MRI prior is a *magnitude* prior on real images.  A complex
image is scored as two real images — its real and its imaginary part, stacked on the batch axis,
each scored by the same network — and recombined as ``score(Re x) + i score(Im x)`` (Chung & Ye,
score-MRI, Alg. 3).  :meth:`ScorePrior.score` and :meth:`ScorePrior.denoise` do this for any
complex input.

High noise levels (``card["high_noise"]``): a network trained briefly (or on patches) estimates
the noise least well where the noise is largest, and in the score ``F/std`` that error grows with
``std``; the Tweedie estimate can then be worse than the data mean.  At such levels the score of
the data is close to that of a Gaussian with the data's mean and variance (the data distribution
is small next to the noise), so a card may carry ``{"mean", "var", "sigma_c"}`` and the score
becomes ``w s_net + (1 − w) s_gauss`` with ``w = 1 / (1 + (σ/σ_c)⁴)``, σ the noise level of
``x/a(t)``.  :func:`fit_high_noise` measures ``σ_c`` as the noise level above which the Gaussian
estimate beats the network on validation images.  The imaginary part of a complex image uses
mean 0.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medrecon.errors import InputError, SettingsError, ShapeError
from medrecon.priors.networks import NetworkSpec, ScoreNet
from medrecon.priors.normalise import Normaliser
from medrecon.priors.registry import read_card, write_card
from medrecon.priors.sde import SDE, VESDE, VPSDE, sde_from_dict

__all__ = [
    "CARD_FORMAT",
    "ScorePrior",
    "sigma_to_t",
    "native_bf16",
    "tweedie_denoise",
    "sha256_file",
    "fit_high_noise",
]

CARD_FORMAT = "medrecon-prior-1"
ScoreFn = Callable[[Tensor, Tensor], Tensor]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sigma_to_t(sde: SDE, sigma: float | Tensor) -> Tensor:
    """Diffusion time at which ``x_t / a(t)`` carries Gaussian noise of std ``sigma``.

    VE: ``sigma(t) = sigma``.  VP: ``std(t) / a(t) = sigma``, i.e.
    ``a(t)^2 = 1 / (1 + sigma^2)``, solved in closed form for the linear ``beta(t)``.
    Values outside the SDE's range are clamped to ``[eps, 1]``.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if isinstance(sde, VESDE):
        t = torch.log(s / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)
    elif isinstance(sde, VPSDE):
        c = 0.5 * torch.log1p(s**2)  # = t^2 (bmax - bmin)/4 + t bmin/2
        a, b = 0.25 * (sde.beta_max - sde.beta_min), 0.5 * sde.beta_min
        t = (-b + torch.sqrt(b * b + 4 * a * c)) / (2 * a)
    else:  # pragma: no cover
        raise SettingsError(f"sigma_to_t: unsupported SDE {type(sde).__name__}")
    return t.clamp(sde.eps, 1.0)


def tweedie_denoise(score_fn: ScoreFn, sde: SDE, y: Tensor, sigma: float) -> Tensor:
    """Denoise ``y = x + sigma n`` (n ~ N(0, I)) with Tweedie's formula, in normalised space.

    VE: ``x̂ = y + sigma^2 s(y, t(sigma))``.  VP: the image is first scaled to ``a y`` so it
    matches ``p_t``, then ``x̂ = (a y + std^2 s(a y, t)) / a``.

    Parameters
    ----------
    score_fn : callable ``(x, t) -> score``
    sde : SDE
    y : Tensor, shape (B, C, H, W)
    sigma : float
        Noise standard deviation in normalised units.

    Returns
    -------
    Tensor, shape of ``y``
    """
    t = sigma_to_t(sde, sigma).to(device=y.device, dtype=y.dtype).expand(y.shape[0])
    a = float(sde.mean_coeff(t[:1].double())[0])
    std = float(sde.std(t[:1].double())[0])
    xt = a * y
    return (xt + std**2 * score_fn(xt, t)) / a


@torch.no_grad()
def fit_high_noise(
    prior: ScorePrior,
    train: Tensor,
    val: Tensor,
    sigmas: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0),
    seed: int = 0,
    batch: int = 4,
) -> dict[str, Any]:
    """Measure the high-noise Gaussian blend of a prior (see the module docstring).

    Parameters
    ----------
    prior : ScorePrior
        Its network is measured alone (any ``high_noise`` entry of its card is ignored here).
    train : Tensor, shape (N, H, W)
        Training images in normalised space: give the Gaussian's mean and variance.
    val : Tensor, shape (M, H, W)
        Held-out images in normalised space: RMSE of both Tweedie estimates at each sigma.
    sigmas : tuple of float
        Noise levels (normalised units), increasing.

    Returns
    -------
    dict
        ``mean``, ``var``, ``sigma_c`` (log-interpolated noise level where the Gaussian estimate
        becomes at least as good as the network; None when the network wins at every sigma,
        which turns the blend off) and ``measured`` (sigma, rmse_net, rmse_gauss).
    """
    mean, var = float(train.double().mean()), float(train.double().var())
    gen = torch.Generator().manual_seed(seed)
    saved = prior.card.pop("high_noise", None)
    try:
        e_net, e_g = [], []
        for s in sigmas:
            se_n = se_g = 0.0
            for i in range(0, len(val), batch):
                x = val[i : i + batch].unsqueeze(1).float()
                y = x + s * torch.randn(x.shape, generator=gen)
                se_n += float((prior.denoise_sigma(y, s) - x).pow(2).sum())
                se_g += float((mean + var / (var + s**2) * (y - mean) - x).pow(2).sum())
            e_net.append(math.sqrt(se_n / val.numel()))
            e_g.append(math.sqrt(se_g / val.numel()))
    finally:
        if saved is not None:
            prior.card["high_noise"] = saved
    sigma_c = None
    for k, (n, g) in enumerate(zip(e_net, e_g, strict=True)):
        if g <= n:
            if k == 0:
                sigma_c = float(sigmas[0])
            else:  # where log(rmse_net / rmse_gauss) crosses 0, interpolated in log sigma
                r0, r1 = math.log(e_net[k - 1] / e_g[k - 1]), math.log(n / g)
                f = r0 / (r0 - r1)
                sigma_c = math.exp(math.log(sigmas[k - 1]) + f * (math.log(sigmas[k]) - math.log(sigmas[k - 1])))
            break
    return {
        "mean": round(mean, 5),
        "var": round(var, 6),
        "sigma_c": None if sigma_c is None else round(sigma_c, 3),
        "measured": {
            "sigma": list(sigmas),
            "rmse_net": [round(v, 4) for v in e_net],
            "rmse_gauss": [round(v, 4) for v in e_g],
            "val_images": int(val.shape[0]),
        },
    }


def _check_card(card: dict[str, Any], path: Path) -> None:
    missing = [
        k for k in ("format", "architecture", "sde", "normaliser", "sha256") if k not in card
    ]
    if missing:
        raise InputError(path, f"model card lacks {', '.join(missing)}")
    if card["format"] != CARD_FORMAT:
        raise InputError(path, f"model card format {card['format']!r}; expected {CARD_FORMAT!r}")


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether oneDNN computes bfloat16 natively on this CPU (AVX512-BF16 / AMX); asked once."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class ScorePrior(nn.Module):
    """A trained score prior: network + SDE + normaliser + model card.

    Parameters
    ----------
    net : ScoreNet
        Preconditioned network (it holds the SDE).
    normaliser : Normaliser
        Physical units → the prior's [0, 1] space.
    card : dict, optional
        Model card (kept as loaded; :meth:`save` writes it back with a fresh sha256).

    Notes
    -----
    ``score`` and ``denoise`` work in normalised space.  Complex inputs are split into real and
    imaginary parts (see the module docstring).  A float input of another dtype than the
    weights is computed in the weights' dtype and returned in its own dtype; the device must
    match (move the prior with ``prior.to(device)``).

    ``precision`` sets the arithmetic of gradient-free network evaluations on the CPU:
    ``"float32"``, ``"bfloat16"`` (autocast; weights and outputs stay float32) or ``"auto"`` (the
    default: bfloat16 where the CPU computes it natively, AVX512-BF16 or AMX, float32 elsewhere).
    Measured with ct-256 on the 2-core development CPU (benchmarks/speed.py, batch 4 × 256²):
    0.32 s per image in float32 (channels-last), 0.11 s in bfloat16; the Tweedie estimates of
    the two agree to 69.5 dB PSNR (largest difference 2·10⁻³ of the [0, 1] range), far below the
    reconstructions' own error.  Evaluations with gradients (DPS) are always float32.
    """

    PRECISIONS = ("auto", "float32", "bfloat16")

    def __init__(self, net: ScoreNet, normaliser: Normaliser, card: dict[str, Any] | None = None):
        super().__init__()
        self.net = net
        self.normaliser = normaliser
        self.card: dict[str, Any] = dict(card or {})
        self._layout = torch.contiguous_format
        self.precision = "auto"

    def _autocast_dtype(self, x: Tensor, grad: bool) -> torch.dtype | None:
        """bfloat16 when this evaluation should autocast to it (see the class notes), else None."""
        if self.precision not in self.PRECISIONS:
            raise SettingsError(f"ScorePrior.precision must be one of {', '.join(self.PRECISIONS)}; got {self.precision!r}")
        if grad or x.device.type != "cpu" or self.precision == "float32":
            return None
        if self.precision == "bfloat16" or native_bf16():
            return torch.bfloat16
        return None

    def _use_layout(self, x: Tensor) -> None:
        """Weights in channels-last layout for gradient-free evaluation on the CPU, the default
        layout otherwise.  Measured on the 2-core development CPU ("S" net, 256², batch 4):
        channels-last is 16 % faster per image without gradients (0.375 vs 0.446 s) and 17 %
        slower with them (DPS: 3.86 vs 3.30 s per forward + backward), so the layout follows
        the call; a switch copies the 3 M weights once."""
        grad = torch.is_grad_enabled() and x.requires_grad
        want = torch.channels_last if (x.device.type == "cpu" and not grad) else torch.contiguous_format
        if want is not self._layout:
            self.net.to(memory_format=want)
            self._layout = want

    @property
    def high_noise(self) -> dict[str, float] | None:
        """The card's high-noise Gaussian blend ``{"mean", "var", "sigma_c"}`` or None."""
        hn = self.card.get("high_noise")
        if not hn or hn.get("sigma_c") is None:
            return None
        return {k: float(hn[k]) for k in ("mean", "var", "sigma_c")}

    @property
    def sde(self) -> SDE:
        """The forward SDE."""
        return self.net.sde

    @property
    def name(self) -> str:
        """Name from the card (``""`` when unnamed)."""
        return str(self.card.get("name", ""))

    # --- evaluation ---------------------------------------------------------------------
    def _real_score(self, x: Tensor, t: Tensor, mean: Tensor | float | None = None) -> Tensor:
        p = next(self.net.parameters())
        if x.device != p.device:
            raise ShapeError(
                f"ScorePrior.score: x is on {x.device} but the prior is on {p.device}; "
                "move it with prior.to(x.device)"
            )
        if x.ndim != 4:
            raise ShapeError(
                f"ScorePrior.score: x must be (B, C, H, W); got shape {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        self._use_layout(x)
        cast = self._autocast_dtype(x, torch.is_grad_enabled() and x.requires_grad)
        with torch.autocast("cpu", dtype=cast or torch.bfloat16, enabled=cast is not None):
            out = self.net.score(x.to(p.dtype), t.to(p.dtype))
        out = out.to(x.dtype)
        hn = self.high_noise
        if hn is None:
            return out
        td = t.to(torch.float64)
        a = self.sde.mean_coeff(td)
        std = self.sde.std(td)
        w = 1.0 / (1.0 + (std / a / hn["sigma_c"]) ** 4)
        mu = hn["mean"] if mean is None else mean
        shape = (-1, *([1] * (x.ndim - 1)))
        # score of N(mu, var·I) diffused to t: −(x − a mu) / (a² var + std²)
        gauss = -(x - (a * mu).reshape(shape).to(x.dtype)) / (a**2 * hn["var"] + std**2).reshape(shape).to(x.dtype)
        w = w.reshape(shape).to(x.dtype)
        return w * out + (1 - w) * gauss

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Score ``∇ log p_t(x)`` in normalised space.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W), real or complex
            Complex images are scored as real and imaginary parts.
        t : Tensor, shape (B,) or scalar
            Diffusion time in ``[eps, 1]``.

        Returns
        -------
        Tensor, shape and dtype of ``x``
        """
        t = torch.as_tensor(t, device=x.device)
        if x.is_complex():
            b = x.shape[0]
            tt = t.expand(b) if t.ndim == 0 else t
            hn = self.high_noise
            mean = None
            if hn is not None:  # the real part has the data's mean, the imaginary part 0
                mean = torch.cat([torch.full((b,), hn["mean"]), torch.zeros(b)]).double().to(x.device)
            s = self._real_score(torch.cat([x.real, x.imag]), torch.cat([tt, tt]), mean)
            return torch.complex(s[:b], s[b:])
        return self._real_score(x, t)

    def denoise(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Tweedie estimate ``E[x_0 | x_t] = (x_t + std(t)^2 score) / a(t)``.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W), real or complex
        t : Tensor, shape (B,) or scalar

        Returns
        -------
        Tensor, shape and dtype of ``x``
        """
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64)
        tt = t.expand(x.shape[0]) if t.ndim == 0 else t
        std = self.sde.std(tt).reshape(-1, 1, 1, 1)
        a = self.sde.mean_coeff(tt).reshape(-1, 1, 1, 1)
        rdt = x.real.dtype
        return (x + std.to(rdt) ** 2 * self.score(x, tt.to(rdt))) / a.to(rdt)

    def denoise_sigma(self, y: Tensor, sigma: float) -> Tensor:
        """Denoise ``y = x + sigma n`` (normalised space) with Tweedie's formula."""
        return tweedie_denoise(self.score, self.sde, y, sigma)

    # --- files --------------------------------------------------------------------------
    def save(
        self,
        directory: str | Path,
        name: str,
        *,
        dtype: torch.dtype = torch.float16,
        card: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write ``NAME.safetensors`` and ``NAME.json`` into ``directory``; return the card path.

        Parameters
        ----------
        directory : path
        name : str
        dtype : torch.dtype
            Storage dtype of floating tensors (fp16 halves the file).
        card : dict, optional
            Extra card entries (training, validation, solver defaults, ...), merged over
            ``self.card``.
        overwrite : bool
            Replace existing files.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        wpath, cpath = directory / f"{name}.safetensors", directory / f"{name}.json"
        if not overwrite and (wpath.exists() or cpath.exists()):
            raise InputError(wpath, "exists; pass overwrite=True to replace it")
        tensors = {
            k: (
                v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
            ).contiguous()
            for k, v in self.net.unet.state_dict().items()
        }
        tmp = wpath.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp), metadata={"format": CARD_FORMAT, "name": name})
        os.chmod(tmp, 0o644)
        os.replace(tmp, wpath)
        full = {**self.card, **(card or {})}
        full.update(
            {
                "format": CARD_FORMAT,
                "name": name,
                "weights": wpath.name,
                "dtype": str(dtype).replace("torch.", ""),
                "architecture": {
                    **self.net.spec.to_dict(),
                    "sigma_data": self.net.sigma_data,
                    "network": "monai.networks.nets.DiffusionModelUNet",
                    "parameters": sum(v.numel() for v in tensors.values()),
                },
                "sde": self.sde.to_dict(),
                "normaliser": self.normaliser.to_dict(),
                "sha256": sha256_file(wpath),
            }
        )
        write_card(cpath, full)
        self.card = full
        return cpath

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ScorePrior:
        """Load a prior by registry name (``"ct-256"``) or by the path of its card or weights.

        The weights file's sha256 must match the card; the file is parsed with safetensors
        (no pickle).

        Raises
        ------
        InputError
            Missing, corrupt, truncated or mismatched files (the message names the file).
        SettingsError
            Unknown registry name (with the nearest known names).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        p = Path(name_or_path)
        if p.suffix in (".json", ".safetensors") or p.exists():
            cpath = p.with_suffix(".json")
        else:
            from medrecon.priors.registry import shipped_registry

            cpath = shipped_registry().card_path(str(name_or_path))
        if not cpath.is_file():
            raise InputError(cpath, "model card not found")
        card = read_card(cpath)
        _check_card(card, cpath)
        wpath = cpath.parent / card.get("weights", cpath.with_suffix(".safetensors").name)
        if not wpath.is_file():
            raise InputError(wpath, "weights file not found")
        data = wpath.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != card["sha256"]:
            raise InputError(
                wpath,
                f"sha256 {digest[:16]}… does not match the model card "
                f"({str(card['sha256'])[:16]}…): the file is corrupt, truncated or "
                "belongs to another card",
            )
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise InputError(wpath, f"not a readable safetensors file ({err})") from err
        try:
            spec = NetworkSpec.from_dict(
                {
                    k: v
                    for k, v in card["architecture"].items()
                    if k not in ("sigma_data", "network", "parameters")
                }
            )
            sde = sde_from_dict(card["sde"])
            norm = Normaliser.from_dict(card["normaliser"])
        except SettingsError as err:
            raise InputError(cpath, f"model card settings are invalid ({err})") from err
        net = ScoreNet(spec, sde, sigma_data=float(card["architecture"].get("sigma_data", 0.2)))
        try:
            net.unet.load_state_dict(
                {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                strict=True,
            )
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise InputError(
                wpath, f"weights do not match the architecture in {cpath.name}: {first}"
            ) from err
        prior = cls(net.to(device=device, dtype=dtype), norm, card)
        prior.eval()
        return prior
