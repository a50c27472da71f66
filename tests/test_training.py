"""Tests of medrecon.training: the loop, checkpoints and exact resumes, DDP, signals, the
plateau rule, export and the command line (tiny nets on toy data, CI-sized)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medrecon.errors import InputError, SettingsError
from medrecon.priors import ScoreNet, ScorePrior, network_spec
from medrecon.training import (
    CARD_INFO,
    PRESETS,
    PatchSampler,
    TrainConfig,
    build_parser,
    config_from_args,
    dsm_loss,
    export_prior,
    load_checkpoint,
    runtime_info,
    train,
)
from medrecon.training.data import load_slices
from medrecon.training.domain import measure_domain

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


# --- loop, checkpoints, DDP, signals -----------------------------------------------------------
def test_dsm_loss_falls_on_toy_set(tmp_path, toy_npz):
    cfg = tiny_config(tmp_path, toy_npz, max_steps=80, lr=3e-3, batch_size=8)
    from medrecon.training import load_slices

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


def test_resume_with_other_data_keeps_the_weights_and_records_what_came_before(tmp_path, toy_npz, capsys):
    """A campaign may drop a file (the 3-D tuning volume) or add one: the run resumes its weights
    and optimiser with fresh data streams, and the checkpoint and the exported card keep the
    files the earlier steps were trained on."""
    other = tmp_path / "other.npz"
    other.write_bytes(toy_npz.read_bytes())
    both = replace(tiny_config(tmp_path, toy_npz, max_steps=3), data=(str(toy_npz), str(other)), data_weights=(0.5, 0.5))
    train(both)
    before = load_checkpoint(Path(both.out_dir) / "last.pt")
    one = replace(both, data=(str(toy_npz),), data_weights=(), max_steps=5)
    assert train(one)["step"] == 5
    assert "data and data_weights differ" in capsys.readouterr().err
    ck = load_checkpoint(Path(both.out_dir) / "last.pt")
    assert ck["optimizer"]["state"][0]["step"] == 5  # the optimiser went on
    assert not torch.equal(ck["model"][next(iter(ck["model"]))], before["model"][next(iter(before["model"]))])
    assert ck["earlier"]["data_history"] == [
        {"until_step": 3, "data": [str(toy_npz), str(other)], "data_weights": [0.5, 0.5]}]
    card = json.loads(export_prior(Path(both.out_dir) / "last.pt", tmp_path / "w", "toy-d").read_text())
    assert card["training"]["data_history"][0]["until_step"] == 3
    gone = [e for e in card["training_data"] if e["file"] == str(other)]
    assert len(gone) == 1 and gone[0]["trained_until_step"] == 3 and "first 3 steps" in gone[0]["note"]


def _torchrun(out: Path, data: Path, *extra: str) -> dict:
    """``medrecon train`` under torchrun with two CPU processes (gloo), tiny settings."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medrecon.training", "--data", str(data), "--modality", "ct",
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


# --- export, validation curve, plateau rule ----------------------------------------------------
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
    # export loads the training slices once for the blend and the domain: the domain block is
    # the one measured from the files
    val = load_slices([str(toy_npz)], "ct").float().numpy()
    assert curve["domain"] == json.loads(json.dumps(measure_domain(list(cfg2.data), "ct", None, val)))


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
    from medrecon.training import validation_curve, validation_plateau

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
    from medrecon.training import read_val_log

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


@pytest.mark.parametrize("n, shape", [(1, (10, 10)), (2, (10, 20)), (4, (10, 40)), (5, (20, 40))])
def test_sample_grid_has_no_empty_columns(tmp_path, n, shape):
    from matplotlib import image as mpimg

    from medrecon.training import save_grid_png

    path = tmp_path / "grid.png"
    save_grid_png(torch.full((n, 1, 8, 8), 0.5), path)
    back = mpimg.imread(path)
    assert back.shape[:2] == shape and not (tmp_path / "grid.tmp.png").exists()


# --- position-aware runs (issue 23) ------------------------------------------------------------
@pytest.fixture
def toy_boxed_npz(tmp_path: Path) -> Path:
    """16 CT-like 32 x 32 slices; half are 'crops' with a valid_box and -1024 padding."""
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    imgs, boxes = [], []
    for i in range(16):
        im = np.full((32, 32), -1000.0)
        im[(yy - 16) ** 2 + (xx - g.uniform(12, 20)) ** 2 < g.uniform(8, 13) ** 2] = 40.0
        im += g.normal(0, 20, im.shape)
        box = [0, 32, 0, 32] if i % 2 else [2, 30, 3, 27]
        im[: box[0]], im[box[1]:], im[:, : box[2]], im[:, box[3]:] = -1024, -1024, -1024, -1024
        imgs.append(im)
        boxes.append(box)
    p = tmp_path / "toy_boxed.npz"
    np.savez(p, images=np.asarray(imgs, np.int16), valid_box=np.asarray(boxes, np.int32),
             licence=np.array(["CC BY-NC 4.0 (toy)"]), patient_id=np.array([f"P{i // 4}" for i in range(16)]))
    return p


def tiny_pos_config(tmp_path: Path, data: Path, **kw) -> TrainConfig:
    """The ct-256-pos preset with a tiny net, the toy data and sizes 8 / 16 / 32 (= whole)."""
    base = dict(PRESETS["ct-256-pos"])
    base.update(data=(str(data),), data_weights=(), size="tiny", sigma_max=20.0, patch_sizes=(8, 16, 32),
                patch_batch=(4, 2, 1), lr=1e-3, warmup_steps=1, max_steps=4, val_data=None,
                out_dir=str(tmp_path / "run"), validate_every_s=0, sample_every_s=0, progress=False,
                log_every=1, threads=None)
    base.update(kw)
    return TrainConfig(**base)


