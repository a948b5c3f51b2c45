"""One optimizer step: accumulation invariance of the balancing terms, padding excluded, loss goes down,
the balancing terms move the load."""

import copy

import pytest
import torch

from moesaic.config import ModelConfig
from moesaic.model import build_model
from moesaic.model.losses import load_balance_loss
from moesaic.train.step import IGNORE, MicroBatch, evaluate, forward_backward, update_biases


def tiny(**kw):
    return ModelConfig.preset("tiny", **kw)


def padded_batch(cfg, b=8, s=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (b, s + 1), generator=g)
    lengths = torch.tensor([s + 1 - (i % 4) * 3 for i in range(b)])  # right padding of 0, 3, 6, 9
    mask = torch.arange(s + 1)[None] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE)
    return ids[:, :-1], targets, mask[:, :-1]


def micro(ids, targets, mask, n):
    m = ids.shape[0] // n
    return [MicroBatch(ids[i:i + m], targets[i:i + m], mask[i:i + m]) for i in range(0, ids.shape[0], m)]


def run(model, mbs):
    model.zero_grad(set_to_none=True)
    st = forward_backward(model, mbs)
    return st, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "switch"])
def test_one_vs_four_micro_batches_same_losses_counts_and_gradients(router):
    kw = dict(router=router, aux_loss_coef=0.1, z_loss_coef=0.01)
    if router == "switch":
        kw.update(top_k=1)
    if router == "sigmoid_topk":
        kw.update(bias_update_rate=0.01)
    cfg = tiny(**kw)
    model = build_model(cfg).train()
    ids, targets, mask = padded_batch(cfg)
    torch.manual_seed(5)
    st1, g1 = run(model, micro(ids, targets, mask, 1))
    torch.manual_seed(5)
    st4, g4 = run(model, micro(ids, targets, mask, 4))
    assert st1.n_tokens == st4.n_tokens == int(mask.sum())
    for a, b in zip(st1.counts_LE, st4.counts_LE):
        assert torch.equal(a, b)
        assert int(a.sum()) == int(mask.sum()) * cfg.top_k  # padding never counted
    assert st1.aux_loss == pytest.approx(st4.aux_loss, rel=1e-6)
    assert st1.z_loss == pytest.approx(st4.z_loss, rel=1e-6)
    assert st1.lm_loss == pytest.approx(st4.lm_loss, rel=1e-6)
    for n in g1:
        torch.testing.assert_close(g4[n], g1[n], rtol=1e-4, atol=1e-7, msg=n)
    if router == "sigmoid_topk":
        m1, m4 = copy.deepcopy(model), copy.deepcopy(model)
        update_biases(m1, st1.counts_LE)
        update_biases(m4, st4.counts_LE)
        for l1, l4 in zip(m1.moe_layers(), m4.moe_layers()):
            assert torch.equal(l1.router.correction_bias, l4.router.correction_bias)
            assert l1.router.correction_bias.abs().sum() > 0


def test_prepass_sees_the_same_jitter_noise_as_the_real_pass():
    cfg = tiny(aux_loss_coef=0.1, router_jitter=0.5)
    model = build_model(cfg).train()
    ids, targets, mask = padded_batch(cfg)
    st, _ = run(model, micro(ids, targets, mask, 4))
    for pre, real in zip(st.prepass_counts_LE, st.counts_LE):
        assert torch.equal(pre, real)


def test_global_f_matters_local_f_would_give_another_gradient():
    """The naive scheme (each micro-batch's own f) differs, so the pre-pass is doing real work."""
    cfg = tiny(aux_loss_coef=1.0)
    model = build_model(cfg).train()
    ids, targets, mask = padded_batch(cfg)
    _, g1 = run(model, micro(ids, targets, mask, 1))
    model.zero_grad(set_to_none=True)
    n_tok = int(mask.sum())
    for mb in micro(ids, targets, mask, 4):
        out = model.forward_aux(mb.input_ids, token_mask=mb.token_mask)
        loss = out.logits.sum() * 0
        for r in out.router_outputs:
            loss = loss + load_balance_loss(r.counts_E, r.prob_sum_E, n_tok, r.top_k)
        loss.backward()
    local = model.blocks[0].ffn.router.weight.grad
    _, ga = run(build_model(cfg.replace(aux_loss_coef=0.0)).train(), micro(ids, targets, mask, 1))
    # router gradient of the aux term alone under the exact scheme:
    torch.manual_seed(0)
    exact = g1["blocks.0.ffn.router.weight"]
    assert not torch.allclose(local, exact, atol=1e-6)


