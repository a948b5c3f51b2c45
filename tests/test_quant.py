"""int8 weight-only experts: quantization error bound, int8 backend vs reference on the dequantized weights,
no full dequantized copy, every backend on a quantized model, the engine with --quantize int8."""

from __future__ import annotations

import pytest
import torch

from moesaic import ModelConfig, build_model, kernels
from moesaic.inference import Engine, SamplingParams
from moesaic.inference.quantize import quantize_model
from moesaic.kernels.quant import Int8Linear, Int8Weight, int8_linear, moe_experts_int8, quantize_int8
from moesaic.kernels.reference import moe_experts_reference


def test_quantize_error_bound_and_zero_rows():
    w = torch.randn(3, 10, 32)
    w[1, 4] = 0
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (3, 10) and int(q.abs().max()) <= 127
    err = (q.float() * s[..., None] - w).abs()
    assert bool((err <= s[..., None] / 2 + 1e-7).all())
    assert s[1, 4] == 1 and bool((q[1, 4] == 0).all())
    with pytest.raises(ValueError, match="float"):
        quantize_int8(q)


@pytest.mark.parametrize("m,i,o", [(1, 64, 48), (5, 32, 7), (3, 40, 16), (0, 64, 8)])
def test_int8_linear_matches_dequantized(m, i, o):
    w = torch.randn(o, i)
    q, s = quantize_int8(w)
    x = torch.randn(m, i)
    ref = x @ (q.float() * s[:, None]).t()
    y = int8_linear(x, q, s)
    assert y.shape == (m, o) and y.dtype == x.dtype
    # the fast CPU kernel takes bf16 activations: bf16 tolerance relative to the output scale
    scale = float(ref.abs().max()) if m else 1.0
    tol = 2e-2 * max(1.0, scale) if i % 16 == 0 else 1e-5
    torch.testing.assert_close(y, ref, rtol=0, atol=tol)


def _experts(e=6, d=64, f=32):
    w13, w2 = torch.randn(e, 2 * f, d) * 0.1, torch.randn(e, d, f) * 0.1
    q13, s13 = quantize_int8(w13)
    q2, s2 = quantize_int8(w2)
    return Int8Weight(q13, s13), Int8Weight(q2, s2)


@pytest.mark.parametrize("t,k,case", [(0, 2, "rand"), (1, 2, "rand"), (33, 2, "rand"), (17, 3, "one_expert"),
                                      (9, 2, "dropped")])
def test_int8_backend_matches_reference_on_dequantized(t, k, case):
    w13, w2 = _experts()
    x = torch.randn(t, 64)
    ids = torch.stack([torch.randperm(6)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
    if case == "one_expert":
        ids[:, 0] = 4
        ids[:, 1:] = -1
    if case == "dropped":
        ids[::2, 1] = -1
    wts = torch.rand(t, k)
    ref = moe_experts_reference(x, w13.dequantize(), w2.dequantize(), ids, wts)
    y = kernels.moe_experts(x, w13, w2, ids, wts, backend="int8")
    assert y.shape == (t, 64)
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-2 * max(1.0, float(ref.abs().max()) if t else 1.0))
    # the float backends accept the int8 format too (one expert dequantized at a time), exactly
    for name in ("reference", "sorted"):
        torch.testing.assert_close(kernels.moe_experts(x, w13, w2, ids, wts, backend=name), ref,
                                   rtol=1e-5, atol=1e-6)


def test_int8_backend_never_dequantizes(monkeypatch):
    w13, w2 = _experts()

    def boom(*a, **k):
        raise AssertionError("dequantized copy made")

    monkeypatch.setattr(Int8Weight, "dequantize", boom)
    monkeypatch.setattr(Int8Weight, "__getitem__", boom)
    x = torch.randn(7, 64)
    ids = torch.randint(0, 6, (7, 2))
    y = moe_experts_int8(x, w13, w2, ids, torch.rand(7, 2))
    assert torch.isfinite(y).all()
    assert kernels.get_backend("auto", x, w13).name == "int8"
    assert kernels.get_backend("auto", x, torch.randn(6, 64, 64)).name != "int8"


def test_int8_linear_module_matches_linear():
    lin = torch.nn.Linear(32, 24, bias=True)
    q = Int8Linear(lin)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(q(x), lin(x), rtol=0, atol=3e-2)


@torch.no_grad()
def test_engine_int8_greedy_matches_naive_loop_and_float_model():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=97, max_seq_len=64)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 97, (1, 12))
    float_logits = model(ids)
    qmodel = quantize_model(build_model(cfg).eval(), "int8", linears=True)
    qmodel.load_state_dict(quantize_model(model, "int8", linears=True).state_dict())
    assert qmodel.count_params().total == model.count_params().total
    q_logits = qmodel(ids)
    assert (q_logits - float_logits).abs().max() < 0.05 * float_logits.abs().max() + 1e-3
    eng = Engine(qmodel, max_batch=2)
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=5, temperature=0))
    for p, o in zip(prompts, outs):
        seq = list(p)
        for _ in range(5):
            seq.append(int(qmodel(torch.tensor([seq]))[0, -1].argmax()))
        assert o.token_ids == seq[len(p):]


