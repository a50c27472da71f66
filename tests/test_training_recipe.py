"""The training recipe of issue 32: where the noise levels go, bfloat16 autocast, torch.compile.

Tiny nets on a toy set, CI-sized.  The throughput comparison itself (steps per second and
validation at equal wall time) is a benchmark, ``benchmarks/train_recipe.py``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medrecon.errors import SettingsError
from medrecon.priors import sigma_to_t
from medrecon.priors.networks import ScoreNet, network_spec
from medrecon.priors.sde import VESDE, VPSDE
from medrecon.training import (
    build_parser,
    config_from_args,
    dsm_loss,
    load_checkpoint,
    sample_t,
    train,
    train_autocast,
)

from test_training import tiny_config  # noqa: E402  (the trainer tests' tiny settings)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- where the noise levels go ----------------------------------------------------------
@pytest.mark.parametrize(
    "sde, focus, share",
    [
        (VESDE(0.01, 60.0), 0.5, 0.25),  # the shipped CT SDE, the recipe's values
        (VESDE(0.01, 110.0), 0.3, 0.1),  # the MRI SDE, another focus and share
        (VESDE(0.01, 60.0), 0.5, 1.0),  # share 1: uniform
        (VPSDE(0.1, 20.0), 0.5, 0.25),  # VP: the focus is a noise level of x_t / a(t) too
    ],
)
def test_focused_noise_levels_follow_the_config(sde, focus, share):
    """Histogram check: a share ``high_share`` of the draws is uniform in [eps, 1], the rest
    uniform in [eps, t(focus_sigma)], so P(t <= t_f) = (1 - share) + share · (t_f - eps)/(1 - eps)
    and the density above t_f is share/(1 - eps); below t_f the histogram is flat."""
    n = 200_000
    t = sample_t(sde, n, torch.Generator().manual_seed(0), dist="focused", focus_sigma=focus, high_share=share)
    assert t.shape == (n,) and float(t.min()) >= sde.eps and float(t.max()) <= 1.0
    t_f = float(sigma_to_t(sde, focus))
    frac_uniform_below = (t_f - sde.eps) / (1 - sde.eps)
    want_below = (1 - share) + share * frac_uniform_below
    got_below = float((t <= t_f).double().mean())
    tol = 4 * math.sqrt(want_below * (1 - want_below) / n) + 1e-9
    assert abs(got_below - want_below) < tol, (got_below, want_below)
    # flat below t_f: 10 equal bins hold equal counts (chi-square, 9 degrees of freedom)
    below = t[t <= t_f].double()
    if len(below) > 1000:
        counts = torch.histc(below, bins=10, min=sde.eps, max=t_f)
        expected = counts.sum() / 10
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 30.0, chi2  # p ≈ 4e-4 for 9 dof
    # above t_f: uniform with the remaining mass
    above = t[t > t_f].double()
    if share > 0 and len(above) > 1000:
        counts = torch.histc(above, bins=5, min=t_f, max=1.0)
        expected = counts.sum() / 5
        assert float(((counts - expected) ** 2 / expected).sum()) < 20.0


def test_uniform_draws_are_the_trainers_old_stream():
    """``t_dist="uniform"`` keeps the old recipe: t = eps + (1 - eps) u, with u the first of the
    two uniforms drawn per item; the focused draws take the same random numbers."""
    sde = VESDE(0.01, 60.0)
    g = torch.Generator().manual_seed(7)
    u = torch.rand(2, 64, generator=g)
    t = sample_t(sde, 64, torch.Generator().manual_seed(7))
    assert torch.allclose(t, sde.eps + (1 - sde.eps) * u[0])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    sample_t(sde, 64, g1)
    sample_t(sde, 64, g2, dist="focused")
    assert torch.equal(g1.get_state(), g2.get_state())


def test_recipe_settings_are_checked(tmp_path, toy_npz):
    with pytest.raises(SettingsError, match="t_dist"):
        tiny_config(tmp_path, toy_npz, t_dist="lognormal")
    with pytest.raises(SettingsError, match="precision"):
        tiny_config(tmp_path, toy_npz, precision="fp16")
    with pytest.raises(SettingsError, match="high_share"):
        tiny_config(tmp_path, toy_npz, t_dist="focused", high_share=1.5)
    with pytest.raises(SettingsError, match="sample_t"):
        sample_t(VESDE(0.01, 60.0), 4, torch.Generator(), dist="other")
    ns = build_parser().parse_args(["--precision", "bfloat16", "--t-dist", "focused",
                                    "--focus-sigma", "0.4", "--high-share", "0.2", "--compile", "false"])
    cfg = config_from_args(ns)
    assert (cfg.precision, cfg.t_dist, cfg.focus_sigma, cfg.high_share, cfg.compile) == \
        ("bfloat16", "focused", 0.4, 0.2, False)


# --- bfloat16 ----------------------------------------------------------------------------
def test_bf16_loss_and_gradients_track_float32():
    """One DSM loss and its gradients on a tiny net: bfloat16 autocast agrees with float32 to
    bfloat16's precision (8 bits of mantissa), the parameters and gradients stay float32."""
    sde = VESDE(0.01, 20.0)
    torch.manual_seed(0)
    net = ScoreNet(network_spec("tiny"), sde, 0.2)
    with torch.no_grad():  # the output layer starts at zero (output 0 in any arithmetic): give it weights
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    x0 = torch.rand(4, 1, 16, 16)

    def loss_and_grads(cast):
        net.zero_grad()
        gen = torch.Generator().manual_seed(1)
        t = sample_t(sde, 4, gen)
        loss = dsm_loss(net, sde, x0, gen, t=t, cast=cast)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])

    l32, g32 = loss_and_grads(None)
    l16, g16 = loss_and_grads(torch.bfloat16)
    assert l16.dtype == torch.float32 and g16.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert float(l16) != float(l32), "autocast changed nothing: the pass did not run in bfloat16"
    assert abs(float(l16) - float(l32)) < 0.03 * float(l32)
    cos = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
    assert cos > 0.98, cos
    assert float(g16.norm()) == pytest.approx(float(g32.norm()), rel=0.05)


