"""Tests of medrecon.priors: SDEs, networks, ScorePrior files, registry and the trainer (tiny nets)."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
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
from medrecon.priors.train import (
    PatchSampler,
    TrainConfig,
    dsm_loss,
    export_prior,
    load_checkpoint,
    train,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_prior(sde=None, seed: int = 0) -> ScorePrior:
    torch.manual_seed(seed)
    net = ScoreNet(network_spec("tiny"), sde or VESDE(0.01, 20.0), sigma_data=0.2)
    return ScorePrior(net, ct_normaliser(), {"modality": "ct", "resolution": [32, 32]})


@pytest.fixture
def toy_npz(tmp_path: Path) -> Path:
    """24 CT-like 32x32 slices in HU: air background, a soft-tissue disc, a bright spot."""
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    imgs = []
    for _ in range(24):
        cy, cx, r = g.uniform(12, 20), g.uniform(12, 20), g.uniform(6, 12)
        im = np.full((32, 32), -1000.0)
        im[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 40.0
        by, bx = g.integers(8, 24, 2)
        im[by - 1 : by + 2, bx - 1 : bx + 2] = 1200.0
        imgs.append(im)
    p = tmp_path / "toy.npz"
    np.savez(p, images=np.asarray(imgs, np.int16))
    return p


def tiny_config(tmp_path: Path, data: Path, **kw) -> TrainConfig:
    base = dict(
        run="toy",
        data=(str(data),),
        modality="ct",
        size="tiny",
        sigma_max=20.0,
        patch_size=16,
        batch_size=4,
        lr=1e-3,
        warmup_steps=1,
        max_steps=4,
        out_dir=str(tmp_path / "run"),
        validate_every_s=0,
        sample_every_s=0,
        progress=False,
        log_every=1,
        threads=None,
    )
    base.update(kw)
    return TrainConfig(**base)


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


# design fields a `--preset` run must share with the shipped weights it resumes (the learning
# rate and seed of a continuation may differ; the network, SDE, data and stopping rule may not)
_PRESET_DESIGN_FIELDS = ("modality", "size", "sde", "sigma_min", "sigma_max", "sigma_data",
                         "patch_size", "batch_size", "ema_decay", "data", "val_data",
                         "val_slices", "validate_every_s", "patience", "min_delta_db",
                         "coords", "patch_sizes", "patch_probs", "patch_batch", "data_weights")


@pytest.mark.parametrize("name", ["ct-256", "mri-256"])
def test_training_preset_reproduces_the_shipped_design(name):
    """`--preset NAME` trains what the card of the shipped NAME says it was trained with, and
    its plateau rule is the documented one: three 20-minute validations, an hour, without +0.02 dB."""
    from medrecon.priors.train import PRESETS

    reg = shipped_registry()
    if name not in reg.names():
        pytest.skip(f"{name} is not shipped in medrecon/priors/weights")
    trained = reg.card(name)["training"]["config"]
    preset = TrainConfig(**PRESETS[name])
    for field in _PRESET_DESIGN_FIELDS:
        got = getattr(preset, field)
        got = list(got) if isinstance(got, tuple) else got
        want = trained.get(field, getattr(TrainConfig(), field))  # cards older than the field: its default
        want = list(want) if isinstance(want, tuple) else want
        assert got == want, f"{name}: preset {field}={got!r}, card {want!r}"
    assert preset.patience * preset.validate_every_s == 3600 and preset.min_delta_db == 0.02


# --- trainer --------------------------------------------------------------------------------
def test_dsm_loss_falls_on_toy_set(tmp_path, toy_npz):
    cfg = tiny_config(tmp_path, toy_npz, max_steps=80, lr=3e-3, batch_size=8)
    from medrecon.priors.train import load_slices

    images = load_slices(cfg.data, "ct")
    fixed = PatchSampler(images, 32, 16, seed=99).next_batch()

    def eval_loss(net):
        with torch.no_grad():
            return float(dsm_loss(net, cfg.build_sde(), fixed, torch.Generator().manual_seed(5)))

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # the trainer's seeded initialisation
        before = eval_loss(ScoreNet(network_spec("tiny"), cfg.build_sde(), cfg.sigma_data))
    train(cfg)
    ck = load_checkpoint(Path(cfg.out_dir) / "last.pt")
    net = ScoreNet(network_spec("tiny"), cfg.build_sde(), cfg.sigma_data)
    net.load_state_dict(ck["model"])
    after = eval_loss(net)
    assert after < 0.7 * before, (before, after)
    log = (Path(cfg.out_dir) / "loss.csv").read_text().splitlines()
    assert log[0].startswith("step,") and len(log) == 81


def test_resume_takes_the_same_next_step(tmp_path, toy_npz):
    full = tiny_config(tmp_path / "a", toy_npz, max_steps=5)
    train(full)
    part = tiny_config(tmp_path / "b", toy_npz, max_steps=3)
    r = train(part)
    assert r["step"] == 3
    r = train(replace(part, max_steps=5))
    assert r["step"] == 5
    a = load_checkpoint(Path(full.out_dir) / "last.pt")
    b = load_checkpoint(Path(part.out_dir) / "last.pt")
    for key in ("model", "ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    assert a["sampler"]["pos"] == b["sampler"]["pos"] and torch.equal(
        a["noise_rng"], b["noise_rng"]
    )
    # resuming with other settings is refused
    with pytest.raises(SettingsError, match="other settings"):
        train(replace(part, sigma_max=30.0, max_steps=6))


def _torchrun(out: Path, data: Path, *extra: str) -> dict:
    """``medrecon train`` under torchrun with two CPU processes (gloo), tiny settings."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medrecon.priors.train", "--data", str(data), "--modality", "ct",
           "--size", "tiny", "--sigma-max", "20", "--patch-size", "16", "--batch-size", "2",
           "--lr", "1e-3", "--warmup-steps", "1", "--out-dir", str(out), "--validate-every-s", "0",
           "--sample-every-s", "0", "--progress", "false", "--log-every", "1", "--threads", "1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, p.stdout  # rank 0 alone reports
    return json.loads(lines[0])


