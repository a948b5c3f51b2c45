"""Model identities: causality, MoE(E=1,K=1) == dense FFN, parameter counts by hand, cache == full forward."""

import pytest
import torch

from moesaic import ModelConfig, build_model
from moesaic.model.cache import StaticCache
from moesaic.model.experts import SwiGLU
from moesaic.model.moe import MoELayer


@pytest.mark.parametrize("preset", ["tiny", "deepseek-mini", "switch-mini"])
def test_forward_shapes_and_router_outputs(preset):
    cfg = ModelConfig.preset(preset, vocab_size=97, max_seq_len=32)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 97, (2, 9))
    out = model.forward_aux(ids)
    assert out.logits.shape == (2, 9, 97)
    assert len(out.router_outputs) == len(cfg.moe_layers)
    for r in out.router_outputs:
        assert r.expert_ids_TK.shape == (18, cfg.top_k) and r.n_tokens == 18
        assert int(r.counts_E.sum()) + r.n_dropped == 18 * cfg.top_k
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("preset", ["tiny", "deepseek-mini"])
def test_causal(preset):
    cfg = ModelConfig.preset(preset, vocab_size=101, max_seq_len=32)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 101, (1, 12))
    base = model(ids)
    for t in (0, 5, 10):
        changed = ids.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 1) % 101
        out = model(changed)
        # equal up to round-off (the expert matmuls batch different rows together)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-6)
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-3


def test_single_expert_top1_equals_dense_ffn():
    cfg = ModelConfig.preset("tiny", num_experts=1, top_k=1, expert_ffn=48, normalize_topk=True)
    moe = MoELayer(cfg)
    dense = SwiGLU(cfg.d_model, 48)
    with torch.no_grad():
        dense.w13.weight.copy_(moe.experts.w13[0])
        dense.w2.weight.copy_(moe.experts.w2[0])
    x = torch.randn(3, 5, cfg.d_model)
    y, r = moe(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)
    assert torch.all(r.weights_TK == 1.0)


def test_whole_model_with_one_expert_equals_dense_model():
    moe_cfg = ModelConfig.preset("tiny", num_experts=1, top_k=1, expert_ffn=128, aux_loss_coef=0.0)
    dense_cfg = moe_cfg.replace(num_experts=0, ffn=128)
    moe, dense = build_model(moe_cfg).eval(), build_model(dense_cfg).eval()
    sd = {}
    for k, v in moe.state_dict().items():
        if ".ffn.router." in k:
            continue
        sd[k.replace("ffn.experts.w13", "ffn.w13.weight").replace("ffn.experts.w2", "ffn.w2.weight")] = \
            v[0] if ".ffn.experts." in k else v
    dense.load_state_dict(sd)
    ids = torch.randint(0, moe_cfg.vocab_size, (2, 7))
    torch.testing.assert_close(moe(ids), dense(ids), rtol=1e-5, atol=1e-5)


def test_param_count_tiny_by_hand():
    # tiny: V=512, D=64, L=2, H=4, Hkv=2, Dh=16, E=8, K=2, F=64
    attn = 64 * 64 + 2 * (64 * 32) + 64 * 64  # wq, wk, wv, wo
    norms = 2 * 64
    router = 8 * 64
    expert = 2 * 64 * 64 + 64 * 64  # w13 + w2
    pc = build_model(ModelConfig.preset("tiny")).count_params()
    assert pc.total == 2 * (attn + norms + router + 8 * expert) + 64
    assert pc.active == 2 * (attn + norms + router + 2 * expert) + 64
    assert pc.embedding == 512 * 64 and pc.lm_head == 512 * 64


def test_param_count_deepseek_mini_by_hand():
    # V=8192, D=256, L=4, H=Hkv=8, Dh=32, dense FFN 1024 in layer 0, then E=32, K=4, F=128, 1 shared (128)
    attn = 4 * 256 * 256
    norms = 2 * 256
    dense_ffn = 3 * 256 * 1024
    router, expert, shared = 32 * 256, 3 * 256 * 128, 3 * 256 * 128
    pc = build_model(ModelConfig.preset("deepseek-mini")).count_params()
    layer0 = attn + norms + dense_ffn
    assert pc.total == layer0 + 3 * (attn + norms + router + 32 * expert + shared) + 256
    assert pc.active == layer0 + 3 * (attn + norms + router + 4 * expert + shared) + 256
    assert pc.active < pc.total / 3


def test_tied_embeddings_counted_once():
    pc = build_model(ModelConfig.preset("tiny", tie_embeddings=True)).count_params()
    assert pc.lm_head == 0


@pytest.mark.parametrize("preset", ["tiny", "deepseek-mini"])
def test_cached_decoding_equals_full_forward(preset):
    cfg = ModelConfig.preset(preset, vocab_size=97, max_seq_len=32)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 97, (2, 10))
    full = model(ids)
    cache = StaticCache.for_model(cfg, batch=2, max_len=16)
    step = [model(ids[:, :6], cache=cache)]
    for t in range(6, 10):
        step.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(step, 1), full, rtol=1e-4, atol=1e-5)


def test_backward_reaches_router_and_experts():
    cfg = ModelConfig.preset("tiny")
    model = build_model(cfg)
    out = model.forward_aux(torch.randint(0, cfg.vocab_size, (2, 8)))
    from moesaic.model.losses import router_loss

    loss = out.logits.logsumexp(-1).mean() + router_loss(out.router_outputs, 0.01, 0.001)
    loss.backward()
    moe = model.moe_layers()[0]
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.experts.w13.grad.abs().sum() > 0


def test_bad_input_ids_shape():
    model = build_model(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
