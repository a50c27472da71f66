"""Position-aware priors (issue 23): coordinate channels, valid-box patches, mixed patch sizes,
the ct-256-pos preset, and old cards without coordinates (tiny nets, CI-sized)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medrecon.datasets.training import dihedral, npz_source_info, patch_origin, valid_boxes
from medrecon.errors import InputError, SettingsError, ShapeError
from medrecon.priors import VESDE, ScoreNet, ScorePrior, ct_normaliser, network_spec
from medrecon.priors.networks import NetworkSpec, image_coords, widen_for_coords
from medrecon.priors.registry import shipped_registry
from medrecon.priors.train import (
    CARD_INFO,
    CT_GROWN_DATA,
    PRESETS,
    RESERVED,
    PatchSampler,
    TrainConfig,
    build_parser,
    card_training_data,
    config_from_args,
    export_prior,
    licence_summary,
    load_checkpoint,
    load_training_data,
    runtime_info,
    train,
)

DATA = Path(os.environ.get("MEDRECON_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def coord_net(seed: int = 0, speak: bool = True) -> ScoreNet:
    """A tiny position-aware net whose (zero-initialised) output layer has been perturbed, so
    its output depends on its inputs."""
    torch.manual_seed(seed)
    net = ScoreNet(replace(network_spec("tiny"), coords=True), VESDE(0.01, 20.0)).eval()
    if speak:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def pixel_of(coords: torch.Tensor, frame: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert image_coords: (row, col) in the frame of each pixel of a (2, h, w) field."""
    h, w = frame
    col = ((coords[0].double() + 1) * w - 1) / 2
    row = ((coords[1].double() + 1) * h - 1) / 2
    assert torch.allclose(col, col.round(), atol=1e-4) and torch.allclose(row, row.round(), atol=1e-4)
    return row.round().long(), col.round().long()


# --- coordinates ----------------------------------------------------------------------------
def test_image_coords_are_pixel_centres_of_the_whole_frame():
    c = image_coords(256, 256)
    assert c.shape == (1, 2, 256, 256)
    # channel 0 is x (the column), channel 1 is y (the row): -1 + (2i + 1)/256
    assert float(c[0, 0, 7, 0]) == pytest.approx(-255 / 256) and float(c[0, 0, 7, 255]) == pytest.approx(255 / 256)
    assert float(c[0, 1, 0, 9]) == pytest.approx(-255 / 256) and float(c[0, 1, 128, 9]) == pytest.approx(1 / 256)
    # a patch at (top, left) of a 256 x 256 slice gets those pixels' coordinates
    patch = image_coords(64, 64, top=100, left=30, frame=(256, 256))
    torch.testing.assert_close(patch, c[..., 100:164, 30:94])
    # a flip of the frame negates the coordinate
    torch.testing.assert_close(c[0, 0].flip(-1), -c[0, 0])


# (k quarter turns, flip) -> where patch pixels A = (0, 0) and B = (0, 1) of a 4 x 4 patch end up,
# worked out by hand from torch.rot90 ((i, j) -> (3 - j, i) per turn) and a left-right flip
DIHEDRAL_TABLE = {
    (0, False): ((0, 0), (0, 1)),
    (1, False): ((3, 0), (2, 0)),
    (2, False): ((3, 3), (3, 2)),
    (3, False): ((0, 3), (1, 3)),
    (0, True): ((0, 3), (0, 2)),
    (1, True): ((3, 3), (2, 3)),
    (2, True): ((3, 0), (3, 1)),
    (3, True): ((0, 0), (1, 0)),
}


@pytest.mark.parametrize("k, flip", list(DIHEDRAL_TABLE), ids=lambda v: str(v))
def test_coordinates_follow_each_of_the_8_flips_and_rotations(k, flip):
    """A 4 x 4 patch at (top, left) = (2, 5) of a 16 x 16 slice: after each transform, the pixel
    that was the slice's (2, 5) still carries x = -5/16, y = -11/16 and (2, 6) x = -3/16, and
    the image moved the same way."""
    frame = (16, 16)
    img = torch.arange(256, dtype=torch.float32).reshape(16, 16)[2:6, 5:9]
    c = image_coords(4, 4, top=2, left=5, frame=frame)[0]
    ti, tc = dihedral(img, k, flip), dihedral(c, k, flip)
    (ar, ac), (br, bc) = DIHEDRAL_TABLE[(k, flip)]
    assert float(ti[ar, ac]) == 2 * 16 + 5 and float(ti[br, bc]) == 2 * 16 + 6
    assert (float(tc[0, ar, ac]), float(tc[1, ar, ac])) == (-5 / 16 - 0.0, 5 / 16 - 1)
    assert (float(tc[0, br, bc]), float(tc[1, br, bc])) == (-3 / 16, 5 / 16 - 1)
    # every pixel: its coordinates point back at the slice pixel whose value it carries
    row, col = pixel_of(tc, frame)
    assert torch.equal(ti, (row * 16 + col).float())


