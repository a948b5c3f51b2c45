"""The lean decode path: huge-page weights, automatic packing, mask-free equal-length steps, fused norms, GQA SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moesaic.inference import Engine, SamplingParams
from moesaic.inference.cache import SlotCache
from moesaic.inference.hugepages import huge_page_copy, huge_pages_supported, move_to_huge_pages
from moesaic.inference.quantize import auto_pack
from moesaic.kernels import cpu_gemv
from moesaic.model.attention import sdpa
from moesaic.model.norm import rms_norm
from test_engine import naive_greedy, prompts_of, tiny_model

needs_thp = pytest.mark.skipif(not huge_pages_supported(), reason="no transparent huge pages here")


@needs_thp
@pytest.mark.parametrize("shape,transpose", [((3, 5), False), ((300, 70), True), ((2, 3, 4), False), ((0,), False)])
def test_huge_page_copy_keeps_values_and_strides(shape, transpose):
    t = torch.randn(*shape)
    if transpose:
        t = t.t()
    h = huge_page_copy(t)
    assert h.shape == t.shape and h.stride() == t.stride() and torch.equal(h, t)
    assert h.numel() == 0 or (h.data_ptr() != t.data_ptr() and h.data_ptr() % (2 << 20) == 0)


@needs_thp
def test_moved_model_decodes_the_same_and_keeps_its_state_dict():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    moved = move_to_huge_pages(model, min_bytes=0)
    assert moved == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert all(p.data_ptr() != ptrs[n] for n, p in model.named_parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert move_to_huge_pages(model, min_bytes=0) == 0  # already moved: a second engine copies nothing
    eng = Engine(model, max_batch=2, huge_pages=False)
    prompts = prompts_of([4, 9])
    outs = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [o.token_ids for o in outs] == [naive_greedy(model, p, 6, set()) for p in prompts]


def test_auto_pack_only_where_blocked_copies_win():
    fp32 = tiny_model()
    assert not auto_pack(fp32, max_batch=1)  # fp32 one-row steps use the plain weights
    assert auto_pack(fp32, max_batch=8)
    bf16 = tiny_model().to(torch.bfloat16)
    assert auto_pack(bf16, max_batch=1) == (not cpu_gemv.available())  # the C GEMV reads plain bf16 rows faster
    torch.set_num_threads(2)
    assert auto_pack(bf16, max_batch=1) == (not cpu_gemv.available())  # one row: the C GEMV at any thread count
    torch.set_num_threads(1)


def test_slot_view_masks_only_when_lengths_differ():
    cache = SlotCache(n_layers=1, n_slots=3, n_kv_heads=2, max_len=16, k_dim=4, v_dim=4)
    cache.lengths[:] = torch.tensor([5, 5, 5])
    k = torch.randn(3, 2, 1, 4)
    k_all, _, mask = cache.view([0, 1, 2]).update(0, k, k)
    assert mask is None and k_all.shape == (3, 2, 6, 4) and torch.equal(k_all[:, :, 5:], k)
    cache.lengths[:] = torch.tensor([5, 2, 5])
    _, _, mask = cache.view([0, 1, 2]).update(0, k, k)
    assert mask is not None and mask[1, 0, 0].tolist() == [0.0] * 3 + [float("-inf")] * 3  # additive
    _, _, mask = cache.view([0]).update(0, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    assert mask is not None  # several new tokens: causal within them


@pytest.mark.parametrize("dtype,weight_shape", [(torch.float32, (8,)), (torch.bfloat16, (8,)),
                                                (torch.float32, (3, 8)), (torch.bfloat16, (3, 8))])
def test_rms_norm_matches_the_plain_formula(dtype, weight_shape):
    x = torch.randn(2, 5, 3, 8).to(dtype)
    w = torch.randn(weight_shape).to(dtype)
    x32 = x.float()
    want = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    got = rms_norm(x, w, 1e-6)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("t,masked", [(1, False), (1, True), (4, False), (4, True)])
def test_sdpa_gqa_matches_repeated_heads(t, masked):
    b, h, hkv, s, d = 2, 8, 2, 6, 16
    q = torch.randn(b, h, t, d)
    k, v = torch.randn(b, hkv, s if masked or t == 1 else t, d), torch.randn(b, hkv, s if masked or t == 1 else t, d)
    mask = (torch.rand(b, 1, t, k.shape[2]) > 0.3) | (torch.arange(k.shape[2]) == 0) if masked else None
    kr, vr = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    want = (F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask) if masked
            else F.scaled_dot_product_attention(q, kr, vr, is_causal=t > 1))
    torch.testing.assert_close(sdpa(q, k, v, mask), want, rtol=1e-5, atol=1e-6)


needs_gemv = pytest.mark.skipif(not cpu_gemv.available(), reason="C GEMV not buildable here (no cc / AVX-512)")


@needs_gemv
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("o,i", [(1, 1), (7, 15), (33, 17), (5, 64), (3, 130), (129, 1000), (64, 1024), (3, 2816)])
def test_cpu_gemv_matches_linear(o, i, dtype, tol):
    """Relative to the output's scale (sums of i terms in another order; bf16: the rounded output)."""
    w, x = torch.randn(o, i).to(dtype), torch.randn(1, i).to(dtype)
    wide = torch.randn(o, i + 37).to(dtype)[:, 3:3 + i]  # rows contiguous, row stride != I
    x2 = torch.randn(2, i).to(dtype)
    for m in (w, wide):
        for xs in (x, x2) if dtype == torch.float32 else (x,):  # two rows: fp32 only
            assert cpu_gemv.usable(xs, m)
            got, want = cpu_gemv.gemv(xs, m), F.linear(xs.float(), m.float())
            assert got.shape == want.shape and got.dtype == dtype
            assert float((got.float() - want).abs().max()) <= tol * float(want.abs().max())


