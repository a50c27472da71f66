"""Tests of medrecon.training.data: .npz slices, valid boxes, per-file draw shares and the
PatchSampler (coordinates under flips and rotations, mixed patch sizes, the random stream)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from medrecon.datasets.training import valid_boxes
from medrecon.errors import InputError, SettingsError
from medrecon.training import PatchSampler, TrainConfig, load_training_data

DATA = Path(os.environ.get("MEDRECON_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_sampler_coordinates_point_back_at_each_pixels_source_under_all_transforms(pixel_of):
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


def test_no_augmentation_gives_the_plain_grid(pixel_of):
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


def test_patches_stay_inside_valid_box_over_many_draws(pixel_of):
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
    from medrecon.training.data import _make_sampler

    images, boxes, owner = load_training_data(cfg.data, "ct")
    s = _make_sampler(cfg, images, boxes, owner, 0)
    picks = [int(owner[s._next_index()]) for _ in range(2000)]
    assert 0.74 < np.mean(picks) < 0.86  # file b: 80 % of the draws though 25 % of the slices


@pytest.mark.skipif(not (DATA / "ct/extra/ibsi_ct_radiomics_phantom_lung.npz").is_file(),
                    reason="needs MEDRECON_DATA with ct/extra")
def test_real_crops_give_patches_inside_their_valid_box_only(pixel_of):
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


# --- volumes as training sources (issue 32 item 5) ------------------------------------------
def _marked_head(n=40):
    """A (S, A, R) test volume: an asymmetric 'head' whose anterior and right sides are marked,
    indexed [superior, anterior, right] with anterior and right increasing with the index."""
    v = np.zeros((6, n, n), np.float32)
    v[:, 8:32, 10:30] = 100.0
    v[:, 28:31, 25:29] = 400.0  # anterior (high A), right (high R): the marker
    return v


def _display(v):
    """The expected display frame: anterior row first, the patient's right column first."""
    return v[:, ::-1, ::-1]


# (name, how the stored array is made from v[S, A, R], the affine's columns for the x, y, z array axes)
LAYOUTS = [
    ("RAS axial", lambda v: v, [(1, 0, 0), (0, 1, 0), (0, 0, 1)]),
    ("LPS axial (DICOM-like)", lambda v: v[:, ::-1, ::-1], [(-1, 0, 0), (0, -1, 0), (0, 0, 1)]),
    ("inferior first", lambda v: v[::-1], [(1, 0, 0), (0, 1, 0), (0, 0, -1)]),
    # IXI: array (R, S, P), affine columns x → P (−A), y → S, z → R
    ("sagittal R,S,P (IXI)", lambda v: np.transpose(v, (2, 0, 1))[:, :, ::-1], [(0, -1, 0), (0, 0, 1), (1, 0, 0)]),
]


@pytest.mark.parametrize(("name", "store", "cols"), LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_axial_display_slices_give_one_frame_whatever_the_stored_layout(name, store, cols):
    from medrecon.datasets.training import axial_display_slices

    v = _marked_head()
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(cols, dtype=np.float64).T * 2.0  # 2 mm voxels
    got = axial_display_slices(store(v), aff)
    np.testing.assert_array_equal(got, _display(v).astype(np.float32))
    # resampled to 1 mm and centred on a 100 canvas: the marker stays anterior-right
    big = axial_display_slices(store(v), aff, spacing_mm=1.0, size=100)
    assert big.shape == (6, 100, 100)
    rows, cols_ = np.nonzero(big[0] > 300)
    assert rows.max() < 50 and cols_.max() < 50, "marker must be in the upper left quadrant"
    assert np.abs(big[:, :10]).max() == 0 and np.abs(big[:, :, -10:]).max() == 0  # zero padding


def test_axial_display_slices_refuse_an_ambiguous_oblique_volume():
    from medrecon.datasets.training import axial_display_slices

    aff = np.eye(4)
    aff[:3, :3] = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]  # x and y both mostly along R
    with pytest.raises(InputError, match="R, A, S"):
        axial_display_slices(np.zeros((2, 4, 4)), aff)