def test_position_aware_preset_trains_resumes_and_exports_a_card_that_loads(tmp_path, toy_boxed_npz):
    cfg = tiny_pos_config(tmp_path, toy_boxed_npz, max_steps=3)
    r = train(cfg)
    assert r["step"] == 3 and np.isfinite(r["last_loss"]) and r["runtime"]["threads"] >= 1
    r = train(replace(cfg, max_steps=5))  # resumes exactly from the checkpoint
    assert r["step"] == 5
    straight = train(replace(cfg, max_steps=5, out_dir=str(tmp_path / "straight")))
    a, b = (load_checkpoint(Path(d) / "last.pt") for d in (cfg.out_dir, straight["out_dir"]))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    info = {k: v for k, v in CARD_INFO["ct-256-pos"].items() if k != "training_data"}
    card_path = export_prior(Path(cfg.out_dir) / "last.pt", tmp_path / "w", "toy-pos",
                             card={**info, "resolution": [32, 32]}, validate_on=str(toy_boxed_npz))
    prior = ScorePrior.load(card_path)
    card = prior.card
    assert prior.net.spec.coords and card["architecture"]["coords"] is True
    assert card["training"]["config"]["patch_sizes"] == [8, 16, 32] and card["training"]["runtime"]["threads"] >= 1
    # the file is listed with its licence as found, and flagged as not reviewed
    (entry,) = card["training_data"]
    assert entry["licence"] == "CC BY-NC 4.0 (toy)" and entry["patients"] == 4 and entry["licence_reviewed"] is False
    assert card["licence_summary"] == {"licence_not_reviewed": [str(toy_boxed_npz)]}
    assert "tweedie_psnr_db" in card["validation"]
    with torch.no_grad():
        for hw in ((32, 32), (24, 40)):
            assert prior.score(torch.rand(1, 1, *hw), 0.4).shape == (1, 1, *hw)


def test_position_aware_run_can_start_from_weights_without_coordinates(tmp_path, toy_boxed_npz):
    plain = tiny_pos_config(tmp_path, toy_boxed_npz, coords=False, max_steps=2, out_dir=str(tmp_path / "plain"))
    train(plain)
    card = export_prior(Path(plain.out_dir) / "last.pt", tmp_path / "w", "plain",
                        card={"modality": "ct", "resolution": [32, 32]})
    pos = tiny_pos_config(tmp_path, toy_boxed_npz, init_from=str(card), max_steps=1, lr=0.0,
                          out_dir=str(tmp_path / "pos"))
    train(pos)
    ck = load_checkpoint(Path(pos.out_dir) / "last.pt")
    src = ScorePrior.load(card)
    assert ck["model"]["unet.conv_in.conv.weight"].shape[1] == 3
    torch.testing.assert_close(ck["model"]["unet.conv_in.conv.weight"][:, 1:], torch.zeros_like(ck["model"]["unet.conv_in.conv.weight"][:, 1:]))
    torch.testing.assert_close(ck["model"]["unet.conv_in.conv.weight"][:, :1], src.net.unet.conv_in.conv.weight)
    with pytest.raises(SettingsError, match="another architecture"):
        train(replace(pos, size="S", out_dir=str(tmp_path / "pos2")))


def test_old_checkpoints_without_the_new_fields_resume(tmp_path, toy_boxed_npz):
    """A checkpoint written before the new settings existed (its config lacks them) resumes:
    the missing fields take their defaults."""
    cfg = tiny_pos_config(tmp_path, toy_boxed_npz, coords=False, patch_size=16, patch_sizes=(),
                          patch_probs=(), patch_batch=(), max_steps=2)
    train(cfg)
    path = Path(cfg.out_dir) / "last.pt"
    ck = torch.load(path, weights_only=True)
    for k in ("patch_sizes", "patch_probs", "patch_batch", "coords", "augment", "data_weights", "sample_count"):
        ck["config"].pop(k)
    torch.save(ck, path)
    assert train(replace(cfg, max_steps=3))["step"] == 3


# --- command line and runtime ---------------------------------------------------------------
def test_cli_takes_lists_and_threads():
    ns = build_parser().parse_args(["--preset", "ct-256-pos", "--patch-sizes", "64", "128",
                                    "--patch-probs", "0.7", "0.3", "--patch-batch", "16", "4",
                                    "--threads", "2"])
    cfg = config_from_args(ns)
    assert (cfg.patch_sizes, cfg.patch_probs, cfg.patch_batch, cfg.threads) == ((64, 128), (0.7, 0.3), (16, 4), 2)
    with pytest.raises(SettingsError, match="--patch-sizes takes int"):
        config_from_args(build_parser().parse_args(["--patch-sizes", "big"]))
    # the preset's per-file shares belong to its files: other --data drops them, unless given again
    own = config_from_args(build_parser().parse_args(["--preset", "ct-256", "--data", "a.npz", "b.npz"]))
    assert own.data == ("a.npz", "b.npz") and own.data_weights == ()
    own = config_from_args(build_parser().parse_args(["--preset", "ct-256", "--data", "a.npz", "b.npz",
                                                      "--data-weights", "1", "3"]))
    assert own.data_weights == (1.0, 3.0)
    assert config_from_args(build_parser().parse_args(["--preset", "ct-256"])).data_weights == PRESETS["ct-256"]["data_weights"]


def test_runtime_info_reports_threads_and_tcmalloc():
    info = runtime_info()
    assert info["threads"] == 1 and isinstance(info["tcmalloc"], bool)
    assert info["device"] == "cpu" or torch.cuda.is_available()
