"""Tests of medrecon.priors: SDEs, networks, ScorePrior files and the registry (tiny nets).

The trainer's tests are tests/test_training*.py."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from medrecon.errors import InputError, SettingsError, ShapeError
from medrecon.priors import (
    VESDE,
    VPSDE,
    ScoreNet,
    ScorePrior,
    ct_normaliser,
    fit_high_noise,
    mri_normaliser,
    network_spec,
    sde_from_dict,
    sigma_to_t,
    tweedie_denoise,
)
from medrecon.priors.registry import PriorRegistry, shipped_registry


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_prior(sde=None, seed: int = 0) -> ScorePrior:
    torch.manual_seed(seed)
    net = ScoreNet(network_spec("tiny"), sde or VESDE(0.01, 20.0), sigma_data=0.2)
    return ScorePrior(net, ct_normaliser(), {"modality": "ct", "resolution": [32, 32]})


# --- SDEs -----------------------------------------------------------------------------------
def test_ve_sigma_and_marginal():
    sde = VESDE(0.01, 50.0)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        sde.sigma(t), torch.tensor([0.01, math.sqrt(0.01 * 50), 50.0], dtype=torch.float64)
    )
    x0 = torch.ones(3, 1, 4, 4)
    mean, std = sde.marginal(x0, t.float())
    assert torch.equal(mean, x0) and std.shape == (3, 1, 1, 1)
    _, g = sde.sde(x0, t.float())
    torch.testing.assert_close(g, sde.sigma(t).float() * math.sqrt(2 * math.log(5000.0)))
    _, G = sde.discretize(x0, torch.tensor([1.0, 1.0, 1.0]))
    s_prev = 0.01 * 5000.0 ** (1 - 1 / 1000)
    torch.testing.assert_close(G, torch.full((3,), math.sqrt(50.0**2 - s_prev**2)))


def test_vp_marginal_preserves_variance():
    sde = VPSDE()
    t = torch.linspace(0.01, 1, 7, dtype=torch.float64)
    a, s = sde.mean_coeff(t), sde.std(t)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(t))
    # DDPM discretisation: beta_i = beta(t) / N
    f, G = sde.discretize(
        torch.ones(1, 1, 2, 2, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(G, torch.tensor([math.sqrt(0.02)], dtype=torch.float64))


@pytest.mark.parametrize("sde", [VESDE(0.01, 60.0), VPSDE()])
def test_sigma_to_t_roundtrip_and_dict(sde):
    for s in (0.02, 0.1, 0.5):
        t = sigma_to_t(sde, s)
        ratio = sde.std(t) / sde.mean_coeff(t)
        assert abs(float(ratio) - s) < 1e-9
    assert sde_from_dict(sde.to_dict()) == sde
    with pytest.raises(SettingsError):
        sde_from_dict({"kind": "xx"})


def test_tweedie_is_exact_for_gaussian_data():
    # data x ~ N(0, v I): score of p_t is -x / (v + sigma^2), so Tweedie gives v / (v + s^2) y
    sde, v, s = VESDE(0.01, 50.0), 0.3, 0.2
    y = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    xh = tweedie_denoise(lambda x, t: -x / (v + sde.sigma(t).reshape(-1, 1, 1, 1) ** 2), sde, y, s)
    torch.testing.assert_close(xh, v / (v + s * s) * y)


# --- networks -------------------------------------------------------------------------------
def test_named_sizes_parameter_counts():
    n = {
        k: sum(p.numel() for p in ScoreNet(network_spec(k), VESDE()).parameters())
        for k in ("S", "M")
    }
    assert 3.0e6 < n["S"] < 3.4e6 and 17.5e6 < n["M"] < 19e6
    with pytest.raises(SettingsError, match="known: tiny, S, M"):
        network_spec("XL")


def test_scorenet_any_size_and_dtype():
    net = ScoreNet(network_spec("tiny"), VESDE()).double()
    x = torch.randn(2, 1, 30, 21, dtype=torch.float64)
    out = net.score(x, torch.tensor([0.3, 0.9], dtype=torch.float64))
    assert out.shape == x.shape and out.dtype == torch.float64
    with pytest.raises(SettingsError):
        net(torch.randn(1, 2, 16, 16, dtype=torch.float64), torch.ones(1))


def test_complex_input_uses_real_and_imaginary_parts():
    prior = tiny_prior().eval()
    xr, xi = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    t = torch.tensor([0.4, 0.6])
    with torch.no_grad():
        s = prior.score(torch.complex(xr, xi), t)
        torch.testing.assert_close(s.real, prior.score(xr, t))
        torch.testing.assert_close(s.imag, prior.score(xi, t))
        d = prior.denoise(torch.complex(xr, xi), t)
    assert d.is_complex() and d.shape == xr.shape


@pytest.mark.parametrize("sde", [VESDE(0.01, 20.0), VPSDE(0.1, 20.0)], ids=["ve", "vp"])
def test_high_noise_blend_follows_its_formula(sde):
    """With ``high_noise`` on the card the score is ``w·net + (1 − w)·gauss``, w = 1/(1 +
    (σ/σ_c)⁴) with σ = std/a, gauss the score of N(mean, var) diffused to t; the imaginary part
    of a complex image uses mean 0.  Without the entry the score is the network's."""
    prior = tiny_prior(sde).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for prm in prior.net.parameters():  # the output layer starts at zero: make it speak
            prm.add_(0.05 * torch.randn(prm.shape, generator=g))
    x = torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float64)
    hn = {"mean": 0.3, "var": 0.02, "sigma_c": 0.5}
    for sigma in (0.05, 0.5, 5.0):
        t = sigma_to_t(sde, sigma).double().expand(2)
        a, std = sde.mean_coeff(t).reshape(-1, 1, 1, 1), sde.std(t).reshape(-1, 1, 1, 1)
        w = 1 / (1 + (std / a / hn["sigma_c"]) ** 4)
        with torch.no_grad():
            prior.card.pop("high_noise", None)
            net = prior.score(x, t)
            assert float(net.abs().max()) > 0
            prior.card["high_noise"] = hn
            got = prior.score(x, t)
            z = prior.score(torch.complex(x, -x), t)
            prior.card.pop("high_noise")
            net_im = prior.score(-x, t)
        for part, xs, net_part, mean in ((got, x, net, 0.3), (z.real, x, net, 0.3), (z.imag, -x, net_im, 0.0)):
            want = w * net_part - (1 - w) * (xs - a * mean) / (a**2 * hn["var"] + std**2)
            torch.testing.assert_close(part, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    assert 0.49 < float(1 / (1 + 1.0**4)) < 0.51  # σ = σ_c: an even blend


def test_fit_high_noise_finds_where_the_gaussian_wins():
    """An untrained network is worse than the data mean at every noise level (σ_c is the
    first level), a perfect one never is (None: blend off); mean and variance are the
    training images'."""
    g = torch.Generator().manual_seed(0)
    train = 0.3 + 0.1 * torch.randn(6, 16, 16, generator=g)
    val = 0.3 + 0.1 * torch.randn(3, 16, 16, generator=g)
    res = fit_high_noise(tiny_prior().eval(), train, val, sigmas=(0.5, 1.0, 4.0))
    assert res["sigma_c"] == 0.5 and res["mean"] == pytest.approx(float(train.double().mean()), abs=1e-5)
    assert res["var"] == pytest.approx(float(train.double().var()), rel=1e-4)
    assert len(res["measured"]["rmse_net"]) == 3

    class Oracle(ScorePrior):  # Tweedie gives the clean image back: nothing beats it
        def denoise_sigma(self, y, sigma):
            return self._clean

    oracle = Oracle(tiny_prior().net, ct_normaliser(), {"high_noise": {"mean": 0, "var": 1, "sigma_c": 1}})
    oracle._clean = val.unsqueeze(1)
    res = fit_high_noise(oracle, train, val, sigmas=(0.5, 1.0), batch=3)
    assert res["sigma_c"] is None and oracle.card["high_noise"]["sigma_c"] == 1  # card restored


def test_prior_rejects_wrong_shape():
    with pytest.raises(ShapeError):
        tiny_prior().score(torch.randn(16, 16), 0.5)


def test_normalisers():
    n = ct_normaliser()
    hu = torch.tensor([-1024.0, 1024.0, 3071.0, 5000.0])
    torch.testing.assert_close(n.normalise(hu), torch.tensor([0.0, 0.5, 4095 / 4096, 1.0]))
    torch.testing.assert_close(n.denormalise(n.normalise(hu[:3])), hu[:3])
    m = mri_normaliser()
    with pytest.raises(SettingsError):
        m.normalise(torch.ones(3))
    x = torch.linspace(0, 200, 1001)
    assert abs(m.fit(x).high - 199.0) < 0.2


# --- files and registry -----------------------------------------------------------------------
def test_save_load_bit_exact(tmp_path):
    prior = tiny_prior()
    prior.save(tmp_path, "toy", dtype=torch.float32)
    back = ScorePrior.load(tmp_path / "toy.json")
    for (k, a), (_, b) in zip(
        prior.net.unet.state_dict().items(), back.net.unet.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        assert torch.equal(prior.eval().score(x, t), back.score(x, t))
    card = json.loads((tmp_path / "toy.json").read_text())
    assert (
        card["sde"]["kind"] == "ve"
        and card["normaliser"]["low"] == -1024
        and len(card["sha256"]) == 64
    )
    # fp16 storage: loading gives exactly the fp16-rounded weights
    prior.save(tmp_path, "toy16", dtype=torch.float16)
    half = ScorePrior.load(tmp_path / "toy16.safetensors")
    w = prior.net.unet.state_dict()
    for k, v in half.net.unet.state_dict().items():
        assert torch.equal(v, w[k].half().float()), k
    with pytest.raises(InputError, match="exists"):
        prior.save(tmp_path, "toy")


def test_corrupt_truncated_mismatched_files_name_the_file(tmp_path):
    prior = tiny_prior()
    card_path = prior.save(tmp_path, "p", dtype=torch.float32)
    w = tmp_path / "p.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(InputError, match=r"p\.safetensors.*sha256"):
        ScorePrior.load(card_path)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # corrupt
    w.write_bytes(bytes(bad))
    with pytest.raises(InputError, match=r"p\.safetensors"):
        ScorePrior.load(card_path)
    # not a safetensors file at all, with a matching hash
    w.write_bytes(b"not safetensors")
    card = json.loads(card_path.read_text())
    import hashlib

    card["sha256"] = hashlib.sha256(b"not safetensors").hexdigest()
    card_path.write_text(json.dumps(card))
    with pytest.raises(InputError, match=r"p\.safetensors.*safetensors"):
        ScorePrior.load(card_path)
    # mismatched: valid weights of another architecture under this card
    w.write_bytes(good)
    card["sha256"] = hashlib.sha256(good).hexdigest()
    card["architecture"]["channels"] = [16, 16, 32, 32]
    card_path.write_text(json.dumps(card))
    with pytest.raises(InputError, match=r"p\.safetensors.*do not match"):
        ScorePrior.load(card_path)
    with pytest.raises(InputError, match="not found"):
        ScorePrior.load(tmp_path / "missing.json")


def test_registry_duplicates_and_suggestions(tmp_path):
    reg = PriorRegistry()
    reg.register("ct-256", tmp_path / "a.json")
    with pytest.raises(SettingsError, match="already registered"):
        reg.register("ct-256", tmp_path / "b.json")
    with pytest.raises(SettingsError, match="did you mean 'ct-256'"):
        reg.card_path("ct256")
    tiny_prior().save(tmp_path, "demo")
    assert shipped_registry(tmp_path).names() == ["demo"]


def test_shipped_priors_load():
    reg = shipped_registry()
    if not reg.names():
        pytest.skip("no shipped priors in medrecon/priors/weights yet")
    for name in reg.names():
        prior = ScorePrior.load(name)
        card = reg.card(name)
        assert (
            card["name"] == name
            and os.path.getsize(reg.card_path(name).with_suffix(".safetensors")) <= 20e6
        )
        assert prior.score(torch.rand(1, 1, 32, 32), 0.5).shape == (1, 1, 32, 32)
        # the high-noise blend was measured at export (sigma_c, and the curves it came from)
        hn = prior.high_noise
        assert hn is not None and hn["sigma_c"] > 0 and 0 < hn["var"] < 1
        assert len(card["high_noise"]["measured"]["rmse_net"]) == len(card["high_noise"]["measured"]["sigma"])


def test_priors_cli_list_and_show(tmp_path, capsys):
    from medrecon.priors.cli import priors_main

    assert priors_main(["list"]) == 0
    names = shipped_registry().names()
    out = capsys.readouterr().out
    assert all(n in out for n in names)
    if names:
        assert priors_main(["show", names[0]]) == 0
        assert json.loads(capsys.readouterr().out)["name"] == names[0]
    with pytest.raises(SettingsError, match="unknown prior"):
        priors_main(["show", "no-such-prior"])


def test_docs_python_examples_run():
    if "ct-256" not in shipped_registry():
        pytest.skip("docs examples need the shipped ct-256 prior")
    text = (Path(__file__).resolve().parents[1] / "docs" / "priors.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert blocks
    for code in blocks:
        with torch.no_grad():
            exec(compile(code, "docs/priors.md", "exec"), {})


def test_score_layout_follows_gradients(tmp_path):
    """Without gradients the CPU net runs in channels-last layout (faster there), with gradients
    (DPS) in the default layout; the score is the same either way, and a prior whose layout was
    switched still saves bit-exact weights."""
    torch.manual_seed(0)
    prior = ScorePrior(ScoreNet(network_spec("tiny"), VESDE(0.01, 10.0)), ct_normaliser(), {"modality": "ct"})
    x, t = torch.rand(2, 1, 16, 16), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        s_fast = prior.score(x, t)
    conv = next(m for m in prior.net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    xg = x.clone().requires_grad_(True)
    s_grad = prior.score(xg, t)
    (g,) = torch.autograd.grad(s_grad.sum(), xg)
    assert conv.weight.is_contiguous() and torch.isfinite(g).all()
    torch.testing.assert_close(s_fast, s_grad.detach(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        prior.score(x, t)  # back to channels-last before saving
    card = prior.save(tmp_path, "layout", dtype=torch.float32)
    back = ScorePrior.load(card)
    for (k, a), (_, b) in zip(prior.net.state_dict().items(), back.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_precision_bf16_is_close_to_float32_and_float32_is_exact():
    """Gradient-free CPU evaluations autocast to bfloat16 when asked (or, with "auto", where the
    CPU has it natively): the Tweedie estimate stays within 1 % of the image range of float32's;
    "float32" gives the bare network's score exactly; gradients always run in float32; an
    unknown precision is refused."""
    torch.manual_seed(0)
    prior = ScorePrior(ScoreNet(network_spec("tiny"), VESDE(0.01, 20.0)), ct_normaliser(), {"modality": "ct"})
    prior.eval()
    x, t = torch.rand(2, 1, 32, 32), torch.tensor([0.2, 0.2])
    with torch.no_grad():
        prior.precision = "float32"
        exact = prior.denoise(x, t)
        torch.testing.assert_close(prior.score(x, t), prior.net.score(x, t))
        prior.precision = "bfloat16"
        approx = prior.denoise(x, t)
    assert approx.dtype == torch.float32 and float((approx - exact).abs().max()) < 0.01
    xg = x.clone().requires_grad_(True)
    assert prior._autocast_dtype(xg, grad=True) is None
    prior.precision = "fp8"
    with pytest.raises(SettingsError, match="precision"), torch.no_grad():
        prior.score(x, t)
