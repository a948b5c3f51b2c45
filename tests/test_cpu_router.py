"""The C router (kernels/cpu_router.py) against the model's own routers, and the engine with it against the
engine without it."""

from __future__ import annotations

import pytest
import torch

from moesaic import Engine, ModelConfig, SamplingParams, build_model
from moesaic.inference.cpu_router import CpuSigmoidTopK, CpuSoftmaxTopK, use_cpu_router
from moesaic.kernels import cpu_router
from moesaic.model.router import SigmoidTopK, SoftmaxTopK, build_router

pytestmark = pytest.mark.skipif(not cpu_router.available(), reason="no C compiler / AVX-512 here")

D = 48
KINDS = {  # the router kinds of the benchmark models and their relatives
    "mixtral": dict(router="softmax_topk"),
    "qwen2-no-renorm": dict(router="softmax_topk", normalize_topk=False),
    "deepseek-v3": dict(router="sigmoid_topk", routed_scaling_factor=2.5),
    "sigmoid-no-norm": dict(router="sigmoid_topk", normalize_topk=False),
}


def make_router(kind: str, e: int, k: int, seed: int = 0):
    cfg = ModelConfig(vocab_size=32, d_model=D, n_layers=1, n_heads=4, num_experts=e, top_k=k, expert_ffn=16,
                      **KINDS[kind])
    torch.manual_seed(seed)
    r = build_router(cfg).eval()
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
        if isinstance(r, SigmoidTopK):
            r.correction_bias.normal_(0, 0.1)
    return r


@pytest.fixture
def calls(monkeypatch):
    """Results of every kernel call (None: it gave up)."""
    got = []
    real = cpu_router.route_unchecked

    def spy(*a, **k):
        got.append(real(*a, **k))
        return got[-1]

    monkeypatch.setattr(cpu_router, "route_unchecked", spy)
    return got


def switched(r):
    want = {SoftmaxTopK: CpuSoftmaxTopK, SigmoidTopK: CpuSigmoidTopK}[type(r)]
    r.__class__ = want
    return r


def both(r, x, top_k=None, mask=None):
    """(the model's RouterOutput, the switched router's) for the same input."""
    cls = type(r)
    with torch.no_grad():
        want = r(x, mask, top_k)
        got = switched(r)(x, mask, top_k)
    r.__class__ = cls
    return want, got


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("e,k", [(8, 1), (8, 2), (8, 8), (64, 2), (64, 8), (128, 1), (128, 8)])
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
def test_c_router_matches_model_router(kind, e, k, dtype, weight_dtype, calls):
    r = make_router(kind, e, k, seed=e + k).to(weight_dtype)
    g = torch.Generator().manual_seed(e * 10 + k)
    for t in (1, 2, 3, 8):
        x = torch.randn(t, D, generator=g).to(dtype)
        want, got = both(r, x)
        assert got.expert_ids_TK.dtype == torch.int64 and got.weights_TK.dtype == dtype
        assert torch.equal(got.expert_ids_TK, want.expert_ids_TK)  # the same experts, in the same order
        tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: rounded once from fp32 weights equal to ~1e-7
        torch.testing.assert_close(got.weights_TK, want.weights_TK, rtol=tol, atol=tol)
        torch.testing.assert_close(got.logits_TE, want.logits_TE, rtol=1e-5, atol=1e-5)  # fp32 rounding apart
        torch.testing.assert_close(got.probs_TE, want.probs_TE, rtol=1e-5, atol=1e-6)
    assert len(calls) == 4 and all(c is not None for c in calls)  # every call took the C path


@pytest.mark.parametrize("kind", list(KINDS))
def test_lower_top_k_override(kind, calls):
    r = make_router(kind, 64, 8)
    x = torch.randn(2, D)
    for k in (1, 3, 64):
        want, got = both(r, x, top_k=k)
        assert torch.equal(got.expert_ids_TK, want.expert_ids_TK)
        torch.testing.assert_close(got.weights_TK, want.weights_TK, rtol=1e-6, atol=1e-6)
    assert len(calls) == 3