def test_nifti_volume_trains_beside_npz_slices(tmp_path):
    """A NIfTI file in ``data`` gives 256² axial slices in [0, 1] (its 99.5th percentile → 1),
    near-empty slices left out, whole-slice boxes, and its own owner index."""
    import nibabel as nib

    v = np.zeros((128, 128, 10), np.float32)  # RAS axial, x = R
    v[30:100, 20:110, 2:8] = 50.0
    v[60:70, 60:70, 2:8] = 100.0
    nib.save(nib.Nifti1Image(v, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "vol.nii.gz")
    np.savez(tmp_path / "a.npz", images=np.full((3, 256, 256), 30000, np.uint16))
    x, boxes, owner = load_training_data([str(tmp_path / "a.npz"), str(tmp_path / "vol.nii.gz")], "mri")
    assert x.shape == (3 + 6, 256, 256) and x.dtype == torch.float16
    assert owner.tolist() == [0] * 3 + [1] * 6
    assert (boxes == torch.tensor([0, 256, 0, 256])).all()
    vol = x[3:].float()
    assert float(vol.min()) == 0.0 and abs(float(vol.max()) - 1.0) < 1e-3
    # 70 (R) x 90 (A) voxels of 2 mm at 0.9375 mm pixels: about 149 columns x 192 rows of head
    head = (vol[0] > 0.1).nonzero()
    assert abs(int(head[:, 1].max() - head[:, 1].min()) + 1 - 149) <= 3  # R extent → columns
    assert abs(int(head[:, 0].max() - head[:, 0].min()) + 1 - 192) <= 3  # A extent → rows


def test_a_volume_without_foreground_is_named(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="empty.nii.gz"):
        load_training_data([str(tmp_path / "empty.nii.gz")], "mri")


def test_the_mri_benchmark_volume_is_reserved():
    with pytest.raises(SettingsError, match="reserved"):
        TrainConfig(modality="mri", data=("mri/nifti/IXI012-HH-1211_T1.nii.gz",))


@pytest.mark.skipif(not (DATA / "mri" / "nifti").is_dir(), reason=f"MRI volumes not found under {DATA} "
                    "(set MEDRECON_DATA)")
def test_widened_mri_preset_reads_its_real_volumes_in_the_flair_frame():
    """mri-256 (v3 stage 3): FLAIR slices plus two real T1 volumes (IXI015 sagittal-stored, VS-SEG axial
    DICOM), every slice 256², in [0, 1], the T1 heads centred like the FLAIR ones."""
    from medrecon.training import PRESETS

    cfg = TrainConfig(**PRESETS["mri-256"])
    x, _, owner = load_training_data(cfg.data, "mri")
    counts = torch.bincount(owner).tolist()
    assert counts[0] == 1128 and counts[1] >= 80 and counts[2] >= 20
    assert float(x.float().amax()) <= 1.0
    for k in (1, 2):  # the centre of mass of each volume's middle slice sits near the canvas centre
        s = x[owner == k][int((owner == k).sum()) // 2].float()
        rr, cc = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
        com = (float((s * rr).sum() / s.sum()), float((s * cc).sum() / s.sum()))
        assert 100 < com[0] < 156 and 100 < com[1] < 156, (k, com)


def test_card_lists_volume_sources_with_their_slices(tmp_path):
    """The card's training_data names every volume: a curated entry keeps its licence text and
    gains the measured slice count; an uncurated one is listed as found, licence not reviewed."""
    import nibabel as nib

    from medrecon.training import card_training_data

    v = np.zeros((64, 64, 7), np.float32)
    v[10:50, 10:50, 1:6] = 10.0
    for name in ("a.nii.gz", "b.nii.gz"):
        nib.save(nib.Nifti1Image(v, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / name)
    a, b = str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")
    out = card_training_data([a, b], [{"file": a, "licence": "CC BY 4.0"}], "mri")
    assert out[0] == {"file": a, "licence": "CC BY 4.0", "slices": 5}
    assert out[1]["file"] == b and out[1]["slices"] == 5 and out[1]["volume"] is True
    assert out[1]["licence_reviewed"] is False and "0.9375 mm" in out[1]["resliced"]
