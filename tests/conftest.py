"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _operator_cache_exists():
    """Tests run with an operator cache folder that exists already, as after a first run, so
    that its one-time notice (tested in test_operators.py) is not in other tests' output."""
    from medrecon.operators.sparse import cache_dir

    folder = cache_dir()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)


@pytest.fixture
def one_thread():
    """Tiny nets run fastest on one thread, and two OpenMP threads stall on a busy 2-core host."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _pixel_of(coords: torch.Tensor, frame: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert image_coords: (row, col) in the frame of each pixel of a (2, h, w) field."""
    h, w = frame
    col = ((coords[0].double() + 1) * w - 1) / 2
    row = ((coords[1].double() + 1) * h - 1) / 2
    assert torch.allclose(col, col.round(), atol=1e-4) and torch.allclose(row, row.round(), atol=1e-4)
    return row.round().long(), col.round().long()


@pytest.fixture
def pixel_of():
    """``pixel_of(coords, frame)``: the (row, col) of each pixel of a coordinate field
    (``medrecon.priors.networks.image_coords``) in its whole slice (position-aware tests)."""
    return _pixel_of


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