def test_sampler_coordinates_point_back_at_each_pixels_source_under_all_transforms():
    """Index-coded slices: for every pixel of every drawn patch, its coordinates name the slice
    pixel whose value it carries; all 8 transforms and all sizes occur."""
    n, h, w = 6, 32, 32
    codes = torch.arange(n * h * w, dtype=torch.float32).reshape(n, h, w)  # exact in float32
    s = PatchSampler(codes, 3, None, 11, patch_sizes=(8, 16, 32), patch_batch=(3, 2, 1))
    seen, sizes = set(), Counter()
    for _ in range(60):
        x, c = s.next_batch_coords()
        assert c.shape == (x.shape[0], 2, *x.shape[-2:])
        sizes[x.shape[-1]] += 1
        for b in range(x.shape[0]):
            row, col = pixel_of(c[b], (h, w))
            slice_i = int(x[b, 0, 0, 0]) // (h * w)
            assert torch.equal(x[b, 0], codes[slice_i][row, col])
            # which transform: the directions in which x and y grow across the patch
            dx_col, dx_row = float(c[b, 0, 0, 1] - c[b, 0, 0, 0]), float(c[b, 0, 1, 0] - c[b, 0, 0, 0])
            dy_col, dy_row = float(c[b, 1, 0, 1] - c[b, 1, 0, 0]), float(c[b, 1, 1, 0] - c[b, 1, 0, 0])
            seen.add(tuple(np.sign([dx_col, dx_row, dy_col, dy_row])))
    assert len(seen) == 8 and set(sizes) == {8, 16, 32}


def test_no_augmentation_gives_the_plain_grid():
    images = torch.rand(4, 16, 16)
    s = PatchSampler(images, 4, 8, 0, augment=False)
    x, c = s.next_batch_coords()
    for b in range(4):
        row, col = pixel_of(c[b], (16, 16))
        assert torch.equal(row[:, 0], row[0, 0] + torch.arange(8)) and torch.equal(col[0], col[0, 0] + torch.arange(8))


