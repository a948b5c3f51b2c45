"""The C decode attention (kernels/cpu_attention.py) against torch's rotary + SDPA, and the engine with it
against the engine without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moesaic import Engine, ModelConfig, SamplingParams, build_model
from moesaic.inference.cpu_attention import CpuDecodeAttention, use_cpu_attention
from moesaic.kernels import cpu_attention
from moesaic.model.rope import RotaryEmbedding, apply_rope

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler / AVX-512 here")


def reference(q, k, v, cos, sin, kc, vc, slots, pos):
    """Rotary, cache write and causal attention in plain torch; returns (o [B, H*D], new caches)."""
    kc, vc = kc.clone(), vc.clone()
    n, m, hkv, d = kc.shape
    b, h = q.shape[0], q.shape[1] // d
    qr = apply_rope(q.view(b, h, 1, d), cos[:, None], sin[:, None]).view(b, h, d)
    kr = apply_rope(k.view(b, hkv, 1, d), cos[:, None], sin[:, None]).view(b, hkv, d)
    out = []
    for i in range(b):
        s, p = int(slots[i]), int(pos[i])
        kc[s, p], vc[s, p] = kr[i], v[i].view(hkv, d)
        keys = kc[s, :p + 1].transpose(0, 1).repeat_interleave(h // hkv, 0)  # [H, p+1, D]
        vals = vc[s, :p + 1].transpose(0, 1).repeat_interleave(h // hkv, 0)
        out.append(F.scaled_dot_product_attention(qr[i][:, None], keys, vals).reshape(h * d))
    return torch.stack(out), kc, vc


@pytest.mark.parametrize("b,h,hkv,d,positions", [(1, 4, 2, 16, [0]), (1, 16, 4, 64, [37]), (3, 8, 8, 32, [5, 0, 70]),
                                                  (2, 6, 2, 20, [3, 9]), (4, 4, 1, 128, [1, 2, 3, 127])])
def test_decode_attention_matches_rope_plus_sdpa(b, h, hkv, d, positions):
    g = torch.Generator().manual_seed(b * 100 + d)
    n, m = 6, 128
    kc, vc = torch.randn(n, m, hkv, d, generator=g), torch.randn(n, m, hkv, d, generator=g)
    q, k, v = (torch.randn(b, w * d, generator=g) for w in (h, hkv, hkv))
    pos = torch.tensor(positions)
    slots = torch.tensor([5, 0, 2, 3][:b])  # unsorted slots
    cos, sin = RotaryEmbedding(d, 10000.0)(pos[:, None], torch.float32)
    cos, sin = cos[:, 0], sin[:, 0]
    sin_rot = torch.cat([-sin[:, :d // 2], sin[:, d // 2:]], -1)
    want, kw, vw = reference(q, k, v, cos, sin, kc, vc, slots, pos)
    got = cpu_attention.decode_attention(q, k, v, cos, sin_rot, kc, vc, slots, pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc, kw, rtol=1e-6, atol=1e-6)  # the cache write: rotated keys, plain values
    torch.testing.assert_close(vc, vw, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [4, 5, 9])
def test_row_split_over_two_threads_gives_the_same_bits(b, dtype, monkeypatch):
    """From SPLIT_MIN_ROWS rows the rows are split over this thread and the C worker (each half writes its own slots'
    cache rows and outputs): output and caches bitwise those of one call on one thread; row strides honoured."""
    assert b >= cpu_attention.SPLIT_MIN_ROWS
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = torch.Generator().manual_seed(b)
    h, hkv, d, n, m = 8, 2, 32, 10, 64
    kc0, vc0 = torch.randn(n, m, hkv, d, generator=g).to(dtype), torch.randn(n, m, hkv, d, generator=g).to(dtype)
    qkv = torch.randn(b, (h + 2 * hkv) * d, generator=g).to(dtype)  # q, k, v as strided views of one row buffer
    q, k, v = qkv[:, :h * d], qkv[:, h * d:(h + hkv) * d], qkv[:, (h + hkv) * d:]
    pos = torch.randint(0, m, (b,), generator=g)
    slots = torch.randperm(n, generator=g)[:b]
    cos, sin = RotaryEmbedding(d, 10000.0)(pos[:, None], dtype)
    cos, sin = cos[:, 0], sin[:, 0]
    sin_rot = torch.cat([-sin[:, :d // 2], sin[:, d // 2:]], -1)
    outs = []
    for split in (True, False):
        monkeypatch.setattr(cpu_attention, "SPLIT", split)
        kc, vc = kc0.clone(), vc0.clone()
        outs.append((cpu_attention.decode_attention(q, k, v, cos, sin_rot, kc, vc, slots, pos), kc, vc))
    for a, c in zip(*outs):
        assert torch.equal(a, c)
    if dtype == torch.float32:
        want, _, _ = reference(q, k, v, cos, sin, kc0, vc0, slots, pos)
        torch.testing.assert_close(outs[0][0], want, rtol=1e-5, atol=1e-5)


def test_decode_attention_bf16_matches_fp32_math_on_bf16_values():
    g = torch.Generator().manual_seed(7)
    b, h, hkv, d, n, m = 2, 8, 2, 64, 3, 64
    bf = torch.bfloat16
    kc, vc = torch.randn(n, m, hkv, d, generator=g).to(bf), torch.randn(n, m, hkv, d, generator=g).to(bf)
    q, k, v = (torch.randn(b, w * d, generator=g).to(bf) for w in (h, hkv, hkv))
    pos, slots = torch.tensor([9, 40]), torch.tensor([2, 0])
    cos, sin = RotaryEmbedding(d, 10000.0)(pos[:, None], bf)
    cos, sin = cos[:, 0], sin[:, 0]
    sin_rot = torch.cat([-sin[:, :d // 2], sin[:, d // 2:]], -1)
    want, kw, vw = reference(*(t.float() for t in (q, k, v, cos, sin, kc, vc)), slots, pos)
    got = cpu_attention.decode_attention(q, k, v, cos, sin_rot, kc, vc, slots, pos)
    assert got.dtype == bf
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(kc.float(), kw.to(bf).float(), rtol=0, atol=0)  # rounded once, like .to(bf16)
    torch.testing.assert_close(vc, vw.to(bf), rtol=0, atol=0)


def test_decode_attention_rejects_bad_input():
    kc = torch.zeros(2, 8, 2, 16)
    q, k = torch.zeros(1, 64), torch.zeros(1, 32)
    cs = torch.zeros(1, 16)
    one, ok_pos = torch.tensor([0]), torch.tensor([3])
    with pytest.raises(ValueError, match="out of range"):
        cpu_attention.decode_attention(q, k, k, cs, cs, kc, kc.clone(), one, torch.tensor([8]))
    with pytest.raises(ValueError, match="q"):
        cpu_attention.decode_attention(torch.zeros(1, 60), k, k, cs, cs, kc, kc.clone(), one, ok_pos)
    with pytest.raises(ValueError, match="contiguous fp32 or bf16"):
        cpu_attention.decode_attention(q, k, k, cs, cs, kc.double(), kc.double(), one, ok_pos)
    with pytest.raises(ValueError, match="rows differ"):
        cpu_attention.decode_attention(q, torch.zeros(2, 32), k, cs, cs, kc, kc.clone(), one, ok_pos)


CFG = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, num_experts=4, top_k=2,
           expert_ffn=32, ffn=64)


@pytest.mark.parametrize("extra", [{}, {"qk_norm": "head"}])
def test_engine_with_c_attention_matches_engine_without(extra, monkeypatch):
    calls = []
    real = cpu_attention.decode_attention_unchecked
    monkeypatch.setattr(cpu_attention, "decode_attention_unchecked", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = build_model(ModelConfig(**CFG, **extra)).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    plain = Engine(model, None, max_batch=4, onednn=False)  # torch attention
    want = [c.token_ids for c in plain.generate(prompts, params)]
    fast = Engine(model, None, max_batch=4)
    assert any(isinstance(mod, CpuDecodeAttention) for mod in fast.model.modules())
    got = [c.token_ids for c in fast.generate(prompts, params)]
    assert got == want
    assert len(calls) >= 2 * 11  # every decode step of both layers took the C path
    one = Engine(model, None, max_batch=1)  # batch 1: the benchmark's path
    assert [c.token_ids for c in one.generate(prompts[:1], params)] == want[:1]


def test_engine_bf16_with_c_attention_stays_close_to_torch_attention():
    torch.manual_seed(2)
    model = build_model(ModelConfig(**CFG)).eval().to(torch.bfloat16)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1)
    want = Engine(model, None, max_batch=1, onednn=False).generate([ids], params)[0]
    fast = Engine(model, None, max_batch=1)
    assert any(isinstance(mod, CpuDecodeAttention) for mod in fast.model.modules())
    got = fast.generate([ids], params)[0]
    n = next((i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)) if a != b), len(got.token_ids))
    assert n >= 3  # bf16 roundings differ (once in C, per op in torch): near-ties may flip later tokens
    torch.testing.assert_close(torch.tensor(got.logprobs[:n]), torch.tensor(want.logprobs[:n]), rtol=0.05, atol=0.05)


def test_c_attention_logits_equal_torch_within_fp32_rounding():
    """The decode step's logits with the switched modules against the model's own forward over the prefix."""
    torch.manual_seed(1)
    model = build_model(ModelConfig(**CFG)).eval()
    eng = Engine(model, None, max_batch=2)
    assert use_cpu_attention(eng.model) == 0  # already switched: nothing left to switch
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    out = eng.generate([ids], SamplingParams(max_tokens=6, temperature=0.0, logprobs=1))[0]
    full = torch.tensor([ids + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(full)[0, len(ids) - 1:-1].float(), -1)
    got = torch.tensor(out.logprobs)
    want = ref[torch.arange(len(out.token_ids)), torch.tensor(out.token_ids)]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