def test_bf16_training_run_tracks_float32(tmp_path, toy_npz):
    """Twenty steps of the trainer in bfloat16 autocast stay close to the same twenty steps in
    float32 (same data and noise): the loss curves agree and the weights moved alike."""
    runs = {}
    for prec in ("float32", "bfloat16"):
        cfg = tiny_config(tmp_path / prec, toy_npz, max_steps=20, precision=prec)
        summary = train(cfg)
        assert summary["runtime"]["precision"] == prec
        loss = np.loadtxt(Path(cfg.out_dir) / "loss.csv", delimiter=",", skiprows=1, usecols=2)
        runs[prec] = (loss, load_checkpoint(Path(cfg.out_dir) / "last.pt")["model"])
    (l32, w32), (l16, w16) = runs["float32"], runs["bfloat16"]
    assert np.abs(l16 - l32).max() < 0.1 * l32.max(), (l16, l32)
    assert not np.array_equal(l16, l32), "the bfloat16 run computed exactly as float32"
    with torch.random.fork_rng():  # the trainer's seeded initialisation
        torch.manual_seed(cfg.seed)
        w0 = ScoreNet(network_spec("tiny"), cfg.build_sde(), cfg.sigma_data).state_dict()
    keys = [k for k in w0 if w0[k].is_floating_point()]
    d32 = torch.cat([(w32[k] - w0[k]).flatten() for k in keys])
    d16 = torch.cat([(w16[k] - w0[k]).flatten() for k in keys])
    assert float(d32.norm()) > 0
    assert float(torch.nn.functional.cosine_similarity(d16, d32, dim=0)) > 0.9
    assert float((d16 - d32).norm() / d32.norm()) < 0.5


