"""Routers against hand-computed expectations on small inputs."""

import math

import pytest
import torch

from moesaic import ModelConfig
from moesaic.model.losses import load_balance_loss, router_loss, update_correction_bias, z_loss
from moesaic.model.router import build_router, drop_over_capacity


def _router(e, **kw):
    """A router whose logits equal its input (weight = identity), D = E."""
    cfg = ModelConfig.preset("tiny", d_model=e, n_heads=1, n_kv_heads=1, head_dim=2, num_experts=e, **kw)
    r = build_router(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.eye(e))
    return r.eval()


def test_softmax_topk_renormalised():
    r = _router(4, top_k=2, normalize_topk=True)
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = r(x)
    assert out.expert_ids_TK.tolist() == [[1, 2]]
    p = torch.softmax(x, -1)[0]
    expect = torch.tensor([p[1], p[2]]) / (p[1] + p[2])
    torch.testing.assert_close(out.weights_TK[0], expect)
    assert out.weights_TK.sum().item() == pytest.approx(1.0)


def test_softmax_topk_unnormalised_keeps_probabilities():
    r = _router(4, top_k=2, normalize_topk=False)
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = r(x)
    p = torch.softmax(x, -1)[0]
    torch.testing.assert_close(out.weights_TK[0], torch.stack([p[1], p[2]]))


def test_sigmoid_bias_changes_selection_not_weights():
    r = _router(4, router="sigmoid_topk", top_k=2, normalize_topk=True, routed_scaling_factor=2.5)
    x = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    out = r(x)
    assert sorted(out.expert_ids_TK[0].tolist()) == [0, 1]
    with torch.no_grad():
        r.correction_bias.copy_(torch.tensor([0.0, -1.0, 0.0, 0.9]))  # 1 down, 3 up
    out = r(x)
    assert sorted(out.expert_ids_TK[0].tolist()) == [0, 3]
    s = torch.sigmoid(x[0])
    w = dict(zip(out.expert_ids_TK[0].tolist(), out.weights_TK[0].tolist()))
    # weights come from the unbiased scores, normalised, times the scaling factor
    assert w[0] == pytest.approx(2.5 * s[0].item() / (s[0] + s[3]).item(), rel=1e-6)
    assert w[3] == pytest.approx(2.5 * s[3].item() / (s[0] + s[3]).item(), rel=1e-6)


def test_group_limited_selection():
    # 8 experts in 4 groups of 2; keep the 2 best groups by the sum of their top-2 scores.
    r = _router(8, router="sigmoid_topk", top_k=2, n_group=4, topk_group=2, normalize_topk=True)
    #            g0          g1          g2          g3
    x = torch.tensor([[5.0, -5.0, 1.0, 1.0, 0.9, 0.9, 4.0, -5.0]])
    # sigmoid sums: g0 ~ 0.9933+0.0067=1.0, g1 ~ 1.462, g2 ~ 1.42, g3 ~ 0.989
    # best groups g1, g2 -> top-2 inside them is {2, 3}: expert 0 (best single score) is excluded.
    out = r(x)
    assert sorted(out.expert_ids_TK[0].tolist()) == [2, 3]
    # without group limits expert 0 and 6 win
    r2 = _router(8, router="sigmoid_topk", top_k=2)
    assert sorted(r2(x).expert_ids_TK[0].tolist()) == [0, 6]


def test_switch_capacity_drops_overflow_in_token_order():
    r = _router(2, router="switch", top_k=1, capacity_factor=1.0, normalize_topk=False)
    # 6 tokens; capacity = ceil(1.0 * 6 / 2) = 3; tokens 0,1,2,4,5 prefer expert 0.
    x = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] + [[2.0, 0.0]] * 2)
    out = r(x)
    assert out.expert_ids_TK[:, 0].tolist() == [0, 0, 0, 1, -1, -1]
    assert out.n_dropped == 2 and out.dropped_fraction == pytest.approx(2 / 6)
    assert out.weights_TK[4:].abs().sum() == 0
    p = torch.softmax(x[0], -1)[0]
    assert out.weights_TK[0, 0].item() == pytest.approx(p.item())  # top-1 probability, not renormalised
    assert out.counts_E.tolist() == [3, 1]


def test_drop_over_capacity_order_across_slots():
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    kept, n = drop_over_capacity(ids, 3, 2)
    assert kept.tolist() == [[0, 1], [0, 2], [1, -1], [-1, -1]]
    assert n == 3


def test_padding_excluded_from_statistics():
    r = _router(4, top_k=1)
    x = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    out = r(x, token_mask_T=torch.tensor([True, True, False]))
    assert out.counts_E.tolist() == [1, 1, 0, 0]
    assert out.n_tokens == 2
    assert out.expert_ids_TK[2, 0] == -1
    torch.testing.assert_close(out.prob_sum_E, torch.softmax(x[:2], -1).sum(0))


def test_top_k_override_and_bounds():
    r = _router(8, top_k=4)
    x = torch.randn(5, 8)
    assert r(x, top_k=2).expert_ids_TK.shape == (5, 2)
    with pytest.raises(ValueError, match="top_k"):
        r(x, top_k=9)


