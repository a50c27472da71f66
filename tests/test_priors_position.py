"""Position-aware priors (issue 23): coordinate channels, flips and rotations, the position-aware
network, and old cards without coordinates (tiny nets, CI-sized).  The trainer's side (valid-box
patches, mixed patch sizes, the ct-256-pos preset) is in tests/test_training*.py."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch

from medrecon.datasets.training import dihedral, patch_origin
from medrecon.errors import SettingsError, ShapeError
from medrecon.priors import VESDE, ScoreNet, ScorePrior, ct_normaliser, network_spec
from medrecon.priors.networks import NetworkSpec, image_coords, widen_for_coords
from medrecon.priors.registry import shipped_registry

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
def test_coordinates_follow_each_of_the_8_flips_and_rotations(k, flip, pixel_of):
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


# --- valid boxes ----------------------------------------------------------------------------
def test_patch_origin_covers_the_box_and_nothing_else():
    box = (27, 229, 29, 227)
    corners = {patch_origin(box, 64, u, v) for u in range(300) for v in range(0, 300, 7)}
    tops = {t for t, _ in corners}
    assert min(tops) == 27 and max(tops) == 229 - 64 and len(tops) == 229 - 64 - 27 + 1
    assert all(29 <= left <= 227 - 64 for _, left in corners)
    with pytest.raises(SettingsError, match="does not fit"):
        patch_origin(box, 256, 0, 0)


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