def test_auto_precision_follows_the_cpu(monkeypatch):
    import medrecon.training.loop as loop

    monkeypatch.setattr(loop, "native_bf16", lambda: True)
    assert train_autocast("auto", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(loop, "native_bf16", lambda: False)
    assert train_autocast("auto", torch.device("cpu")) is None
    assert train_autocast("float32", torch.device("cpu")) is None
    assert train_autocast("bfloat16", torch.device("cpu")) is torch.bfloat16


def test_precision_and_noise_levels_may_change_on_resume(tmp_path, toy_npz):
    """The campaign switches recipe between sessions: precision, compile and the noise-level
    draws are not architecture, so a checkpoint resumes under other values (and the resumed
    run records the precision it used)."""
    cfg = tiny_config(tmp_path, toy_npz, max_steps=3)
    train(cfg)
    cfg2 = tiny_config(tmp_path, toy_npz, max_steps=5, precision="bfloat16", t_dist="focused")
    summary = train(cfg2)
    assert summary["step"] == 5 and summary["runtime"]["precision"] == "bfloat16"


# --- the campaign record -------------------------------------------------------------------
def test_campaign_record_accumulates_steps_cpu_hours_and_validation(tmp_path, toy_npz):
    """Each export appends a point (cumulative steps and CPU-hours, CPU, recipe, validation of
    the exported weights); a stage continued from a card carries that card's points forward."""
    from medrecon.priors import ScorePrior
    from medrecon.training import export_prior

    a = tiny_config(tmp_path / "a", toy_npz, max_steps=3, threads=1)
    train(a)
    card_a = ScorePrior.load(export_prior(Path(a.out_dir) / "last.pt", tmp_path / "w", "toy-a",
                                          validate_on=str(toy_npz))).card
    (pa,) = card_a["training"]["campaign"]
    assert pa["cumulative_steps"] == 3 and pa["run_steps"] == 3 and pa["threads"] == 1
    assert pa["cumulative_cpu_hours"] == card_a["training"]["cpu_hours"] >= 0
    assert pa["precision"] == "float32" and pa["t_dist"] == "uniform" and pa["cpu"]
    assert pa["tweedie_psnr_db"] == card_a["validation"]["tweedie_psnr_db"]
    b = tiny_config(tmp_path / "b", toy_npz, max_steps=2, init_from=str(tmp_path / "w" / "toy-a.json"),
                precision="bfloat16", t_dist="focused")
    train(b)
    card_b = ScorePrior.load(export_prior(Path(b.out_dir) / "last.pt", tmp_path / "w", "toy-b",
                                          validate_on=str(toy_npz))).card
    first, second = card_b["training"]["campaign"]
    assert first == pa
    assert second["cumulative_steps"] == 5 and second["run_steps"] == 2
    assert second["cumulative_cpu_hours"] >= pa["cumulative_cpu_hours"]
    assert (second["precision"], second["t_dist"]) == ("bfloat16", "focused")
    assert second["tweedie_psnr_db"] == card_b["validation"]["tweedie_psnr_db"]


def test_campaign_history_of_a_card_before_the_record():
    """A card exported before the record gets one point from its totals (one thread)."""
    from medrecon.training.campaign import campaign_history

    card = {"name": "ct-256", "training": {"steps": 19568, "wall_time_s": 38981.8, "runtime": {"threads": 1}},
            "validation": {"data": "ct/val.npz", "slices": 31, "tweedie_psnr_db": {"sigma0.05": 40.82}}}
    (p,) = campaign_history(card)
    assert p["cumulative_steps"] == 19568 and p["cumulative_cpu_hours"] == 10.83
    assert p["tweedie_psnr_db"] == {"sigma0.05": 40.82} and p["precision"] == "float32"
    assert campaign_history({"training": {}}) == []


# --- the cooldown ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "step, want",
    [
        (0, 1e-3 / 4),  # warm-up: (step + 1) / warmup_steps of lr
        (3, 1e-3),  # warm-up over, no cooldown yet
        (9, 1e-3),  # the step before the cooldown
        (10, 1e-3),  # the cooldown's first step is still at lr
        (15, 1e-5 + 0.5 * (1e-3 - 1e-5)),  # half way: the cosine's middle
        (20, 1e-5),  # over: lr_final
        (50, 1e-5),  # and after
    ],
)
def test_learning_rate_warms_up_then_cools_on_a_half_cosine(step, want):
    from medrecon.training import learning_rate

    cfg = tiny_config(Path("/unused"), Path("/unused.npz"), warmup_steps=4, lr_decay_steps=10,
                      lr_final=1e-5, lr_decay_from=10)
    assert learning_rate(cfg, step) == pytest.approx(want, rel=1e-12)
    assert learning_rate(replace(cfg, lr_decay_steps=0), step) == pytest.approx(
        1e-3 * min(1.0, (step + 1) / 4), rel=1e-12)  # no cooldown: constant after the warm-up


def test_cooldown_starts_where_the_run_resumes_and_a_resumed_cooldown_keeps_its_curve(tmp_path, toy_npz):
    """A cooled branch: 4 steps at constant lr, then a 6-step cooldown from step 4, interrupted
    after 2 steps and resumed; it ends at step 10 on its own, logs the cosine, and the exported
    card's campaign point records where the cooldown started."""
    import csv

    from medrecon.training import export_prior

    train(tiny_config(tmp_path, toy_npz, max_steps=4))
    cool = dict(lr_decay_steps=6, lr_final=1e-5)
    part = train(tiny_config(tmp_path, toy_npz, max_steps=6, **cool))
    assert part["step"] == 6 and part["stopped_by"] == "max_steps"
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["config"]["lr_decay_from"] == 4  # resolved and kept, not re-anchored at 6
    done = train(tiny_config(tmp_path, toy_npz, max_steps=100, **cool))  # the cooldown sets the end
    assert done["step"] == 10 and done["stopped_by"] == "cooldown"
    with open(tmp_path / "run" / "loss.csv") as f:
        lrs = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    for s in range(1, 11):  # the logged lr is the one of the step that led to it
        want = 1e-3 if s <= 5 else 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (s - 5) / 6))
        assert lrs[s] == pytest.approx(want, rel=1e-2), s
    card = __import__("json").loads(export_prior(tmp_path / "run" / "last.pt", tmp_path / "w", "toy-c").read_text())
    point = card["training"]["campaign"][-1]
    assert point["cooldown"] == {"from_run_step": 4, "steps": 6, "lr_final": 1e-5, "done_steps": 6}
    # the run is over: invoking it again takes no step
    assert train(tiny_config(tmp_path, toy_npz, max_steps=100, **cool))["step"] == 10


@pytest.mark.parametrize("kw", [dict(lr_decay_steps=-1), dict(lr_decay_steps=5, lr_final=1.0), dict(lr_final=-1e-6),
                                dict(lr_decay_from=-2)])
def test_cooldown_settings_are_checked(tmp_path, toy_npz, kw):
    with pytest.raises(SettingsError, match="lr_decay_steps"):
        tiny_config(tmp_path, toy_npz, **kw)


def test_cooldown_flags_reach_the_config():
    cfg = config_from_args(build_parser().parse_args(
        ["--preset", "ct-256", "--lr-decay-steps", "3500", "--lr-final", "1e-6", "--run", "ct-256-cool"]))
    assert (cfg.lr_decay_steps, cfg.lr_final, cfg.lr_decay_from, cfg.run) == (3500, 1e-6, None, "ct-256-cool")