def test_engine_quantize_option_and_bad_scheme():
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny", vocab_size=97))
    eng = Engine(model, max_batch=1, quantize="int8")
    assert all(m.backend == "auto" for m in model.moe_layers())
    assert isinstance(model.moe_layers()[0].experts.w13, Int8Weight)
    assert len(eng.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids) == 3
    with pytest.raises(ValueError, match="quantize scheme"):
        quantize_model(model, "int3")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_onednn_linear_and_backend_match_reference(dtype, tol):
    from moesaic.kernels.onednn import cpu_linear, onednn_available
    from moesaic.kernels.quant import OneDNNLinear

    if not onednn_available():
        pytest.skip("no oneDNN in this torch build")
    w = (torch.randn(512, 256) * 0.05).to(dtype)  # large enough for the oneDNN path
    for m in (1, 7):
        x = torch.randn(m, 256).to(dtype)
        torch.testing.assert_close(cpu_linear(x, w).float(), torch.nn.functional.linear(x, w).float(),
                                   rtol=tol, atol=tol)
    lin = torch.nn.Linear(256, 512).to(dtype)
    ref = lin(x)
    lin.__class__ = OneDNNLinear
    torch.testing.assert_close(lin(x), ref, rtol=tol, atol=tol)
    w13, w2 = (torch.randn(4, 512, 256) * 0.05).to(dtype), (torch.randn(4, 256, 256) * 0.05).to(dtype)
    x = torch.randn(9, 256).to(dtype)
    ids, wts = torch.randint(0, 4, (9, 2)), torch.rand(9, 2).to(dtype)
    ref = moe_experts_reference(x, w13, w2, ids, wts)
    with torch.inference_mode():
        got = kernels.moe_experts(x, w13, w2, ids, wts, backend="onednn")
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


