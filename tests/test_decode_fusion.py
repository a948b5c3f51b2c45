"""Decode-step fusions (fewer kernels per layer) against the plain computations they replace:
the fused q/k/v projection, the 4-op rotary, rms_norm on 16-bit inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moesaic import ModelConfig, build_model
from moesaic.inference import Engine, SamplingParams
from moesaic.model.norm import rms_norm
from moesaic.model.rope import RotaryEmbedding, apply_rope, apply_rope_bthd

VOCAB = 97


def _model(seed=0, **over):
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", vocab_size=VOCAB, **{"max_seq_len": 64, **over})
    return build_model(cfg).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_bthd_equals_apply_rope(dtype):
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 10000.0)
    pos = torch.randint(0, 500, (3, 5))
    cos, sin = tables = rope(pos, dtype)
    x = torch.randn(3, 5, 6, 16).to(dtype)  # [B, T, H, D]
    want = apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
    assert torch.equal(apply_rope_bthd(x, cos, tables.sin_rot), want)
    wide = torch.randn(3, 5, 9, 16).to(dtype)  # a strided head slice, as the fused q/k/v output gives
    want = apply_rope(wide[:, :, 2:8].transpose(1, 2), cos, sin).transpose(1, 2)
    assert torch.equal(apply_rope_bthd(wide[:, :, 2:8], cos, tables.sin_rot), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_16bit_equals_fp32_statistic(dtype):
    torch.manual_seed(0)
    x, w = (torch.randn(4, 3, 64) * 3).to(dtype), torch.randn(64).to(dtype)
    want = w * F.rms_norm(x.float(), (64,), None, 1e-5).to(dtype)  # transformers' order
    assert torch.equal(rms_norm(x, w, 1e-5), want)


@pytest.mark.parametrize("over", [{}, dict(qkv_bias=True), dict(qk_norm="head"), dict(qk_norm="full", clip_qkv=0.5),
                                  dict(rope_scaling=dict(rope_type="default", partial_rotary_factor=0.5))])
def test_fused_qkv_equals_separate_projections(over):
    model = _model(**over)
    fused = copy.deepcopy(model)
    assert fused.fuse_qkv() == len(fused.blocks)
    sd, sd_fused = model.state_dict(), fused.state_dict()
    assert sd.keys() == sd_fused.keys() and all(torch.equal(sd[k], sd_fused[k]) for k in sd)
    attn = fused.blocks[0].attn
    assert attn._fused() is not None and attn.wk.weight.data_ptr() == attn._fused()[0][attn.wq.weight.shape[0]:].data_ptr()
    ids = torch.randint(0, VOCAB, (2, 7))
    torch.testing.assert_close(fused(ids), model(ids), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # in-place updates (load_state_dict) reach the fused tensor: still one projection
        fused.load_state_dict({k: v * 1.01 if ".attn.w" in k else v for k, v in sd.items()})
        model.load_state_dict({k: v * 1.01 if ".attn.w" in k else v for k, v in sd.items()})
    assert attn._fused() is not None
    torch.testing.assert_close(fused(ids), model(ids), rtol=1e-5, atol=1e-6)


def test_fused_qkv_falls_back_when_parameters_move():
    model = _model()
    fused = copy.deepcopy(model)
    fused.fuse_qkv()
    fused.to(torch.float64)  # new storage per parameter: the fused tensor is stale and must not be used
    assert fused.blocks[0].attn._fused() is None
    ids = torch.randint(0, VOCAB, (1, 6))
    torch.testing.assert_close(fused(ids).float(), model(ids), rtol=1e-5, atol=1e-5)


def test_fuse_qkv_skips_non_plain_linears():
    from moesaic.inference.quantize import quantize_model

    model = _model()
    quantize_model(model, "int8", linears=True)
    assert model.fuse_qkv() == 0


def test_engine_greedy_same_with_fused_qkv():
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[1, 5, 9, 2], [7, 3, 3, 8, 1, 4, 2]]
    outs = []
    for fuse in (False, True):
        model = _model()
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)  # sharp logits: greedy far from ties
        if fuse:
            model.fuse_qkv()
        eng = Engine(model, None, max_batch=2, max_len=32, onednn=False, huge_pages=False)
        outs.append([c.token_ids for c in eng.generate(prompts, params)])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_sdpa_folds_grouped_heads(dtype, masked):
    """T = 1 with grouped kv heads: query heads folded into rows of their kv head == SDPA's enable_gqa."""
    from moesaic.model.attention import sdpa

    torch.manual_seed(0)
    b, h, hkv, d, s = 3, 8, 2, 16, 37
    q = torch.randn(b, 1, h, d).to(dtype).transpose(1, 2)  # [B, H, 1, D] as attention makes it
    k, v = torch.randn(b, hkv, s, d).to(dtype), torch.randn(b, hkv, s, d).to(dtype)
    allowed = torch.rand(b, 1, 1, s) > 0.3
    allowed[..., 0] = True
    mask = torch.zeros(b, 1, 1, s, dtype=dtype).masked_fill_(~allowed, float("-inf")) if masked else None
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = sdpa(q, k, v, mask)
    assert got.shape == want.shape == (b, h, 1, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if masked:  # a bool mask gives the same as its additive form
        torch.testing.assert_close(sdpa(q, k, v, allowed), got, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fusions_equal_plain_ops_on_cuda(dtype):
    """The same identities on the GPU's kernels (F.rms_norm's fused CUDA kernel on 16-bit input; flip)."""
    torch.manual_seed(0)
    x, w = (torch.randn(4, 3, 4096, device="cuda") * 3).to(dtype), torch.randn(4096, device="cuda").to(dtype)
    want = w * F.rms_norm(x.float(), (4096,), None, 1e-5).to(dtype)
    got = rms_norm(x, w, 1e-5)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {got.numel()} differ"
    rope = RotaryEmbedding(128, 1e6).cuda()
    cos, sin = tables = rope(torch.randint(0, 4000, (2, 3), device="cuda"), dtype)
    qkv = torch.randn(2, 3, 48, 128, device="cuda").to(dtype)
    want = apply_rope(qkv[:, :, :40].transpose(1, 2), cos, sin).transpose(1, 2)
    assert torch.equal(apply_rope_bthd(qkv[:, :, :40], cos, tables.sin_rot), want)
    from moesaic.model.attention import sdpa  # decode attention with grouped heads folded, masked

    q = torch.randn(2, 1, 32, 128, device="cuda").to(dtype).transpose(1, 2)
    k, v = (torch.randn(2, 8, 256, 128, device="cuda").to(dtype) for _ in range(2))
    mask = torch.zeros(2, 1, 1, 256, device="cuda", dtype=dtype)
    mask[0, ..., 100:] = float("-inf")
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(), enable_gqa=True)
    torch.testing.assert_close(sdpa(q, k, v, mask).float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@cuda
def test_fused_qkv_and_router_fast_path_on_cuda():
    model = _model(d_model=128, expert_ffn=256).to("cuda", torch.bfloat16)
    fused = copy.deepcopy(model)
    assert fused.fuse_qkv() == len(fused.blocks)
    ids = torch.randint(0, VOCAB, (2, 9), device="cuda")
    with torch.no_grad():
        a, b = fused(ids).float(), model(ids).float()
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * float(b.abs().max()))
        r = model.blocks[0].ffn.router
        h = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
        mask = torch.rand(64, device="cuda") > 0.2
        fast, ref = r.eval()(h, mask), r.train()(h, mask)
        r.eval()
    assert torch.equal(fast.expert_ids_TK, ref.expert_ids_TK)
    torch.testing.assert_close(fast.weights_TK.float(), ref.weights_TK.float(), rtol=1e-2, atol=1e-3)


def test_fused_model_saves_and_loads_as_before(tmp_path):
    """The fused parameters are views of one tensor: the native checkpoint still has the same keys and values."""
    from moesaic.checkpoint.native import load_native, write_model_files

    model = _model()
    model.fuse_qkv()
    write_model_files(tmp_path, model)
    back = load_native(tmp_path)
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)