@pytest.mark.parametrize("kind", list(KINDS))
def test_ties_leave_the_choice_to_torch(kind, calls):
    """Exact ties (a zero row: all logits equal; duplicated gate rows; saturated sigmoids) make the kernel give
    up, and the switched router returns torch's choice, whatever torch's tie-breaking is."""
    r = make_router(kind, 8, 2)
    with torch.no_grad():
        r.weight[5] = r.weight[2]
        r.weight[6] = r.weight[2] * 40  # sigmoid saturates to 1 on rows where experts 2 and 6 are both large
        if isinstance(r, SigmoidTopK):
            r.correction_bias.zero_()
    x = torch.cat([torch.zeros(1, D), torch.randn(3, D)])
    x[1] = r.weight[2].detach() * 3
    want, got = both(r, x)
    assert torch.equal(got.expert_ids_TK, want.expert_ids_TK)
    torch.testing.assert_close(got.weights_TK, want.weights_TK, rtol=1e-6, atol=1e-6)
    assert calls and all(c is None for c in calls)  # the kernel gave up: torch decided


def eye_route(values, k, kind, **kw):
    """route() with an identity gate: the logits are `values` exactly, and S = |values|."""
    x = torch.tensor([values])
    return cpu_router.route(x, torch.eye(x.shape[1]), k, kind, **kw)


def test_kernel_ties_below_the_candidates_do_not_matter():
    values = [5.0, 1.0, 4.0, 1.0, 1.0, 0.0, 1.0, -3.0]
    w, ids, logits = eye_route(values, 2, cpu_router.KIND_SOFTMAX_RENORM)
    assert ids.tolist() == [[0, 2]] and logits.tolist() == [values]
    torch.testing.assert_close(w, torch.tensor([values])[:, [0, 2]].softmax(-1))
    assert eye_route(values, 3, cpu_router.KIND_SOFTMAX_RENORM) is None  # 1.0 x 4 at the boundary
    assert eye_route([1.0, float("nan"), 0.0], 1, cpu_router.KIND_SOFTMAX) is None


@pytest.mark.parametrize("kind", [cpu_router.KIND_SOFTMAX_RENORM, cpu_router.KIND_SOFTMAX])
def test_kernel_gives_up_within_torch_rounding(kind):
    """Distinct logits closer than torch's matmul (gamma_D * S) and softmax roundings may be ordered either way
    by torch: the kernel leaves them to it; a clear gap it decides."""
    assert eye_route([1.0, 1.0 + 2 ** -22, -1.0], 1, kind) is None  # 2 ulps apart
    assert eye_route([1.0, 1.0 + 2 ** -22, -1.0], 2, kind) is None  # the order within the top k too
    _, ids, _ = eye_route([1.0, 1.0 + 1e-4, -1.0], 2, kind)
    assert ids.tolist() == [[1, 0]]


def test_kernel_rejects_bad_input():
    x, w = torch.randn(2, 8), torch.randn(8, 8)
    with pytest.raises(ValueError, match="x must be a contiguous"):
        cpu_router.route(x.double(), w, 2, cpu_router.KIND_SOFTMAX)
    with pytest.raises(ValueError, match="weight must be a contiguous"):
        cpu_router.route(x, w.t(), 2, cpu_router.KIND_SOFTMAX)
    with pytest.raises(ValueError, match="1 <= k"):
        cpu_router.route(x, w, 9, cpu_router.KIND_SOFTMAX)
    with pytest.raises(ValueError, match="weight"):
        cpu_router.route(x, torch.randn(8, 7), 2, cpu_router.KIND_SOFTMAX)
    with pytest.raises(ValueError, match="T <="):
        cpu_router.route(torch.randn(cpu_router.MAX_ROWS + 1, 8), w, 2, cpu_router.KIND_SOFTMAX)
    with pytest.raises(ValueError, match="bias"):
        cpu_router.route(x, w, 2, cpu_router.KIND_SIGMOID)
    with pytest.raises(ValueError, match="bias"):
        cpu_router.route(x, w, 2, cpu_router.KIND_SOFTMAX, bias_E=torch.zeros(8))
    with pytest.raises(ValueError, match="kind"):
        cpu_router.route(x, w, 2, 7)