def test_ddp_two_cpu_processes_train_resume_exactly_and_stop_together(tmp_path, toy_npz):
    """The DDP path, run for real on CPU (gloo): two ranks draw different batches, the
    checkpoint holds both ranks' streams, 4 steps + resume to 6 equals 6 straight, and a time
    limit stops both ranks at the same step (a rank stopping alone would hang the other)."""
    straight = _torchrun(tmp_path / "a", toy_npz, "--max-steps", "6")
    assert straight["step"] == 6
    ck_a = load_checkpoint(tmp_path / "a" / "last.pt")
    ranks = ck_a["rank_states"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["noise_rng"], ranks[1]["noise_rng"])
    assert not torch.equal(ranks[0]["sampler"]["gen"], ranks[1]["sampler"]["gen"])
    assert _torchrun(tmp_path / "b", toy_npz, "--max-steps", "4")["step"] == 4
    assert _torchrun(tmp_path / "b", toy_npz, "--max-steps", "6")["step"] == 6
    ck_b = load_checkpoint(tmp_path / "b" / "last.pt")
    for key in ("model", "ema"):
        for k, v in ck_a[key].items():
            assert torch.equal(v, ck_b[key][k]), (key, k)
    log = (tmp_path / "b" / "loss.csv").read_text().splitlines()
    assert [ln.split(",")[0] for ln in log[1:]] == ["1", "2", "3", "4", "5", "6"]
    timed = _torchrun(tmp_path / "c", toy_npz, "--max-steps", "100000", "--max-time-s", "0")
    assert timed["stopped_by"] == "max_time" and timed["step"] == 1


def test_sigterm_checkpoints_and_stops(tmp_path, toy_npz):
    cfg = tiny_config(tmp_path, toy_npz, max_steps=10**6, checkpoint_every_s=1e9)
    before = signal.getsignal(signal.SIGTERM)

    def send_when_handled() -> None:
        # a loaded host may take longer than any fixed delay to reach train()'s handler: wait for it
        deadline = time.monotonic() + 120
        while signal.getsignal(signal.SIGTERM) is before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Thread(target=send_when_handled)
    timer.start()
    r = train(cfg)
    timer.join()
    assert r["stopped_by"] == "signal" and r["step"] > 0
    assert load_checkpoint(Path(cfg.out_dir) / "last.pt")["step"] == r["step"]


