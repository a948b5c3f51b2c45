"""kernels.cpu_pool: the two-thread split of the CPU kernels (a C worker thread), against one-thread calls."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from moesaic.kernels import cpu_experts, cpu_gemv, cpu_pool, cpu_q8, quant

pytestmark = pytest.mark.skipif(not (cpu_pool.available() and cpu_gemv.available()),
                                reason="C kernels not buildable here")


def _halves(x, w, y, o, i, cut):
    def part(a, b):
        return (x.data_ptr(), w.data_ptr() + a * i * 4, y.data_ptr() + a * 4, b - a, i, i)
    return part(0, cut), part(cut, o)


@pytest.mark.parametrize("o,cut", [(300, 150), (97, 1), (64, 63), (16, 0)])
def test_run2_splits_a_gemv_exactly(o, cut):
    torch.manual_seed(o)
    i = 129
    w, x = torch.randn(o, i), torch.randn(1, i)
    one, two = torch.empty(1, o), torch.full((1, o), float("nan"))
    fn = cpu_gemv._library().moesaic_gemv_f32
    fn(x.data_ptr(), w.data_ptr(), one.data_ptr(), o, i, i)
    for _ in range(3):  # repeated hand-overs reuse the worker
        assert cpu_pool.run2(fn, *_halves(x, w, two, o, i, cut))
        assert torch.equal(one, two)  # the same rows, the same arithmetic: bitwise equal
    torch.testing.assert_close(one, x @ w.T, rtol=1e-5, atol=1e-4)


def test_run2_rejects_mismatched_halves():
    fn = cpu_gemv._library().moesaic_gemv_f32
    with pytest.raises(ValueError, match="same number of arguments"):
        cpu_pool.run2(fn, (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="<= 32"):
        cpu_pool.run2(fn, (0,) * 33, (0,) * 33)


def test_python_thread_fallback_gives_the_same_answer(monkeypatch):
    torch.manual_seed(0)
    o, i = 200, 64
    w, x = torch.randn(o, i), torch.randn(1, i)
    a, b = torch.empty(1, o), torch.empty(1, o)
    fn = cpu_gemv._library().moesaic_gemv_f32
    cpu_pool.run2(fn, *_halves(x, w, a, o, i, 100))
    monkeypatch.setattr(cpu_pool, "ENABLED", False)
    assert not cpu_pool.split_one_row()
    cpu_pool.run2(fn, *_halves(x, w, b, o, i, 100))
    assert torch.equal(a, b)


def test_concurrent_callers_are_served_correctly():
    """Two Python threads handing jobs over at once: one of them runs both halves itself, both are right."""
    torch.manual_seed(1)
    o, i = 512, 256
    w = torch.randn(o, i)
    fn = cpu_gemv._library().moesaic_gemv_f32
    errors = []

    def caller(seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, i, generator=g)
        ref = torch.empty(1, o)
        fn(x.data_ptr(), w.data_ptr(), ref.data_ptr(), o, i, i)
        for _ in range(200):
            y = torch.empty(1, o)
            cpu_pool.run2(fn, *_halves(x, w, y, o, i, 256))
            if not torch.equal(y, ref):
                errors.append(seed)
                return

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)


def _child(q):
    o, i = 256, 64
    w, x = torch.ones(o, i), torch.ones(1, i)
    y = torch.empty(1, o)
    cpu_pool.run2(cpu_gemv._library().moesaic_gemv_f32, *_halves(x, w, y, o, i, 128))
    q.put(float(y.sum()))


def test_a_forked_child_gets_its_own_worker():
    x, w, y = torch.ones(1, 8), torch.ones(32, 8), torch.empty(1, 32)  # alive until the call returns
    cpu_pool.run2(cpu_gemv._library().moesaic_gemv_f32, *_halves(x, w, y, 32, 8, 16))  # the parent's worker runs
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(60)
    assert p.exitcode == 0 and q.get(timeout=5) == 256 * 64.0


@pytest.mark.parametrize("kind", ["fp32", "bf16", "w8a8", "int8"])
def test_one_token_experts_and_linears_split_over_two_threads_equal_one_thread(kind, monkeypatch):
    """Batch-1 decode kernels with their rows (linears) or experts (one token) split over the worker: bitwise
    the one-thread result."""
    torch.manual_seed(2)
    e, d, f, k, o = 8, 128, 96, 4, 512
    dt = torch.bfloat16 if kind == "bf16" else torch.float32
    w13, w2 = torch.randn(e, 2 * f, d).to(dt) * 0.1, torch.randn(e, d, f).to(dt) * 0.1
    wl = torch.randn(o, d).to(dt)
    x = torch.randn(1, d).to(dt)
    ids, wts = [3, 0, 7, 5], [0.4, 0.3, 0.2, 0.1]
    block = cpu_q8.ACT_BLOCK if kind == "w8a8" else None
    q, scale = quant.quantize_int8(wl)
    if kind in ("w8a8", "int8"):
        w13, w2 = (quant.Int8Weight(*quant.quantize_int8(w), act_block=block) for w in (w13, w2))

    def lin():
        return quant.int8_linear(x, q, scale, block) if kind in ("w8a8", "int8") else cpu_gemv.gemv(x, wl)

    monkeypatch.setattr(cpu_pool, "SPLIT_MIN_BYTES", 0)  # this small linear splits too
    torch.set_num_threads(2)
    outs = {}
    for split in (False, True):
        monkeypatch.setattr(cpu_pool, "SPLIT_ONE_ROW", split)
        assert cpu_pool.split_one_row() == split
        outs[split] = (cpu_experts.one_token(x, ids, wts, w13, w2, threads=2 if split else 1), lin())
    assert torch.equal(outs[False][0], outs[True][0]) and torch.equal(outs[False][1], outs[True][1])
    assert k == len(ids)


@pytest.mark.parametrize("steal", [True, False])
def test_caller_takes_back_a_half_the_worker_has_not_started(steal):
    """An empty half for this thread, and a sleeping worker (idle past its spin): the caller is done first and, with
    stealing on, runs the worker's half itself (2); off, it waits for the worker (1). Bitwise the same either way."""
    import time

    torch.manual_seed(2)
    o, i = 256, 128
    w, x = torch.randn(o, i), torch.randn(1, i)
    fn = cpu_gemv._library().moesaic_gemv_f32
    ref = torch.empty(1, o)
    fn(x.data_ptr(), w.data_ptr(), ref.data_ptr(), o, i, i)
    cpu_pool.set_steal(steal)
    try:
        got = []
        for _ in range(20):
            time.sleep(0.002)  # > the worker's 200 us spin: it sleeps, and a wake-up takes tens of microseconds
            y = torch.full((1, o), float("nan"))
            got.append(cpu_pool.run2(fn, *_halves(x, w, y, o, i, 0)))
            assert torch.equal(y, ref)
    finally:
        cpu_pool.set_steal(True)
    assert (2 in got) == steal and set(got) <= ({1, 2} if steal else {1})
