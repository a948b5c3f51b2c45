"""The grouped C experts (kernels.cpu_experts) against plain PyTorch: fp32, bf16, int8; awkward row counts and widths."""

from __future__ import annotations

import pytest
import torch

from moesaic import kernels
from moesaic.kernels import cpu_experts
from moesaic.kernels.quant import Int8Weight, quantize_int8
from moesaic.kernels.reference import swiglu

pytestmark = pytest.mark.skipif(not cpu_experts.available(), reason="C experts not buildable here (no cc / AVX-512)")


def _plain(x, counts, w13, w2):
    """Per-expert SwiGLU MLP in fp32 (bf16 rounding of h, as the bf16 reference has), rows sorted by expert."""
    out, s = [], 0
    for e, c in enumerate(counts):
        h = (x[s:s + c].float() @ w13[e].float().t()).to(x.dtype)
        out.append(swiglu(h).float() @ w2[e].float().t())
        s += c
    return torch.cat(out)


def _weights(kind, e, f, d):
    w13, w2 = torch.randn(e, 2 * f, d) * 0.2, torch.randn(e, d, f) * 0.2
    if kind == "int8":
        q13, q2 = Int8Weight(*quantize_int8(w13)), Int8Weight(*quantize_int8(w2))
        return q13, q2, q13.dequantize(), q2.dequantize()
    dt = torch.float32 if kind == "fp32" else torch.bfloat16
    return w13.to(dt), w2.to(dt), w13.to(dt), w2.to(dt)


TOL = {"fp32": 1e-5, "bf16": 1e-2, "int8": 1e-5}


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
# widths that are and are not multiples of 16 / 32; d=1100: more than one chunk of inputs (KC) at > 8 rows
@pytest.mark.parametrize("f,d", [(64, 48), (9, 37), (40, 100), (24, 1100)])
@pytest.mark.parametrize("counts", [[0, 1, 7, 3, 0], [17, 0, 0, 0, 0], [1, 1, 1, 1, 1], [4, 0, 5, 2, 8],
                                    [9, 2, 0, 6, 12]])  # 0 rows, 1 row, blocks of 4 / 8 and their remainders
@pytest.mark.parametrize("threads", [1, 2])
def test_experts_match_plain_pytorch(kind, f, d, counts, threads):
    torch.manual_seed(0)
    w13, w2, r13, r2 = _weights(kind, len(counts), f, d)
    x = torch.randn(sum(counts), d).to(torch.bfloat16 if kind == "bf16" else torch.float32)
    assert cpu_experts.usable(x, w13, w2)
    got = cpu_experts.experts(x, counts, w13, w2, threads=threads)
    want = _plain(x, counts, r13, r2)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max() <= TOL[kind] * want.abs().max()


def test_max_rows_computes_only_the_small_experts():
    torch.manual_seed(0)
    counts = [3, 10, 0, 2]
    w13, w2, _, _ = _weights("fp32", 4, 16, 32)
    x = torch.randn(sum(counts), 32)
    full = cpu_experts.experts(x, counts, w13, w2)
    part = cpu_experts.experts(x, counts, w13, w2, max_rows=8)
    assert torch.equal(part[:3], full[:3]) and torch.equal(part[13:], full[13:])
    assert cpu_experts.experts(x, counts, w13, w2, max_rows=1).shape == (15, 32)  # nothing small enough: no call


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("d", [48, 70])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_token_sums_its_experts(kind, d, threads):
    torch.manual_seed(0)
    w13, w2, r13, r2 = _weights(kind, 6, 40, d)
    x = torch.randn(1, d).to(torch.bfloat16 if kind == "bf16" else torch.float32)
    ids, ws = [4, -1, 0, 5], [0.5, 0.3, 0.15, 0.05]
    got = cpu_experts.one_token(x, ids, ws, w13, w2, threads=threads)
    want = sum(w * _plain(x, [1], r13[e:e + 1], r2[e:e + 1]) for e, w in zip(ids, ws) if e >= 0)
    assert got.shape == (1, d) and got.dtype == x.dtype
    assert (got.float() - want).abs().max() <= 2 * TOL[kind] * want.abs().max()
    assert torch.equal(cpu_experts.one_token(x, [-1, -1], [0.5, 0.5], w13, w2), torch.zeros(1, d, dtype=x.dtype))


def test_usable_only_where_it_applies():
    w = torch.randn(2, 8, 16)
    w2 = torch.randn(2, 16, 4)
    x = torch.randn(3, 16)
    assert cpu_experts.usable(x, w, w2)
    assert not cpu_experts.usable(x.bfloat16(), w, w2)  # mixed dtypes
    assert not cpu_experts.usable(x.double(), w.double(), w2.double())
    assert not cpu_experts.usable(x, w.transpose(1, 2).contiguous().transpose(1, 2), w2)  # rows not contiguous
    assert not cpu_experts.usable(x.requires_grad_(), w, w2)
    with torch.no_grad():
        assert cpu_experts.usable(x, w, w2)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("t", [1, 3, 8, 32])
