"""Shared test setup: seeded, single-threaded torch on CPU; benchmark scripts loaded as modules."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_benchmark():
    """-> load(name): benchmarks/<name>.py imported as a module (the folder is not a package)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


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