def test_balance_loss_formula_and_uniform_minimum():
    e, k, t = 4, 2, 6
    counts = torch.tensor([4.0, 4.0, 2.0, 2.0])
    prob_sum = torch.tensor([2.0, 1.5, 1.5, 1.0])
    expect = e * sum((counts[i] / (t * k)) * (prob_sum[i] / t) for i in range(e))
    assert load_balance_loss(counts, prob_sum, t, k).item() == pytest.approx(expect.item())
    uniform = load_balance_loss(torch.full((e,), 3.0), torch.full((e,), t / e), t, k)
    assert uniform.item() == pytest.approx(1.0)


def test_balance_loss_from_router_matches_hand_formula():
    r = _router(4, top_k=2).train()
    x = torch.randn(10, 4)
    out = r(x)
    p = torch.softmax(x, -1)
    f = torch.bincount(out.expert_ids_TK.flatten(), minlength=4).float() / 20
    expect = 4 * (f * p.mean(0)).sum()
    torch.testing.assert_close(load_balance_loss(out.counts_E, out.prob_sum_E, out.n_tokens, 2), expect)


def test_z_loss_formula():
    r = _router(4, top_k=2)
    x = torch.randn(7, 4)
    out = r(x)
    expect = torch.logsumexp(x, -1).pow(2).mean()
    torch.testing.assert_close(z_loss(out.z_sum, out.n_tokens), expect)
    total = router_loss([out], aux_coef=0.0, z_coef=0.5)
    torch.testing.assert_close(total, 0.5 * expect)


def test_router_loss_switchable():
    r = _router(4, top_k=2)
    out = r(torch.randn(7, 4))
    assert router_loss([out], 0.0, 0.0).item() == 0.0


def test_loss_free_bias_update():
    bias = torch.zeros(4)
    update_correction_bias(bias, torch.tensor([10, 2, 4, 0]), rate=0.1)  # mean load 4
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.0, 0.1]))
    assert not bias.requires_grad


def test_router_jitter_only_in_training():
    r = _router(4, top_k=2, router_jitter=0.5)
    x = torch.randn(16, 4)
    torch.testing.assert_close(r(x).logits_TE, x)  # eval: no noise
    r.train()
    assert not torch.allclose(r(x).logits_TE, x)


def test_capacity_formula():
    from moesaic.config import capacity

    assert capacity(1.25, 10, 1, 4) == math.ceil(1.25 * 10 / 4)


@pytest.mark.parametrize("k", [1, 2, 8])
def test_softmax_topk_fast_path_equals_reference(k):
    """Eval mode (renormalised): softmax of the top-k logits == renormalised top-k of the softmax."""
    cfg = ModelConfig.preset("tiny", d_model=32, num_experts=8, top_k=2, normalize_topk=True)
    torch.manual_seed(k)
    r = build_router(cfg)
    x = torch.randn(64, 32) * 3
    mask = torch.rand(64) > 0.2
    with torch.no_grad():
        ref = r.train()(x, mask, top_k=k)  # training mode: the reference select (softmax, top-k, divide)
        fast = r.eval()(x, mask, top_k=k)
    assert torch.equal(fast.expert_ids_TK, ref.expert_ids_TK)
    torch.testing.assert_close(fast.weights_TK, ref.weights_TK, rtol=1e-5, atol=1e-7)
    assert (fast.weights_TK[~mask] == 0).all() and (fast.expert_ids_TK[~mask] == -1).all()
    torch.testing.assert_close(fast.probs_TE, ref.probs_TE)  # computed on first access
    assert torch.equal(fast.counts_E, ref.counts_E)


def test_router_keeps_an_fp32_copy_of_a_16bit_weight_until_it_changes():
    cfg = ModelConfig.preset("tiny", d_model=32, num_experts=8, top_k=2)
    r = build_router(cfg).to(torch.bfloat16).eval()
    x = torch.randn(5, 32).to(torch.bfloat16)
    with torch.no_grad():
        want = torch.nn.functional.linear(x.float(), r.weight.float())
        assert torch.equal(r.logits(x), want)
        r.weight.mul_(2.0)  # in place: the copy must follow
        assert torch.equal(r.logits(x), torch.nn.functional.linear(x.float(), r.weight.float()))
    r.train()
    y = r.logits(x)  # with autograd: the weight itself, so gradients reach it
    y.sum().backward()
    assert r.weight.grad is not None



def test_model_built_under_inference_mode_runs_in_bf16():
    """A model made under torch.inference_mode has inference-tensor weights (no version counter): the
    gate's cached fp32 copy must not key on one, and decode gives the plain forward's logits."""
    from moesaic.model import build_model

    cfg = ModelConfig.preset("tiny", num_experts=4, top_k=2)
    with torch.inference_mode():
        torch.manual_seed(0)
        model = build_model(cfg).to(torch.bfloat16).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, 5))
        a = model(ids)
        b = model(ids)
    assert torch.isfinite(a.float()).all() and torch.equal(a, b)