@torch.no_grad()
def test_onednn_transposed_down_projection_same_values_and_greedy():
    """use_onednn(transpose_w2=True) stores fp32 w2 transposed (same shape and values); the onednn backend then
    runs one-row decode through x @ W and many rows through oneDNN, both equal to the reference, and
    the engine's greedy output still equals the naive full-forward loop."""
    from moesaic.inference.quantize import use_onednn
    from moesaic.kernels.onednn import onednn_available, transpose_for_gemv

    if not onednn_available():
        pytest.skip("no oneDNN in this torch build")
    torch.manual_seed(0)
    w13, w2 = torch.randn(4, 512, 256) * 0.05, transpose_for_gemv(torch.randn(4, 256, 256) * 0.05)
    assert w2.shape == (4, 256, 256) and w2[1].t().is_contiguous() and not w2.is_contiguous()
    assert quantize_int8(w2)[0].is_contiguous()  # the fast int8 kernel needs contiguous q
    for t in (1, 9):  # one row: the x @ W path; 9 rows: oneDNN over the strided weight
        x = torch.randn(t, 256)
        ids, wts = torch.randint(0, 4, (t, 2)), torch.rand(t, 2)
        ids[0, 1] = -1  # a dropped slot contributes nothing on both paths
        ref = moe_experts_reference(x, w13, w2.contiguous(), ids, wts)
        with torch.inference_mode():
            got = kernels.moe_experts(x, w13, w2, ids, wts, backend="onednn")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    cfg = ModelConfig.preset("tiny", vocab_size=97, max_seq_len=64, d_model=256, expert_ffn=256)
    model = build_model(cfg).eval()
    before = [m.experts.w2.detach().clone() for m in model.moe_layers()]
    ref_model = build_model(cfg).eval()
    ref_model.load_state_dict(model.state_dict())
    assert use_onednn(model, transpose_w2=True)
    for m, b in zip(model.moe_layers(), before):
        assert m.backend == "onednn" and not m.experts.w2.is_contiguous()
        assert torch.equal(m.experts.w2, b)
    eng = Engine(model, max_batch=2, onednn=False)  # already converted
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=5, temperature=0))
    for p, o in zip(prompts, outs):
        seq = list(p)
        for _ in range(5):
            seq.append(int(ref_model(torch.tensor([seq]))[0, -1].argmax()))
        assert o.token_ids == seq[len(p):]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_experts_match_reference_and_never_go_stale(dtype, tol):
    """oneDNN-blocked expert copies give the reference's numbers for multi-row calls; a weight whose
    storage changed (here: a new tensor assigned to .data) falls back to the plain path."""
    from moesaic.kernels.onednn import PACKED_ATTR, onednn_available, pack_onednn, unpack_onednn

    if not onednn_available():
        pytest.skip("no oneDNN in this torch build")
    torch.manual_seed(0)
    w13 = torch.nn.Parameter((torch.randn(4, 512, 256) * 0.05).to(dtype), requires_grad=False)
    w2 = torch.nn.Parameter((torch.randn(4, 256, 256) * 0.05).to(dtype), requires_grad=False)
    pack_onednn(w13)
    pack_onednn(w2)
    for t in (1, 2, 13):
        x = torch.randn(t, 256).to(dtype)
        ids, wts = torch.randint(0, 4, (t, 2)), torch.rand(t, 2).to(dtype)
        ref = moe_experts_reference(x.float(), w13.float(), w2.float(), ids, wts.float())
        with torch.inference_mode():
            got = kernels.moe_experts(x, w13, w2, ids, wts, backend="onednn")
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)
    w2.data = w2.data * 2  # new storage: the snapshot must not be used
    x = torch.randn(5, 256).to(dtype)
    ids, wts = torch.randint(0, 4, (5, 2)), torch.rand(5, 2).to(dtype)
    with torch.inference_mode():
        got = kernels.moe_experts(x, w13, w2, ids, wts, backend="onednn")
    ref = moe_experts_reference(x.float(), w13.float(), w2.float(), ids, wts.float())
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)
    unpack_onednn(w13)
    assert not hasattr(w13, PACKED_ATTR)
    with pytest.raises(ValueError, match="pack_onednn"):
        pack_onednn(torch.zeros(4, 4, dtype=torch.int8))


@torch.no_grad()
def test_engine_pack_weights_greedy_matches_naive_loop():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=97, max_seq_len=64, d_model=256, expert_ffn=256)
    model = build_model(cfg).eval()
    ref_model = build_model(cfg).eval()
    ref_model.load_state_dict(model.state_dict())
    eng = Engine(model, max_batch=3, pack_weights=True)
    from moesaic.kernels.onednn import PACKED_ATTR

    assert all(hasattr(m.experts.w13, PACKED_ATTR) for m in model.moe_layers())
    from moesaic.kernels.onednn import _ONEDNN_MIN_WEIGHT
    from moesaic.kernels.quant import OneDNNLinear

    lins = [m.weight for m in model.modules() if isinstance(m, OneDNNLinear)]
    assert any(w.numel() >= _ONEDNN_MIN_WEIGHT for w in lins)  # big linears packed, tiny ones left plain
    assert all(hasattr(w, PACKED_ATTR) == (w.numel() >= _ONEDNN_MIN_WEIGHT) for w in lins)
    prompts = [[1, 2, 3, 4], [9, 8, 7], [5, 5, 6, 1, 2]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    for p, o in zip(prompts, outs):
        seq = list(p)
        for _ in range(6):
            seq.append(int(ref_model(torch.tensor([seq]))[0, -1].argmax()))
        assert o.token_ids == seq[len(p):]
    from moesaic.inference.quantize import unpack_weights

    unpack_weights(model)
    assert not any(hasattr(p, PACKED_ATTR) for p in model.parameters())