# --- valid boxes and mixed sizes ------------------------------------------------------------
def boxed_set(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """40 slices of 32 x 32: inside a random box values in [0.25, 1], outside exactly 0."""
    g = np.random.default_rng(seed)
    images = torch.zeros(40, 32, 32)
    boxes = torch.zeros(40, 4, dtype=torch.int64)
    for i in range(40):
        if i % 4 == 0:
            r0, r1, c0, c1 = 0, 32, 0, 32  # whole slices
        else:
            hh, ww = g.integers(8, 31, 2)
            r0, c0 = g.integers(0, 33 - hh), g.integers(0, 33 - ww)
            r1, c1 = r0 + hh, c0 + ww
        boxes[i] = torch.tensor([r0, r1, c0, c1])
        images[i, r0:r1, c0:c1] = 0.25 + 0.75 * torch.from_numpy(g.random((r1 - r0, c1 - c0))).float()
    return images.to(torch.float16), boxes


def test_patches_stay_inside_valid_box_over_many_draws():
    images, boxes = boxed_set()
    s = PatchSampler(images, 4, None, 3, boxes=boxes, patch_sizes=(8, 16, 32),
                     patch_probs=(0.5, 0.3, 0.2), patch_batch=(4, 2, 1))
    sizes = Counter()
    for _ in range(400):
        x, c = s.next_batch_coords()
        sizes[x.shape[-1]] += 1
        assert float(x.min()) >= 0.25  # no pixel from outside any box
        for b in range(x.shape[0]):
            row, col = pixel_of(c[b], (32, 32))
            hits = [
                i for i in range(40)
                if torch.equal(images[i][row, col].float(), x[b, 0])
                and int(boxes[i, 0]) <= int(row.min()) and int(row.max()) < int(boxes[i, 1])
                and int(boxes[i, 2]) <= int(col.min()) and int(col.max()) < int(boxes[i, 3])
            ]
            assert hits, "patch is not a crop inside a valid box"
    # the size draw follows the probabilities (400 batches: 200 / 120 / 80 expected)
    assert 160 < sizes[8] < 240 and 85 < sizes[16] < 155 and 50 < sizes[32] < 110


def test_patch_origin_covers_the_box_and_nothing_else():
    box = (27, 229, 29, 227)
    corners = {patch_origin(box, 64, u, v) for u in range(300) for v in range(0, 300, 7)}
    tops = {t for t, _ in corners}
    assert min(tops) == 27 and max(tops) == 229 - 64 and len(tops) == 229 - 64 - 27 + 1
    assert all(29 <= left <= 227 - 64 for _, left in corners)
    with pytest.raises(SettingsError, match="does not fit"):
        patch_origin(box, 256, 0, 0)


def test_sizes_no_slice_can_hold_and_bad_settings_are_refused():
    images, boxes = boxed_set()
    boxes[:] = torch.tensor([0, 20, 0, 20])
    images = images.clone()
    with pytest.raises(SettingsError, match="no slice can give a 32"):
        PatchSampler(images, 2, None, 0, boxes=boxes, patch_sizes=(8, 32))
    with pytest.raises(SettingsError, match="whole-slice"):
        PatchSampler(images, 2, None, 0, boxes=boxes)
    with pytest.raises(SettingsError, match="patch_size=None"):
        TrainConfig(patch_sizes=(64, 128))
    with pytest.raises(SettingsError, match="patch_probs"):
        TrainConfig(patch_size=None, patch_sizes=(64, 128), patch_probs=(1.0,))
    with pytest.raises(SettingsError, match="multiples of 8"):
        TrainConfig(patch_size=None, patch_sizes=(64, 100))
    with pytest.raises(SettingsError, match="data_weights"):
        TrainConfig(data=("a.npz",), data_weights=(1.0, 2.0))


def test_valid_boxes_are_read_and_checked(tmp_path):
    z = {"images": np.zeros((2, 10, 12)), "valid_box": np.array([[1, 9, 2, 12], [0, 10, 0, 12]])}
    assert valid_boxes(z, 2, (10, 12), "f.npz").tolist() == [[1, 9, 2, 12], [0, 10, 0, 12]]
    assert valid_boxes({"images": 0}, 2, (10, 12), "f.npz").tolist() == [[0, 10, 0, 12]] * 2
    with pytest.raises(InputError, match="bad.npz.*row 1"):
        valid_boxes({"valid_box": np.array([[1, 9, 2, 12], [0, 11, 0, 12]])}, 2, (10, 12), "bad.npz")
    with pytest.raises(InputError, match=r"\(2, 4\)"):
        valid_boxes({"valid_box": np.zeros((3, 4), int)}, 2, (10, 12), "bad.npz")
    p = tmp_path / "boxed.npz"
    np.savez(p, images=np.full((2, 10, 12), -1024, np.int16), valid_box=z["valid_box"])
    _, boxes, owner = load_training_data([str(p), str(p)], "ct")
    assert boxes.tolist() == z["valid_box"].tolist() * 2 and owner.tolist() == [0, 0, 1, 1]


def test_data_weights_set_each_files_share_of_the_draws(tmp_path):
    for name, n in (("a", 30), ("b", 10)):
        np.savez(tmp_path / f"{name}.npz", images=np.random.default_rng(n).integers(-1000, 1000, (n, 16, 16)).astype(np.int16))
    cfg = TrainConfig(data=(str(tmp_path / "a.npz"), str(tmp_path / "b.npz")), modality="ct",
                      patch_size=8, batch_size=50, data_weights=(0.2, 0.8), size="tiny")
    from medrecon.priors.train import _make_sampler

    images, boxes, owner = load_training_data(cfg.data, "ct")
    s = _make_sampler(cfg, images, boxes, owner, 0)
    picks = [int(owner[s._next_index()]) for _ in range(2000)]
    assert 0.74 < np.mean(picks) < 0.86  # file b: 80 % of the draws though 25 % of the slices


@pytest.mark.skipif(not (DATA / "ct/extra/ibsi_ct_radiomics_phantom_lung.npz").is_file(),
                    reason="needs MEDRECON_DATA with ct/extra")
def test_real_crops_give_patches_inside_their_valid_box_only():
    """The CancerData lung crop (201 x 204 of real data on a 256 x 256 canvas padded with
    -1024 HU): every patch of every size lies inside its valid_box, so none holds padding
    (exactly 0 after normalisation; the real data's minimum is -1000 HU); 256 does not fit."""
    path = str(DATA / "ct/extra/ibsi_ct_radiomics_phantom_lung.npz")
    images, boxes, _ = load_training_data([path], "ct")
    assert (boxes[:, 1] - boxes[:, 0]).max() < 256
    s = PatchSampler(images, 2, None, 5, boxes=boxes, patch_sizes=(64, 128, 192), patch_batch=(4, 2, 1))
    for _ in range(60):
        x, c = s.next_batch_coords()
        assert float(x.min()) > 0  # no -1024 HU padding
        for b in range(x.shape[0]):
            row, col = pixel_of(c[b], (256, 256))
            r0, r1, c0, c1 = boxes[0].tolist()  # one box for the whole series
            assert r0 <= int(row.min()) and int(row.max()) < r1 and c0 <= int(col.min()) and int(col.max()) < c1
    with pytest.raises(SettingsError, match="no slice can give a 256"):
        PatchSampler(images, 1, None, 0, boxes=boxes, patch_sizes=(64, 256))


# --- the position-aware network ---------------------------------------------------------------
@pytest.mark.parametrize("hw", [(256, 256), (64, 64), (48, 80), (30, 21), (7, 9), (1, 1)])
def test_position_aware_net_evaluates_whole_images_of_any_size(hw):
    net = coord_net()
    x = torch.rand(2, 1, *hw)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        out = net(x, t)
        # the default is the whole image's grid; padded sizes continue it over the padding
        explicit = net(x, t, image_coords(*hw))
    assert out.shape == x.shape and torch.isfinite(out).all()
    if min(hw) > 1:  # (explicit coordinates of a 1-pixel axis have no slope to continue)
        torch.testing.assert_close(out, explicit, rtol=1e-5, atol=1e-6)


def test_position_aware_net_uses_the_coordinates_of_patches():
    net = coord_net()
    x = torch.rand(1, 1, 32, 32)
    t = torch.tensor([0.4])
    with torch.no_grad():
        whole = net(x, t)
        # the same pixels as the top-left patch of a 256 x 256 slice or as its centre
        corner = net(x, t, image_coords(32, 32, top=0, left=0, frame=(256, 256)))
        centre = net(x, t, image_coords(32, 32, top=112, left=112, frame=(256, 256)))
        flipped = net(x, t, image_coords(32, 32).flip(-1))
    assert float((corner - centre).abs().max()) > 1e-4 and float((whole - flipped).abs().max()) > 1e-4
    # batch-1 coordinates broadcast over the batch; a wrong shape is named
    with torch.no_grad():
        two = net(x.expand(2, -1, -1, -1), t.expand(2), image_coords(32, 32, top=112, left=112, frame=(256, 256)))
    torch.testing.assert_close(two[1:], centre)
    with pytest.raises(ShapeError, match=r"coords must be \(1 or 1, 2, 32, 32\)"):
        net(x, t, image_coords(16, 16))
    with pytest.raises(SettingsError, match="no coordinate channels"):
        ScoreNet(network_spec("tiny"), VESDE())(x, t, image_coords(32, 32))


def test_position_aware_prior_keeps_the_score_api_and_round_trips(tmp_path):
    """prior.score / denoise take (x, t) as before (coordinates built inside); the card's
    architecture records the option; save + load is bit-exact."""
    prior = ScorePrior(coord_net(), ct_normaliser(), {"modality": "ct", "resolution": [32, 32]})
    prior.precision = "float32"  # exact comparison with the bare network below
    x, t = torch.rand(2, 1, 24, 40), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        s = prior.score(x, t)
        torch.testing.assert_close(s, prior.net.score(x, t, image_coords(24, 40)))
        assert prior.denoise(x, 0.3).shape == x.shape
        assert prior.score(torch.complex(x, x), t).is_complex()
    card = prior.save(tmp_path, "pos", dtype=torch.float32)
    arch = json.loads(card.read_text())["architecture"]
    assert arch["coords"] is True and "whole-image frame" in arch["coord_channels"]
    back = ScorePrior.load(card)
    back.precision = "float32"
    assert back.net.spec.coords and back.net.spec == prior.net.spec
    with torch.no_grad():
        torch.testing.assert_close(back.score(x, t), s)


def test_widened_weights_start_as_the_net_without_coordinates():
    torch.manual_seed(0)
    plain = ScoreNet(network_spec("tiny"), VESDE(0.01, 20.0)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    pos = ScoreNet(replace(network_spec("tiny"), coords=True), VESDE(0.01, 20.0)).eval()
    pos.unet.load_state_dict(widen_for_coords(plain.unet.state_dict()))
    x, t = torch.rand(2, 1, 24, 24), torch.tensor([0.2, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(pos(x, t), plain(x, t))


# --- old cards --------------------------------------------------------------------------------
def test_old_cards_without_coordinates_load_and_run(tmp_path):
    """A card written before the option (no ``coords`` key) loads as a plain net, and the
    architecture a plain net writes is unchanged (no new keys)."""
    torch.manual_seed(0)
    plain = ScorePrior(ScoreNet(network_spec("tiny"), VESDE(0.01, 20.0)), ct_normaliser(), {"modality": "ct"})
    card = plain.save(tmp_path, "old", dtype=torch.float32)
    arch = json.loads(card.read_text())["architecture"]
    assert "coords" not in arch and "coord_channels" not in arch
    assert set(arch) == {"size", "channels", "num_res_blocks", "attention_levels", "norm_num_groups",
                         "num_head_channels", "in_channels", "out_channels", "sigma_data", "network",
                         "parameters"}
    back = ScorePrior.load(card)
    assert back.net.spec.coords is False and back.net.unet.conv_in.conv.weight.shape[1] == 1
    assert NetworkSpec.from_dict({k: v for k, v in arch.items() if k not in ("sigma_data", "network", "parameters")}) == network_spec("tiny")
    with torch.no_grad():
        assert back.score(torch.rand(1, 1, 30, 21), 0.5).shape == (1, 1, 30, 21)


@pytest.mark.parametrize("name, coords", [("ct-256", True), ("mri-256", True)])
def test_shipped_priors_verify_and_run_with_coordinates(name, coords):
    """ct-256 and mri-256 (v2) are position-aware (cards without coordinates: the tiny exported
    card above, which loads as a network without them)."""
    reg = shipped_registry()
    if name not in reg.names():
        pytest.skip(f"{name} is not shipped")
    card = reg.card(name)
    weights = reg.card_path(name).with_suffix(".safetensors")
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == card["sha256"]
    assert bool(card["architecture"].get("coords", False)) is coords
    prior = ScorePrior.load(name)  # verifies the sha256 itself
    assert prior.net.spec.coords is coords
    assert prior.net.unet.conv_in.conv.weight.shape[1] == 1 + 2 * coords
    with torch.no_grad():
        out = prior.score(torch.rand(1, 1, 40, 40), 0.5)
    assert out.shape == (1, 1, 40, 40) and torch.isfinite(out).all()


# --- trainer, preset, card --------------------------------------------------------------------
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


def test_single_size_sampler_keeps_the_earlier_random_stream():
    """With one size and no boxes the batches are those of the sampler before boxes, sizes and
    coordinates (the same draws, in the same order), so older runs resume exactly."""

    def earlier_batches(images, batch, p, seed, n):  # the sampler as it was
        gen = torch.Generator().manual_seed(seed)
        perm, pos, out = torch.randperm(len(images), generator=gen), 0, []
        h, w = images.shape[1:]
        for _ in range(n):
            crops = []
            for _ in range(batch):
                if pos >= len(perm):
                    perm, pos = torch.randperm(len(images), generator=gen), 0
                img = images[int(perm[pos])]
                pos += 1
                r = torch.randint(0, 2**31 - 1, (10,), generator=gen).tolist()
                for k in range(4):
                    y0, x0 = r[2 * k] % (h - p + 1), r[2 * k + 1] % (w - p + 1)
                    crop = img[y0 : y0 + p, x0 : x0 + p]
                    if float(crop.float().std()) > 0.01:
                        break
                crop = torch.rot90(crop, k=r[8] % 4, dims=(0, 1))
                if r[9] % 2:
                    crop = torch.flip(crop, dims=(1,))
                crops.append(crop)
            out.append(torch.stack(crops).unsqueeze(1).float())
        return out

    images = torch.rand(7, 24, 24).to(torch.float16)
    images[2] = 0.0  # flat air: exercises the re-draws
    s = PatchSampler(images, 3, 8, 42)
    for want in earlier_batches(images, 3, 8, 42, 10):
        assert torch.equal(s.next_batch(), want)


def test_grown_ct_presets_list_every_file_and_keep_validation_out():
    for name in ("ct-256-grown", "ct-256-pos"):
        cfg = TrainConfig(**PRESETS[name])
        assert cfg.data == CT_GROWN_DATA and cfg.val_data == "ct/val.npz"
        assert not any(r in d for d in cfg.data for r in RESERVED)
        assert {e["file"] for e in CARD_INFO[name]["training_data"]} == set(cfg.data)
        summary = licence_summary(card_training_data(cfg.data, CARD_INFO[name]["training_data"]))
        assert summary == {
            "non_commercial": ["ct/extra/dashvtk_midrc_ricord1a.npz", "ct/extra/ibsi_ct_radiomics_phantom_lung.npz"],
            "origin_undocumented": ["ct/extra/cornerstonedemo_ct_chest.npz", "ct/extra/cornerstonetools_bellona_chest.npz",
                                    "ct/extra/itkelastix_4dct_phase00.npz", "ct/volumes/promed_ct0051_head.npz"],
        }
    pos = TrainConfig(**PRESETS["ct-256-pos"])
    assert pos.coords and pos.patch_size is None and 256 in pos.patch_sizes and pos.network_spec().coords
    assert [p * p * b for p, b in zip(pos.patch_sizes, pos.patch_batch, strict=True)] == [65536] * 3


@pytest.mark.parametrize("name, modality", [("ct-256", "ct"), ("mri-256", "mri")])
def test_shipped_presets_continue_the_position_aware_design_and_keep_v1(name, modality):
    """The shipped NAME (v2) is NAME-pos continued from the shipped weights; NAME-v1 still
    trains v1's design (64² patches, no coordinates) and keeps v1's card text."""
    v2, pos, v1 = (TrainConfig(**PRESETS[n]) for n in (name, f"{name}-pos", f"{name}-v1"))
    assert v2.init_from == name and v2.run == name and v2.modality == v1.modality == modality
    assert {k: v for k, v in vars(v2).items() if k not in ("run", "init_from")} == \
        {k: v for k, v in vars(pos).items() if k not in ("run", "init_from")}
    assert v2.coords and not v1.coords and v1.patch_size == 64 and not v1.patch_sizes and v1.init_from is None
    assert set(v1.data) <= set(v2.data) and v1.val_data == v2.val_data and v1.sigma_max == v2.sigma_max
    assert "coordinate" in CARD_INFO[name]["design"] and "coordinate" not in CARD_INFO[f"{name}-v1"]["design"]
    kept = CARD_INFO[name]["design_comparison"]["designs"]
    assert any("(kept)" in d and "coordinates" in d for d in kept)
    assert set(PRESETS) <= set(CARD_INFO), "every preset has its card text"


@pytest.mark.skipif(not (DATA / "ct/extra").is_dir() or not (DATA / "ct/val.npz").is_file(),
                    reason="needs MEDRECON_DATA with ct/extra and ct/val.npz")
def test_grown_ct_data_matches_the_card_and_shares_nothing_with_validation():
    """Slice counts and patients of the card entries match the files; no patient of
    ct/val.npz is in the grown training set (the one file without a real PatientID, the
    ITKElastix phase, is also checked slice by slice for identical pixels)."""
    with np.load(DATA / "ct/val.npz") as z:
        val_ids = {str(v) for v in z["patient_id"]}
        val_hashes = {hashlib.sha256(s.tobytes()).hexdigest() for s in z["images"]}
    slices: Counter = Counter()
    patients: Counter = Counter()
    for e in CARD_INFO["ct-256-pos"]["training_data"]:
        slices[e["file"]] += e["slices"]
        patients[e["file"]] += e["patients"]
    for f in CT_GROWN_DATA:
        info = npz_source_info(DATA / f, name=f)
        assert info["slices"] == slices[f] and info.get("patients", 1) == patients[f], f
        with np.load(DATA / f) as z:
            ids = {str(v) for v in np.atleast_1d(z["patient_id"])}
            assert ids and not val_ids & ids, f
            if f.endswith("itkelastix_4dct_phase00.npz"):
                assert not val_hashes & {hashlib.sha256(s.tobytes()).hexdigest() for s in z["images"]}


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