def test_padding_does_not_change_statistics():
    cfg = tiny(aux_loss_coef=0.1)
    model = build_model(cfg).train()
    ids, targets, mask = padded_batch(cfg, b=2, s=16)
    mask[:] = True
    targets = ids.roll(-1, 1)
    st_full, _ = run(model, [MicroBatch(ids, targets, mask)])
    pad_ids = torch.cat([ids, torch.zeros(2, 5, dtype=ids.dtype)], 1)
    pad_t = torch.cat([targets, torch.full((2, 5), IGNORE)], 1)
    pad_m = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], 1)
    st_pad, _ = run(model, [MicroBatch(pad_ids, pad_t, pad_m)])  # right padding: causal, so same prefix
    for a, b in zip(st_full.counts_LE, st_pad.counts_LE):
        assert torch.equal(a, b)
    assert st_pad.aux_loss == pytest.approx(st_full.aux_loss, rel=1e-5)
    assert st_pad.lm_loss == pytest.approx(st_full.lm_loss, rel=1e-5)


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    cfg = tiny()
    model = build_model(cfg).train()
    ids, targets, mask = padded_batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = forward_backward(model, micro(ids, targets, mask, 2)).lm_loss
    opt.step()
    model.zero_grad(set_to_none=True)
    after = forward_backward(model, micro(ids, targets, mask, 2)).lm_loss
    assert after < before - 1e-3


def _imbalance_after(cfg, steps, train_routers_only=True, lr=0.01):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with torch.no_grad():  # start skewed: every token shares a direction v that expert 0's router row likes
        v = torch.randn(cfg.d_model).sign()
        model.embed.weight += 0.05 * v
        for layer in model.moe_layers():
            layer.router.weight[0] += 0.03 * v
    params = [p for n, p in model.named_parameters() if ".router." in n or not train_routers_only]
    opt = torch.optim.Adam(params, lr=lr)
    ids, targets, mask = padded_batch(cfg, b=8, s=32, seed=1)
    first = None
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        st = forward_backward(model, micro(ids, targets, mask, 2))
        first = st.imbalance if first is None else first
        opt.step()
        update_biases(model, st.counts_LE)
    return first, st.imbalance


def test_balance_loss_evens_the_load():
    start, with_aux = _imbalance_after(tiny(aux_loss_coef=1.0), 40, lr=0.002)
    _, without = _imbalance_after(tiny(aux_loss_coef=0.0), 40, lr=0.002)
    assert start == 4.0  # every token's first choice is expert 0: max/mean = (1/2) / (1/8)
    assert with_aux < 0.6 * start and without > 0.9 * start


def test_loss_free_bias_evens_the_load():
    cfg = tiny(router="sigmoid_topk", aux_loss_coef=0.0)
    start, with_bias = _imbalance_after(cfg.replace(bias_update_rate=0.005), 40, lr=0.0)
    _, without = _imbalance_after(cfg, 40, lr=0.0)
    assert with_bias < 0.6 * start and without == pytest.approx(start)


def test_evaluate_is_mean_cross_entropy():
    cfg = tiny()
    model = build_model(cfg).eval()
    w = torch.randint(0, cfg.vocab_size, (5, 17))
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(w[:, :-1]).reshape(-1, cfg.vocab_size), w[:, 1:].reshape(-1))
    assert evaluate(model, w, batch_size=2) == pytest.approx(float(ref), rel=1e-5)