@needs_gemv
def test_cpu_gemv_is_used_only_where_it_applies():
    w, x = torch.randn(8, 16), torch.randn(1, 16)
    assert cpu_gemv.usable(torch.randn(2, 16), w)  # two fp32 rows: the two-row kernel
    assert not cpu_gemv.usable(torch.randn(3, 16), w)  # more rows: oneDNN's blocked kernels
    assert not cpu_gemv.usable(torch.randn(2, 16).bfloat16(), w.bfloat16())
    assert not cpu_gemv.usable(x.bfloat16(), w)  # mixed dtypes
    assert not cpu_gemv.usable(x, w.t().contiguous().t())  # columns contiguous: MKL's x @ W
    torch.set_num_threads(2)
    assert cpu_gemv.usable(x, w)  # one row: one core's kernel streams faster than oneDNN on two threads
    assert not cpu_gemv.usable(torch.randn(2, 16), w)  # two rows with several threads: oneDNN splits the work
    torch.set_num_threads(1)
    with torch.enable_grad():
        assert not cpu_gemv.usable(x.requires_grad_(), w)


@needs_gemv
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("t", [1, 2, 3, 7])
def test_onednn_backend_with_gemv_matches_reference(t, dtype, tol):
    """One-row calls go through the C GEMV (plain and transposed w2), two fp32 rows per expert through the
    two-row kernel (t=2 routes both tokens to experts 0 and 1), more rows through oneDNN."""
    from moesaic import kernels
    from moesaic.kernels.onednn import transpose_for_gemv
    from moesaic.kernels.reference import moe_experts_reference

    w13, w2 = (torch.randn(4, 512, 256) * 0.05).to(dtype), (torch.randn(4, 256, 256) * 0.05).to(dtype)
    x, ids, wts = torch.randn(t, 256).to(dtype), torch.randint(0, 4, (t, 2)), torch.rand(t, 2).to(dtype)
    if t == 2:
        ids = torch.tensor([[0, 1], [1, 0]])
    ref = moe_experts_reference(x, w13, w2, ids, wts)
    with torch.inference_mode():
        for w2_layout in (w2, transpose_for_gemv(w2)):
            got = kernels.moe_experts(x, w13, w2_layout, ids, wts, backend="onednn")
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@needs_gemv
def test_onednn_linear_one_row_with_bias_matches_linear():
    from moesaic.kernels.onednn import cpu_linear

    w, b, x = torch.randn(300, 256), torch.randn(300), torch.randn(1, 256)  # >= 65536 weights: the fast path
    with torch.inference_mode():
        got = cpu_linear(x, w, b)
    want = F.linear(x, w, b)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


@needs_gemv
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("o,i", [(1, 1), (7, 15), (33, 17), (64, 1024), (3, 2816)])
def test_cpu_gemv_int8_matches_dequantized(o, i, dtype, tol):
    from moesaic.kernels.quant import int8_linear, quantize_int8

    q, s = quantize_int8(torch.randn(o, i))
    x = torch.randn(1, i).to(dtype)
    want = x.float() @ (q.float() * s[:, None]).t()
    with torch.inference_mode():
        got = int8_linear(x, q, s.to(dtype))  # one row on one thread: the C kernel
    assert got.dtype == dtype and float((got.float() - want).abs().max()) <= tol * float(want.abs().max())