def test_moe_backends_through_the_c_experts_match_reference(kind, t):
    """The `onednn` / `int8` backends (which use cpu_experts) against the reference, all tokens on one expert too."""
    torch.manual_seed(0)
    e, f, d, k = 8, 40, 48, 2
    w13, w2, r13, r2 = _weights(kind, e, f, d)
    x = torch.randn(t, d).to(torch.bfloat16 if kind == "bf16" else torch.float32)
    backend = "int8" if kind == "int8" else "onednn"
    if backend not in kernels.available_backends():
        pytest.skip(f"{backend} backend not available")
    for ids in (torch.randint(0, e, (t, k)), torch.full((t, k), 3).index_fill_(1, torch.tensor([1]), -1)):
        wts = torch.softmax(torch.randn(t, k), -1).to(x.dtype)
        with torch.inference_mode():
            got = kernels.moe_experts(x, w13, w2, ids, wts, backend=backend)
            want = kernels.moe_experts(x, r13, r2, ids, wts, backend="reference")
        # int8 experts above MAX_ROWS rows go through torch's int8 matmul, which takes bf16 activations
        tol = 2e-2 if kind == "int8" and t > cpu_experts.MAX_ROWS else 2 * TOL[kind]
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max() + 1e-6


def test_two_threads_work_in_a_forked_child():
    import multiprocessing as mp

    torch.manual_seed(0)
    w13, w2, _, _ = _weights("fp32", 4, 16, 32)
    x = torch.randn(6, 32)
    cpu_experts.experts(x, [2, 2, 1, 1], w13, w2, threads=2)  # the parent's helper thread exists now
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(cpu_experts.experts, (x, [2, 2, 1, 1], w13, w2, 2)).get(timeout=60)
    assert torch.equal(got, cpu_experts.experts(x, [2, 2, 1, 1], w13, w2, threads=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_greedy_at_two_threads_matches_naive_loop(dtype):
    """Batched decode through the grouped C experts split over two threads: the naive loop's tokens (fp32), or a
    batch-of-one run's tokens (bf16, whose naive loop rounds differently)."""
    from moesaic.inference import Engine, SamplingParams
    from test_engine import naive_greedy, prompts_of, tiny_model

    if "onednn" not in kernels.available_backends():
        pytest.skip("onednn backend not available")
    model = tiny_model().to(dtype)
    prompts = prompts_of([5, 11, 2, 8])
    torch.set_num_threads(2)  # conftest restores it
    eng = Engine(model, max_batch=4, backend="onednn")
    outs = eng.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    if dtype == torch.float32:
        want = [naive_greedy(model, p, 8, set()) for p in prompts]
    else:
        alone = Engine(model, max_batch=1, backend="onednn")
        want = [o.token_ids for o in alone.generate(prompts, SamplingParams(max_tokens=8, temperature=0))]
    assert [o.token_ids for o in outs] == want


def test_split_halves_the_work_and_gives_both_threads_some():
    assert cpu_experts._split([4] * 8) == 4
    assert cpu_experts._split([30, 1, 1]) == 1  # one big expert: it alone on this thread, the rest on the helper
    assert cpu_experts._split([1, 1]) == 1


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("m", [2, 3, 5, 8])
@pytest.mark.parametrize("o,i", [(64, 48), (37, 50), (300, 1100)])
@pytest.mark.parametrize("threads", [1, 2])
def test_skinny_linear_matches_f_linear(dtype, tol, m, o, i, threads):
    import torch.nn.functional as F

    from moesaic.kernels.onednn import cpu_linear

    w, x = torch.randn(o, i).to(dtype), torch.randn(m, i).to(dtype)
    assert cpu_experts.linear_usable(x, w)
    want = F.linear(x.float(), w.float())
    got = cpu_experts.linear(x, w, threads=threads)
    assert got.dtype == dtype and (got.float() - want).abs().max() <= tol * want.abs().max()
    with torch.inference_mode():  # the engine's linears (OneDNNLinear) reach it through cpu_linear
        b = torch.randn(o).to(dtype)
        assert (cpu_linear(x, w, b).float() - want - b.float()).abs().max() <= 2 * tol * want.abs().max()
    assert not cpu_experts.linear_usable(x[:1], w)  # one row: cpu_gemv
    assert not cpu_experts.linear_usable(torch.randn(9, i).to(dtype), w)  # more rows: oneDNN
    assert not cpu_experts.linear_usable(x, w.t().contiguous().t())


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_combine_sorted_matches_index_add(wdtype):
    """The batch combine in C: out[token] = sum of weight * expert output over the token's routed pairs, tokens whose
    pairs were all dropped get zeros; as torch's index_add_ of y * w (to fp32 rounding)."""
    from moesaic.kernels.sorted import sort_by_expert

    torch.manual_seed(3)
    t, k, e, d = 7, 3, 5, 37
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    ids[2] = -1  # every pair of token 2 dropped
    ids[4, 1] = -1
    w = torch.rand(t, k).to(wdtype)
    order, _, n_dropped = sort_by_expert(ids, e)
    order = order[n_dropped:]
    y = torch.randn(order.numel(), d)
    want = torch.zeros(t, d).index_add_(0, order // k, y * w.float().reshape(-1)[order][:, None])
    got = cpu_experts.combine_sorted(y, order, k, w)
    assert got.dtype == torch.float32 and got.shape == (t, d)
    assert torch.equal(got[2], torch.zeros(d))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
