"""The expert-dispatch interface: the only place that chooses an implementation.

Shape legend: T tokens, D model dim, F expert hidden, G = 2F, E experts, K top-k.

    moe_experts(hidden_TD, w13_EGD, w2_EDF, expert_ids_TK, weights_TK) -> y_TD
    y[t] = sum_k weights[t, k] * w2[e] @ (silu(g) * u),  [g; u] = w13[e] @ hidden[t],  e = ids[t, k]

An expert id < 0 means "no expert" (a token dropped by capacity): it contributes nothing.
Backends register themselves with `register`; `reference` is always present and is the
oracle every other backend is tested against. `with deterministic():` asks every backend for
run-to-run reproducible arithmetic (backends skip their timing-dependent paths; determinism.py).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moesaic.kernels.determinism import deterministic, deterministic_requested

__all__ = ["moe_experts", "available_backends", "register", "Backend", "get_backend", "deterministic",
           "deterministic_requested"]

ExpertsFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """A registered implementation of `moe_experts`.

    `available()` says whether it can run here at all; `supports(hidden, w13)` whether it
    handles these particular inputs (device, dtype); `priority` orders the "auto" choice.
    """

    name: str
    fn: ExpertsFn
    available: Callable[[], bool] = lambda: True
    supports: Callable[[torch.Tensor, torch.Tensor], bool] = lambda h, w: True
    priority: int = 0


_BACKENDS: dict[str, Backend] = {}
_AVAILABLE: list[str] | None = None  # cached: availability probes may import heavy modules


def register(backend: Backend) -> None:
    """Add (or replace) a backend by name."""
    global _AVAILABLE
    _BACKENDS[backend.name] = backend
    _AVAILABLE = None


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, best first."""
    global _AVAILABLE
    if _AVAILABLE is None:
        ok = [b for b in _BACKENDS.values() if _safe(b.available)]
        # the submodule `kernels.sorted` shadows the builtin inside this package
        _AVAILABLE = [b.name for b in builtins.sorted(ok, key=lambda b: -b.priority)]
    return list(_AVAILABLE)


def _safe(f: Callable[[], bool]) -> bool:
    try:
        return bool(f())
    except Exception:  # a broken optional dependency makes a backend unavailable, not an error
        return False


def get_backend(name: str, hidden: torch.Tensor | None = None, w13: torch.Tensor | None = None) -> Backend:
    """Resolve a backend name ("auto" picks the best available one that supports the inputs)."""
    if name == "auto":
        for n in available_backends():
            b = _BACKENDS[n]
            if hidden is None or b.supports(hidden, w13):
                return b
        return _BACKENDS["reference"]
    if name not in _BACKENDS:
        raise ValueError(f"unknown MoE backend {name!r}; registered backends: {builtins.sorted(_BACKENDS)}")
    b = _BACKENDS[name]
    if name not in available_backends():
        raise ValueError(f"MoE backend {name!r} is not available on this machine; "
                         f"available: {available_backends()}")
    return b


def _check_inputs(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  ids: torch.Tensor, weights: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"moe_experts: hidden must be [T, D], got shape {tuple(hidden.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"moe_experts: w13 must be [E, 2F, D] and w2 [E, D, F], got {tuple(w13.shape)}, "
                         f"{tuple(w2.shape)}")
    e, g, d = w13.shape
    if g % 2 or w2.shape != (e, d, g // 2) or hidden.shape[1] != d:
        raise ValueError(f"moe_experts: inconsistent shapes hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)} (want [T, D], [E, 2F, D], [E, D, F])")
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"moe_experts: expert_ids and weights must both be [T, K] with T={hidden.shape[0]}, "
                         f"got {tuple(ids.shape)} and {tuple(weights.shape)}")
    if ids.dtype.is_floating_point:
        raise ValueError(f"moe_experts: expert_ids must be an integer tensor, got {ids.dtype}")


def moe_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Apply each token's chosen experts and combine them.

    Args:
        hidden: [T, D] token activations.
        w13: [E, 2F, D] stacked gate (first F rows) and up (last F rows) projections.
        w2: [E, D, F] stacked down projections.
        expert_ids: [T, K] integer expert indices (< 0: no expert).
        weights: [T, K] combine weights.
        backend: a name from `available_backends()` or "auto".
    Returns:
        [T, D] in hidden's dtype (under torch.autocast: in the autocast dtype, like F.linear).
    """
    _check_inputs(hidden, w13, w2, expert_ids, weights)
    hidden, w13, w2 = _autocast(hidden, w13, w2)
    return get_backend(backend, hidden, w13).fn(hidden, w13, w2, expert_ids, weights)


def _autocast(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor):
    """Under torch.autocast, compute the experts in the autocast dtype, as autocast does for F.linear:
    float32 activations and weights are cast (differentiably, so fp32 parameters get fp32 grads).
    Without this, bf16 mixed-precision training hands fp32 tensors to the backends and "auto" can only
    pick the slow ones (the Triton kernels take bf16/fp16)."""
    dev = hidden.device.type
    if not (hidden.is_floating_point() and torch.is_autocast_enabled(dev)):
        return hidden, w13, w2
    dt = torch.get_autocast_dtype(dev)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dt) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t

    return cast(hidden), cast(w13), cast(w2)


def _register_builtin() -> None:
    from moesaic.kernels import reference
    from moesaic.kernels import sorted as sorted_backend

    register(Backend("reference", reference.moe_experts_reference, priority=0))
    register(Backend("sorted", sorted_backend.moe_experts_sorted, priority=10))
    from moesaic.kernels import triton as tb  # lazy: Triton itself loads on the first call

    register(Backend("triton", tb.moe_experts_triton, available=tb.available, supports=tb.supports, priority=20))
    from moesaic.kernels import onednn, quant  # int8 weight-only / oneDNN float experts (inference)

    register(Backend("int8", quant.moe_experts_int8, supports=lambda h, w: isinstance(w, quant.Int8Weight),
                     priority=30))
    register(Backend("onednn", quant.moe_experts_onednn, available=onednn.onednn_available,
                     supports=onednn.onednn_supports, priority=5))  # inference only: the engine picks it
    # importing the submodule bound `sorted` in this package's namespace, shadowing the builtin
    globals().pop("sorted", None)


_register_builtin()
