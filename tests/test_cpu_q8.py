"""W8A8 (kernels.cpu_q8: int8 activations x int8 weights, VNNI) against its plain PyTorch spec and against fp32."""

from __future__ import annotations

import pytest
import torch

from moesaic import ModelConfig, build_model, kernels
from moesaic.inference import Engine, SamplingParams
from moesaic.inference.quantize import quantize_model
from moesaic.kernels import cpu_experts, cpu_gemv, cpu_q8
from moesaic.kernels.quant import Int8Linear, Int8Weight, int8_linear, quantize_int8
from moesaic.kernels.reference import swiglu

pytestmark = pytest.mark.skipif(not cpu_q8.available(), reason="W8A8 kernels not buildable here (no VNNI / cc)")

# the kernel against the same W8A8 math (exact int32 block dots in both; fp32 vs float64 sums of the blocks)
TIGHT = 1e-5
# an expert's SwiGLU output is quantized again: a last-bit difference in it (C's fp32 exp vs torch's) can move one
# element to the next int8 step (one step = 1/127 of its block's max): rare, and ~1e-3 of the output when it happens
EXPERT_TOL = 3e-3
# W8A8 against the float weights: weights and activations each rounded to 8 bits per row / per block of 32
FLOAT_TOL = 3e-2


def _rel(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("i", [1, 3, 17, 33, 64, 100, 1024])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_is_bit_exact_with_the_spec(i, block, dtype):
    torch.manual_seed(0)
    x = (torch.randn(5, i) * torch.tensor([1.0, 0.0, 1e-3, 50.0, 1.0])[:, None]).to(dtype)  # a zero row too
    x[4, 0] = 1e4  # one outlier: its block's scale, not the others'
    q, lane_scales = cpu_q8.quantize_rows(x, block)
    want_q, want_s = cpu_q8.quantize_activations(x, block)
    assert torch.equal(q, want_q)
    assert torch.equal(lane_scales, want_s.repeat_interleave(block // 4, 1)[:, :(i + 3) // 4])
    assert q.abs().max() <= 127


@pytest.mark.parametrize("m", [0, 1, 2, 5, 8, 17])
@pytest.mark.parametrize("o,i", [(64, 48), (37, 50), (5, 3), (300, 1100)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_matches_w8a8_spec_and_float(m, o, i, threads):
    torch.manual_seed(0)
    w = torch.randn(o, i)
    q, s = quantize_int8(w)
    x = torch.randn(m, i)
    got = cpu_q8.linear(x, q, s, threads=threads)
    assert got.shape == (m, o) and got.dtype == torch.float32
    if m == 0:
        return
    assert _rel(got, cpu_q8.matmul_reference(x, q, s)) <= TIGHT
    assert _rel(got, x @ w.t()) <= FLOAT_TOL
    xb = x.bfloat16()  # bf16 rows are read as they are (no fp32 copy)
    got_b = cpu_q8.linear(xb, q, s.bfloat16(), threads=threads)
    assert got_b.dtype == torch.bfloat16
    assert _rel(got_b, cpu_q8.matmul_reference(xb, q, s.bfloat16().float())) <= 1e-2


def test_linear_strided_rows_and_a_changed_weight():
    torch.manual_seed(0)
    q, s = quantize_int8(torch.randn(40, 70))
    x = torch.randn(3, 140)[:, ::2]  # rows not contiguous
    assert _rel(cpu_q8.linear(x, q, s), cpu_q8.matmul_reference(x, q, s)) <= TIGHT
    s.mul_(2)  # the cached plan sees the scale's new version
    assert _rel(cpu_q8.linear(x, q, s), cpu_q8.matmul_reference(x, q, s)) <= TIGHT


def _w8a8_experts(x, counts, w13, w2, block=cpu_q8.ACT_BLOCK):
    """The spec: per expert, W8A8 w13, SwiGLU, W8A8 w2 (rows sorted by expert)."""
    out, s = [], 0
    for e, c in enumerate(counts):
        h = cpu_q8.matmul_reference(x[s:s + c], w13.q[e], w13.scale[e].float(), block)
        out.append(cpu_q8.matmul_reference(swiglu(h), w2.q[e], w2.scale[e].float(), block))
        s += c
    return torch.cat(out)


def _weights(e, f, d, block=cpu_q8.ACT_BLOCK):
    w13, w2 = torch.randn(e, 2 * f, d) * 0.2, torch.randn(e, d, f) * 0.2
    return Int8Weight(*quantize_int8(w13), block), Int8Weight(*quantize_int8(w2), block), w13, w2


@pytest.mark.parametrize("f,d", [(64, 48), (9, 37), (40, 100), (24, 1100)])
@pytest.mark.parametrize("counts", [[0, 1, 7, 3, 0], [17, 0, 0, 0, 0], [1, 1, 1, 1, 1], [9, 2, 0, 6, 12]])
@pytest.mark.parametrize("threads", [1, 2])
def test_experts_match_w8a8_spec_and_float(f, d, counts, threads):
    torch.manual_seed(0)
    w13, w2, f13, f2 = _weights(len(counts), f, d)
    x = torch.randn(sum(counts), d)
    assert cpu_experts.usable(x, w13, w2)
    got = cpu_experts.experts(x, counts, w13, w2, threads=threads)
    assert _rel(got, _w8a8_experts(x, counts, w13, w2)) <= EXPERT_TOL
    plain, s = [], 0
    for e, c in enumerate(counts):
        plain.append(swiglu(x[s:s + c] @ f13[e].t()) @ f2[e].t())
        s += c
    assert _rel(got, torch.cat(plain)) <= FLOAT_TOL
    xb = x.bfloat16()
    assert _rel(cpu_experts.experts(xb, counts, w13, w2, threads=threads), _w8a8_experts(xb, counts, w13, w2)) \
        <= EXPERT_TOL


@pytest.mark.parametrize("threads", [1, 2])
def test_one_token_and_the_int8_backend(threads):
    torch.manual_seed(0)
    w13, w2, _, _ = _weights(6, 40, 70)
    x = torch.randn(1, 70)
    ids, ws = [4, -1, 0, 5], [0.5, 0.3, 0.15, 0.05]
    got = cpu_experts.one_token(x, ids, ws, w13, w2, threads=threads)
    want = sum(w * _w8a8_experts(x, [1], Int8Weight(w13.q[e:e + 1], w13.scale[e:e + 1]),
                                 Int8Weight(w2.q[e:e + 1], w2.scale[e:e + 1])) for e, w in zip(ids, ws) if e >= 0)
    assert _rel(got, want) <= EXPERT_TOL
    for t in (1, 3, 33):  # 33 rows on one expert: above cpu_experts.MAX_ROWS, still W8A8
        x = torch.randn(t, 70)
        ids = torch.randint(0, 6, (t, 2))
        ids[:, 0] = 2
        wts = torch.softmax(torch.randn(t, 2), -1)
        with torch.inference_mode():
            got = kernels.moe_experts(x, w13, w2, ids, wts, backend="int8")
        want = torch.zeros(t, 70)
        for r in range(t):
            for k in range(2):
                e = int(ids[r, k])
                one = Int8Weight(w13.q[e:e + 1], w13.scale[e:e + 1]), Int8Weight(w2.q[e:e + 1], w2.scale[e:e + 1])
                want[r] += wts[r, k] * _w8a8_experts(x[r:r + 1], [1], *one)[0]
        assert _rel(got, want) <= EXPERT_TOL


def test_w8a8_experts_in_a_forked_child():
    import multiprocessing as mp

    torch.manual_seed(0)
    w13, w2, _, _ = _weights(4, 16, 40)
    x = torch.randn(6, 40)
    want = cpu_experts.experts(x, [2, 2, 1, 1], w13, w2, threads=2)  # the parent's helper thread and scratch exist
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(cpu_experts.experts, (x, [2, 2, 1, 1], w13, w2, 2)).get(timeout=60)
    assert torch.equal(got, want)


def test_without_vnni_the_weight_only_kernels_run(monkeypatch):
    torch.manual_seed(0)
    w13, w2, _, _ = _weights(4, 16, 40)
    x = torch.randn(5, 40)
    q, s = quantize_int8(torch.randn(24, 40))
    w8a8 = cpu_experts.experts(x, [2, 0, 3, 0], w13, w2)
    monkeypatch.setattr(cpu_q8, "available", lambda: False)
    wo13, wo2 = Int8Weight(w13.q, w13.scale), Int8Weight(w2.q, w2.scale)  # act_block None: weight-only
    got = cpu_experts.experts(x, [2, 0, 3, 0], w13, w2)
    assert torch.equal(got, cpu_experts.experts(x, [2, 0, 3, 0], wo13, wo2))
    assert not torch.equal(got, w8a8)  # and that differs from W8A8 (the activations are not rounded)
    with torch.no_grad():
        assert torch.equal(int8_linear(x[:1], q, s, act_block=32), cpu_gemv.gemv_int8(x[:1], q, s))


def test_act_block_is_validated():
    q, s = quantize_int8(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="activation block"):
        Int8Weight(q, s, act_block=30)
    with pytest.raises(ValueError, match="activation block"):
        cpu_q8.quantize_activations(torch.randn(2, 8), 0)


@torch.no_grad()
def test_schemes_set_the_activations_and_the_engine_decodes_like_the_naive_loop():
    from test_engine import naive_greedy, prompts_of, tiny_model

    for scheme, block in (("w8a8", cpu_q8.ACT_BLOCK), ("int8", None)):
        model = quantize_model(tiny_model(), scheme, linears=True)
        assert model.moe_layers()[0].experts.w13.act_block == block
        assert all(m.act_block == block for m in model.modules() if isinstance(m, Int8Linear))
    model = tiny_model()
    eng = Engine(model, max_batch=3, quantize="w8a8", quantize_linears=True)
    prompts = prompts_of([5, 11, 2, 17])
    outs = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [o.token_ids for o in outs] == [naive_greedy(model, p, 6, set()) for p in prompts]


@torch.no_grad()
def test_w8a8_logits_stay_close_to_fp32():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=97, max_seq_len=64)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 97, (1, 12))
    ref = model(ids)
    qmodel = quantize_model(build_model(cfg).eval(), "w8a8", linears=True)
    qmodel.load_state_dict(quantize_model(model, "w8a8", linears=True).state_dict())
    assert _rel(qmodel(ids), ref) < 0.05


def test_scratch_too_big_to_keep_gives_the_same_result(monkeypatch):
    torch.manual_seed(0)
    w13, w2, _, _ = _weights(3, 24, 70)
    x = torch.randn(9, 70)
    q, s = quantize_int8(torch.randn(30, 70))
    want_e, want_l = cpu_experts.experts(x, [4, 0, 5], w13, w2, threads=2), cpu_q8.linear(x, q, s, threads=2)
    monkeypatch.setattr(cpu_q8, "_KEEP", 0)  # every call gets a fresh scratch buffer, held while C runs
    assert torch.equal(cpu_experts.experts(x, [4, 0, 5], w13, w2, threads=2), want_e)
    assert torch.equal(cpu_q8.linear(x, q, s, threads=2), want_l)
