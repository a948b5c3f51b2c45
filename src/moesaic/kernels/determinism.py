"""Whether the caller needs bitwise-reproducible expert kernels (run to run, whatever the batch).

A backend with a path whose float sums depend on timing (the Triton "fused" path: fp32 atomics)
asks `deterministic_requested()` before taking it. True inside `with deterministic():` (the
inference engine enters it on every step when built with `deterministic=True`) and whenever
`torch.use_deterministic_algorithms(True)` is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

_REQUESTED: ContextVar[bool] = ContextVar("moesaic_deterministic", default=False)


@contextlib.contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Request reproducible kernels in this block (per thread / async context). `enabled=False` is a
    no-op (it cannot lift a request made further out), so callers can pass their own flag."""
    token = _REQUESTED.set(_REQUESTED.get() or bool(enabled))
    try:
        yield
    finally:
        _REQUESTED.reset(token)


def deterministic_requested() -> bool:
    """True inside `deterministic()` or under `torch.use_deterministic_algorithms(True)`."""
    return _REQUESTED.get() or torch.are_deterministic_algorithms_enabled()
