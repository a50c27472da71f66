"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny nets run fastest on one thread, and two OpenMP threads stall on a busy 2-core host."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