def test_kv_written_side_by_side_equals_two_writes():
    """k and v adjacent in one tensor (the fused projection's output) go into the cache with one write."""
    from moesaic.inference.cache import SlotCache, side_by_side, write_kv

    b, h, t, d = 2, 3, 4, 8
    qkv = torch.randn(b, t, 2 + 2 * h, d)  # 2 "q" heads, then k, then v
    k, v = qkv[:, :, 2:2 + h].transpose(1, 2), qkv[:, :, 2 + h:].transpose(1, 2)
    assert side_by_side(k, v) is not None and side_by_side(k, v.clone()) is None
    assert side_by_side(v, k) is None  # v before k in memory
    flat = torch.tensor([3, 4, 5, 6, 20, 21, 22, 23])
    one, two = (SlotCache(n_layers=2, n_slots=2, n_kv_heads=h, max_len=16, k_dim=d, v_dim=d, kv_together=True)
                for _ in range(2))
    write_kv(one, 1, flat, k, v)
    write_kv(two, 1, flat, k.clone(), v.clone())  # not side by side: two writes
    assert torch.equal(one.k, two.k) and torch.equal(one.v, two.v)
    assert torch.equal(one.k[1, 0, 3:7], k[0].transpose(0, 1)) and torch.equal(one.v[1, 1, 4:8], v[1].transpose(0, 1))
    assert one.k.abs().sum() > 0 and one.k[0].abs().sum() == 0  # only layer 1
    mla = SlotCache(n_layers=1, n_slots=1, n_kv_heads=h, max_len=8, k_dim=d, v_dim=d - 2, kv_together=True)
    assert mla.kv is None  # different head dims: two buffers
    assert SlotCache(n_layers=1, n_slots=1, n_kv_heads=h, max_len=8, k_dim=d, v_dim=d).kv is None  # CPU default
