"""Every MoE backend against the reference loop (outputs and gradients), on fresh random inputs.

Tolerances (DESIGN.md): fp32 relative 1e-5 (atol scaled by the output magnitude).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesaic import kernels
from moesaic.kernels.sorted import sort_by_expert

CPU_BACKENDS = [b for b in kernels.available_backends() if b not in ("reference", "triton")]


def _inputs(t, d, f, e, k, *, gen, ids=None, dtype=torch.float32, requires_grad=False):
    h = torch.randn(t, d, generator=gen, dtype=dtype)
    w13 = torch.randn(e, 2 * f, d, generator=gen, dtype=dtype) / d ** 0.5
    w2 = torch.randn(e, d, f, generator=gen, dtype=dtype) / f ** 0.5
    if ids is None:  # duplicate-free, unsorted ids per token
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else \
            torch.zeros(0, k, dtype=torch.long)
    w = torch.rand(t, k, generator=gen, dtype=dtype)
    ts = [h, w13, w2, w]
    if requires_grad:
        for x in ts:
            x.requires_grad_(True)
    return h, w13, w2, ids, w


def _close(a, b, rtol=1e-5):
    scale = max(float(b.detach().abs().max()) if b.numel() else 0.0, 1e-6)
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


def _check(backend, h, w13, w2, ids, w, grads=True):
    ref = kernels.moe_experts(h, w13, w2, ids, w, backend="reference")
    out = kernels.moe_experts(h, w13, w2, ids, w, backend=backend)
    assert out.shape == h.shape and out.dtype == h.dtype
    _close(out, ref)
    if grads and h.requires_grad and h.shape[0]:
        g = torch.randn_like(ref)
        gr = torch.autograd.grad(ref, (h, w13, w2, w), g, allow_unused=True)
        go = torch.autograd.grad(out, (h, w13, w2, w), g, allow_unused=True)
        for a, b in zip(go, gr):
            if b is None:
                assert a is None or float(a.abs().max()) == 0.0
            else:
                _close(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("t,e,k", [(0, 8, 2), (1, 1, 1), (1, 8, 8), (7, 64, 8), (7, 128, 3), (1000, 8, 2),
                                   (1000, 64, 8), (33, 128, 1)])
def test_backend_matches_reference_grid(backend, t, e, k):
    gen = torch.Generator().manual_seed(t * 1000 + e * 10 + k)
    h, w13, w2, ids, w = _inputs(t, 32, 16, e, k, gen=gen, requires_grad=True)
    _check(backend, h, w13, w2, ids, w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_tokens_to_one_expert(backend):
    gen = torch.Generator().manual_seed(1)
    ids = torch.full((50, 1), 5)
    h, w13, w2, ids, w = _inputs(50, 16, 8, 8, 1, gen=gen, ids=ids, requires_grad=True)
    _check(backend, h, w13, w2, ids, w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropped_slots_contribute_nothing(backend):
    gen = torch.Generator().manual_seed(2)
    h, w13, w2, ids, w = _inputs(20, 16, 8, 8, 2, gen=gen, requires_grad=True)
    ids = ids.clone()
    ids[::3, 1] = -1
    ids[5] = -1  # a token with no expert at all
    _check(backend, h, w13, w2, ids, w)
    out = kernels.moe_experts(h, w13, w2, ids, w, backend=backend)
    assert float(out[5].detach().abs().max()) == 0.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(0, 40), e=st.sampled_from([1, 2, 8, 64, 128]), k=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1), skew=st.booleans())
def test_sorted_matches_reference_property(t, e, k, seed, skew):
    k = min(k, e)
    gen = torch.Generator().manual_seed(seed)
    ids = None
    if skew and e >= k:  # concentrate tokens on the first k+1 experts: many empty experts
        pool = min(e, k + 1)
        ids = torch.stack([torch.randperm(pool, generator=gen)[:k] for _ in range(t)]) if t else \
            torch.zeros(0, k, dtype=torch.long)
    h, w13, w2, ids, w = _inputs(t, 8, 4, e, k, gen=gen, ids=ids, requires_grad=True)
    _check("sorted", h, w13, w2, ids, w)


def test_sort_by_expert_permutation_is_exact():
    ids = torch.tensor([[3, 1], [-1, 3], [0, 1]])
    order, counts, n_dropped = sort_by_expert(ids, 4)
    flat = ids.flatten()
    assert n_dropped == 1
    assert counts.tolist() == [1, 2, 0, 2]
    assert flat[order[n_dropped:]].tolist() == [0, 1, 1, 3, 3]
    # stable: within an expert, token order is kept; and the inverse permutation restores the input
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    assert torch.equal(flat[order][inv], flat)


def test_bf16_sorted_close_to_reference():
    gen = torch.Generator().manual_seed(3)
    h, w13, w2, ids, w = _inputs(64, 32, 16, 8, 2, gen=gen)
    ref = kernels.moe_experts(h, w13, w2, ids, w, backend="reference")
    out = kernels.moe_experts(h.bfloat16(), w13.bfloat16(), w2.bfloat16(), ids, w.bfloat16(), backend="sorted")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2)


def test_dispatch_errors_are_clear():
    h = torch.randn(4, 8)
    w13, w2 = torch.randn(2, 6, 8), torch.randn(2, 8, 3)
    ids, w = torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)
    with pytest.raises(ValueError, match="unknown MoE backend"):
        kernels.moe_experts(h, w13, w2, ids, w, backend="nope")
    with pytest.raises(ValueError, match="inconsistent shapes"):
        kernels.moe_experts(h, w13, torch.randn(2, 8, 4), ids, w)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        kernels.moe_experts(h, w13, w2, ids[:3], w[:3])
    with pytest.raises(ValueError, match="integer"):
        kernels.moe_experts(h, w13, w2, ids.float(), w)


def test_available_backends_lists_builtin():
    names = kernels.available_backends()
    assert "reference" in names and "sorted" in names
    assert kernels.get_backend("auto", torch.randn(2, 8), torch.randn(2, 6, 8)).name in names


def test_autocast_computes_experts_in_the_autocast_dtype_with_fp32_grads(monkeypatch):
    """Mixed-precision training: fp32 activations and parameters under torch.autocast reach the backend in
    the autocast dtype (as F.linear does), so "auto" can pick a bf16-only backend; grads stay fp32."""
    gen = torch.Generator().manual_seed(3)
    h, w13, w2, ids, w = _inputs(33, 16, 8, 8, 2, gen=gen, requires_grad=True)
    seen = []

    def bf16_only(hidden, a, b, i, wt):
        seen.append((hidden.dtype, a.dtype, b.dtype))
        return kernels.moe_experts(hidden, a, b, i, wt, backend="reference")

    monkeypatch.setattr(kernels, "_BACKENDS", dict(kernels._BACKENDS))  # restored after the test
    monkeypatch.setattr(kernels, "_AVAILABLE", None)
    kernels.register(kernels.Backend("bf16only", bf16_only, supports=lambda x, a: x.dtype == torch.bfloat16,
                                     priority=99))
    ref = kernels.moe_experts(h, w13, w2, ids, w, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.moe_experts(h, w13, w2, ids, w)
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16)]  # "auto" chose the bf16 backend
    assert out.dtype == torch.bfloat16
    _close(out.float(), ref, rtol=2e-2)
    g = torch.randn_like(ref)
    gr = torch.autograd.grad(ref, (h, w13, w2), g)
    go = torch.autograd.grad(out.float(), (h, w13, w2), g)
    for a, b in zip(go, gr):
        assert a.dtype == torch.float32
        _close(a, b, rtol=3e-2)
    out = kernels.moe_experts(h, w13, w2, ids, w)  # outside autocast nothing is cast
    assert out.dtype == torch.float32 and len(seen) == 1