def test_what_the_switched_router_leaves_to_torch(calls):
    r = switched(make_router("mixtral", 8, 2))
    x = torch.randn(3, D)
    with torch.no_grad():
        want = SoftmaxTopK.forward(r, x)
        for out in (r(x, torch.tensor([True, False, True])),  # a token mask (padded prefill)
                    r(torch.randn(cpu_router.MAX_ROWS + 1, D)),  # many rows
                    r(x.half()),  # a dtype the kernel has no path for
                    r(torch.randn(6, 2 * D)[:, :D]),  # strided rows
                    r.train()(x)):  # training
            assert out.expert_ids_TK.shape[1] == 2
        r.eval()
    r(x)  # gradient wanted (the gate weight requires grad)
    assert calls == []
    with pytest.raises(ValueError, match="top_k override"):
        r(x, top_k=9)
    with torch.no_grad():
        assert torch.equal(r(x).expert_ids_TK, want.expert_ids_TK) and len(calls) == 1


def test_use_cpu_router_switches_only_what_it_supports():
    base = dict(vocab_size=32, d_model=D, n_layers=2, n_heads=4, num_experts=8, expert_ffn=16)
    assert use_cpu_router(build_model(ModelConfig(**base, top_k=1, router="switch", capacity_factor=1.25,
                                                  normalize_topk=False))) == 0
    grouped = build_model(ModelConfig(**base, router="sigmoid_topk", n_group=4, topk_group=2))
    assert use_cpu_router(grouped) == 0
    assert type(grouped.blocks[0].ffn.router) is SigmoidTopK
    plain = build_model(ModelConfig(**base))
    assert use_cpu_router(plain) == 2 and use_cpu_router(plain) == 0
    assert isinstance(plain.blocks[1].ffn.router, SoftmaxTopK)
    capped = build_model(ModelConfig(**base, capacity_factor=1.0))
    assert use_cpu_router(capped) == 2  # switched, but capacity runs the model's own forward (see above)


CFG = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, num_experts=8, top_k=2,
           expert_ffn=32, ffn=64)


@pytest.mark.parametrize("extra", [{}, {"num_experts": 16, "top_k": 4, "normalize_topk": False},
                                   {"router": "sigmoid_topk", "routed_scaling_factor": 2.5, "num_shared_experts": 1}])
def test_engine_with_c_router_matches_engine_without(extra, calls):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**CFG, **extra})).eval()
    if extra.get("router") == "sigmoid_topk":
        with torch.no_grad():
            for layer in model.moe_layers():
                layer.router.correction_bias.normal_(0, 0.05)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    want = [c.token_ids for c in Engine(model, None, max_batch=4, onednn=False).generate(prompts, params)]
    assert calls == []  # without onednn the engine switches nothing
    fast = Engine(model, None, max_batch=4)
    assert all(isinstance(m.router, (CpuSoftmaxTopK, CpuSigmoidTopK)) for m in fast.model.moe_layers())
    got = [c.token_ids for c in fast.generate(prompts, params)]
    assert got == want
    assert len(calls) >= 2 * 11 and all(c is not None for c in calls)  # every decode step, both layers, in C
    n = len(calls)
    one = Engine(model, None, max_batch=1)  # batch 1: the benchmark's path
    assert [c.token_ids for c in one.generate(prompts[:1], params)] == want[:1]
    assert len(calls) - n >= 2 * 12 and all(c is not None for c in calls)  # the prefill's 5 rows too
