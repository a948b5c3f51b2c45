"""Shared test setup: seeded, single-threaded torch on CPU."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """The test models are tiny and gain nothing from intra-op threads, while on a shared 2-core
    machine OpenMP spin-waits make every op wait for a descheduled thread (3x slower): run each test
    single-threaded, then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