def exported_tiny_with_curve(tmp_path: Path, toy_npz: Path, rows: list[dict]) -> Path:
    """Card of a 2-step tiny prior, exported, whose card carries the validation curve ``rows``
    (as a run continued from it with ``init_from`` finds it)."""
    cfg = tiny_config(tmp_path, toy_npz, max_steps=2)
    train(cfg)
    card = export_prior(Path(cfg.out_dir) / "last.pt", tmp_path / "w", "toy-32",
                        card={"modality": "ct", "resolution": [32, 32]})
    first = json.loads(card.read_text())
    first["validation"] = {"during_training": {"rows": rows}}
    card.write_text(json.dumps(first))
    return card


def test_export_and_init_from_shipped_weights(tmp_path, toy_npz):
    # a validation curve on the starting card (rows up to its 2 steps; a row past them came from
    # a run these weights do not descend from), which the continued run's card must extend
    card = exported_tiny_with_curve(tmp_path, toy_npz,
                                    [{"step": s, "sigma0.1": 20.0 + s} for s in (1, 2, 5)])
    prior = ScorePrior.load(card)
    assert prior.card["training"]["steps"] == 2 and prior.card["dtype"] == "float16"
    cfg2 = tiny_config(
        tmp_path, toy_npz, max_steps=1, out_dir=str(tmp_path / "run2"), init_from=str(card),
        val_data=str(toy_npz), val_slices=2, validate_every_s=1e-9,
    )
    r = train(cfg2)
    ck = load_checkpoint(Path(cfg2.out_dir) / "last.pt")
    assert r["step"] == 1 and ck["optimizer"]["state"][0]["step"] == 1  # fresh optimiser
    # the exported card counts the steps the initial weights had already had
    card2 = ScorePrior.load(export_prior(Path(cfg2.out_dir) / "last.pt", tmp_path / "w2", "toy-32b"))
    training = card2.card["training"]
    assert training["steps"] == 3 and "2 earlier steps" in training["resumed_from"]
    assert training["wall_time_s"] >= prior.card["training"]["wall_time_s"]
    curve = json.loads(export_prior(Path(cfg2.out_dir) / "last.pt", tmp_path / "w", "toy-32",
                                    overwrite=True, validate_on=str(toy_npz)).read_text())
    rows = curve["validation"]["during_training"]["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["sigma0.1"] == 22.0


@pytest.mark.parametrize(
    "means, patience, delta, stop",
    [
        ([30.0, 30.5, 31.0], 1, 0.02, False),  # still improving
        ([30.0, 31.0, 30.99], 1, 0.02, True),  # the last one fell short of the best earlier one
        ([30.0, 31.0, 31.01], 1, 0.02, True),  # better, but by less than min_delta
        ([30.0, 31.0, 30.0, 31.01], 2, 0.02, True),  # two without +0.02 dB over 31.0
        ([30.0, 31.0, 30.0, 31.03], 2, 0.02, False),
        ([30.0, 31.0], 2, 0.02, False),  # too few validations to judge
        ([30.0, 29.0, 28.0], 0, 0.02, False),  # patience 0: never
    ],
)
def test_validation_plateau_rule(means, patience, delta, stop):
    from medrecon.priors.train import validation_curve, validation_plateau

    # two noise levels whose mean is the given value, as val.csv holds them
    rows = [{"step": i, "wall_s": 0.0, "psnr_sigma0.1": m + 1, "psnr_sigma0.2": m - 1} for i, m in enumerate(means)]
    assert validation_plateau(validation_curve({"steps": 0}, rows), patience, delta) is stop


@pytest.mark.parametrize("earlier_means, stopped_by, step", [
    # the curve carried over peaked far above: the first validation (step 1) stops the run, at
    # the next step (the one all ranks agree on); judged on this run's rows alone it could not
    # stop before step 3
    ((20.0, 1000.0), "plateau", 2),
    ((-100.0, -50.0), "max_steps", 1),  # the carried curve is below this run: go on
])
def test_plateau_rule_judges_the_init_from_cards_curve_too(tmp_path, toy_npz, earlier_means,
                                                           stopped_by, step):
    """A run continued from shipped weights (a later session, a new machine, no val.csv) judges
    the whole curve: the starting card's validations, then its own."""
    card = exported_tiny_with_curve(tmp_path, toy_npz, [
        {"step": s, "sigma0.1": m, "sigma0.2": m} for s, m in zip((1, 2), earlier_means, strict=True)])
    r = train(tiny_config(tmp_path, toy_npz, max_steps=step + 3 * (stopped_by == "plateau"),
                          out_dir=str(tmp_path / "run2"),
                          init_from=str(card), val_data=str(toy_npz), val_slices=2,
                          validate_every_s=1e-9, patience=1, min_delta_db=0.02))
    assert (r["stopped_by"], r["step"]) == (stopped_by, step)


def test_training_stops_on_a_validation_plateau_and_export_keeps_measurements(tmp_path, toy_npz):
    """patience=1 with an unreachable min_delta: the second validation ends the run (at the next
    step, the one all ranks agree on); the exported card carries the validation curve, and a
    re-export keeps the tuned settings and calibrations made on the replaced card."""
    from medrecon.priors.train import read_val_log

    cfg = tiny_config(tmp_path, toy_npz, max_steps=50, val_data=str(toy_npz), val_slices=2,
                      validate_every_s=1e-9, patience=1, min_delta_db=1000.0)
    r = train(cfg)
    rows = read_val_log(Path(cfg.out_dir) / "val.csv")
    # (step 3 validates too: the stop is taken after the step's bookkeeping)
    assert r["stopped_by"] == "plateau" and [int(x["step"]) for x in rows] == [1, 2, 3] and r["step"] == 3
    card = export_prior(Path(cfg.out_dir) / "last.pt", tmp_path / "w", "toy-32",
                        card={"modality": "ct", "resolution": [32, 32]}, validate_on=str(toy_npz))
    saved = json.loads(card.read_text())
    curve = saved["validation"]["during_training"]
    assert [x["step"] for x in curve["rows"]] == [1, 2, 3] and "sigma0.1" in curve["rows"][0]
    saved["tuned"] = {"parallel-4": {"ccdf": {"t0": 0.3}}}
    saved["calibration"] = {"parallel-4": {"ccdf": {"std_scale": 2.0, "weights_sha256": saved["sha256"]},
                                           "song": {"std_scale": 3.0}}}  # older entry, no hash
    card.write_text(json.dumps(saved))
    again = json.loads(export_prior(Path(cfg.out_dir) / "last.pt", tmp_path / "w", "toy-32",
                                    card={"modality": "ct"}, overwrite=True).read_text())
    # kept, tied to the weights they were measured on: a new export does not apply them silently
    assert again["tuned"] == {"parallel-4": {"ccdf": {"t0": 0.3, "weights_sha256": saved["sha256"]}}}
    kept = again["calibration"]["parallel-4"]
    assert kept["ccdf"] == saved["calibration"]["parallel-4"]["ccdf"]
    assert kept["song"] == {"std_scale": 3.0, "weights_sha256": saved["sha256"]}  # made on those weights
    with pytest.raises(SettingsError, match="patience"):
        tiny_config(tmp_path, toy_npz, patience=-1)


def test_reserved_and_bad_data_refused(tmp_path):
    with pytest.raises(SettingsError, match="reserved"):
        TrainConfig(data=("ct/val.npz",))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"junk")
    with pytest.raises(InputError, match="bad.npz"):
        train(tiny_config(tmp_path, bad))


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


@pytest.mark.parametrize("n, shape", [(1, (10, 10)), (2, (10, 20)), (4, (10, 40)), (5, (20, 40))])
def test_sample_grid_has_no_empty_columns(tmp_path, n, shape):
    from matplotlib import image as mpimg

    from medrecon.priors.train import save_grid_png

    path = tmp_path / "grid.png"
    save_grid_png(torch.full((n, 1, 8, 8), 0.5), path)
    back = mpimg.imread(path)
    assert back.shape[:2] == shape and not (tmp_path / "grid.tmp.png").exists()


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
