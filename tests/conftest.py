"""Shared test setup: deterministic, single-threaded-friendly torch on CPU."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
