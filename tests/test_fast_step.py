"""The batch-1 fast step (inference/fast_step.py: the step as one recorded C program) against the module-by-module
step it replaces (bitwise: the same kernels with the same arguments), the naive full-recompute loop, and where it
must not apply."""

from __future__ import annotations

import ctypes

import pytest
import torch

from moesaic import ModelConfig, build_model
from moesaic.inference import Engine, SamplingParams, fast_step
from moesaic.kernels import cpu_program

pytestmark = pytest.mark.skipif(not cpu_program.available(), reason="the C kernels cannot be built here")

# the smallest shape whose linears all take the C GEMV (>= 64 Ki weights: wk / wv are 2 x 64 rows of 512)
SHAPE = dict(vocab_size=512, d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=96, num_experts=16,
             top_k=4, expert_ffn=128, ffn=256)


# decode.py's precisions: (quantize scheme, quantize_linears, dtype of the rest)
PRECS = {"fp32": (None, False, torch.float32), "bf16": (None, False, torch.bfloat16),
         "w8a8": ("w8a8", True, torch.float32), "int8": ("int8", False, torch.bfloat16),
         "int8-all": ("int8", True, torch.float32)}


def model_of(seed=0, prec="fp32", **over):
    torch.manual_seed(seed)
    m = build_model(ModelConfig(**dict(SHAPE, **over))).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)  # sharper logits: greedy choices far from ties
    return m.to(PRECS[prec][2])


def engine_of(model, prec="fp32", **kw):
    scheme, linears, _ = PRECS[prec]
    if scheme is not None:
        kw.update(quantize=scheme, quantize_linears=linears)
    return Engine(model, **kw)


def run(eng, prompts, max_tokens, on, k=None):
    """Greedy tokens of each prompt and the logits of every sampled step, with the fast step on or off."""
    fs, logits = eng.fast_step, []
    eng.fast_step = fs if on else None
    real = eng._sample

    def grab(reqs, lg):
        logits.append(lg.float().clone())
        return real(reqs, lg)

    eng._sample = grab
    try:
        outs = eng.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                                    experts_per_token=k))
    finally:
        eng._sample, eng.fast_step = real, fs
    return [o.token_ids for o in outs], logits


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def count_calls(fs):
    calls = [0]
    real = fs.decode

    def spy(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    fs.decode = spy
    return calls


@pytest.mark.parametrize("prec", list(PRECS))
@pytest.mark.parametrize("variant", [{}, dict(qk_norm="head"), dict(normalize_topk=False),
                                     dict(router="sigmoid_topk", routed_scaling_factor=2.5),
                                     # in Python between the program's parts: a dense first layer, shared experts
                                     # (gated), a group-limited router; and the q/k/v biases (C adds)
                                     dict(first_dense_layers=1, num_shared_experts=1, shared_ffn=128,
                                          shared_expert_gate=True, qkv_bias=True),
                                     dict(router="sigmoid_topk", n_group=4, topk_group=2)])
def test_bitwise_equal_to_module_path(prec, variant):
    eng = engine_of(model_of(prec=prec, **variant), prec, max_batch=1)
    assert eng.fast_step is not None, fast_step.why_not(eng.model, eng.cache)
    calls = count_calls(eng.fast_step)
    prompt = prompts_of([7])
    fast_toks, fast_logits = run(eng, prompt, 12, on=True)
    assert calls[0] == 11  # every decode step (the first token comes from the prefill)
    plain_toks, plain_logits = run(eng, prompt, 12, on=False)
    assert fast_toks == plain_toks
    assert len(fast_logits) == len(plain_logits) == 12
    for a, b in zip(fast_logits, plain_logits):
        assert torch.equal(a, b)


def test_router_near_ties_go_to_torch():
    """Duplicated dominant gate rows: every layer-0 router call is an exact tie, which the C router leaves to torch;
    the program stops there, the torch router chooses, and the step resumes: still bitwise the module path."""
    model = model_of()
    with torch.no_grad():
        w = model.blocks[0].ffn.router.weight
        w[1] = w[0]
        w[:2] *= 30.0
    eng = engine_of(model, max_batch=1)
    fs = eng.fast_step
    fast_toks, fast_logits = run(eng, prompts_of([5]), 8, on=True)
    assert fs.router_fallbacks >= 7  # at least layer 0 at each of the 7 decode steps
    plain_toks, plain_logits = run(eng, prompts_of([5]), 8, on=False)
    assert fast_toks == plain_toks and all(torch.equal(a, b) for a, b in zip(fast_logits, plain_logits))


@torch.no_grad()
def naive_greedy(model, prompt, n, k=None):
    ids, out = list(prompt), []
    for _ in range(n):
        t = int(model.forward_aux(torch.tensor([ids]), top_k=k).logits[0, -1].argmax())
        out.append(t)
        ids.append(t)
    return out


@pytest.mark.parametrize("k", [None, 2])
def test_greedy_equals_naive_loop(k):
    """fp32: the issue's oracle, with the trained top-k and fewer experts per token."""
    ref = model_of()
    eng = engine_of(model_of(), max_batch=1)
    calls = count_calls(eng.fast_step)
    prompts = prompts_of([3, 9])
    toks, _ = run(eng, prompts, 10, on=True, k=k)
    assert calls[0] == 18
    assert toks == [naive_greedy(ref, p, 10, k) for p in prompts]


def test_batches_use_the_module_path_and_lone_rows_any_slot():
    """Two requests running together decode in one forward (no fast step); deterministic mode runs each row
    alone through the fast step in its own slot (0 and 1): the same tokens as without the fast step."""
    prompts = prompts_of([4, 11])
    eng = engine_of(model_of(), max_batch=2)
    calls = count_calls(eng.fast_step)
    eng.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert calls[0] == 0
    det = engine_of(model_of(), max_batch=2, deterministic=True)
    calls = count_calls(det.fast_step)
    slots = []
    real = det.fast_step.decode
    det.fast_step.decode = lambda tok, slot, k=None: (slots.append(slot), real(tok, slot, k))[1]
    toks, _ = run(det, prompts, 6, on=True)
    assert sorted(set(slots)) == [0, 1]
    assert toks == run(det, prompts, 6, on=False)[0]


def test_rope_table_growth_and_cache_end():
    """Positions past the first rotary table (256) rebuild the programs; a request that fills its slot finishes
    with "length" as on the module path."""
    eng = engine_of(model_of(max_seq_len=320), max_batch=1, max_len=300)
    prompt = prompts_of([250])
    fast, fl = run(eng, prompt, 60, on=True)
    plain, pl = run(eng, prompt, 60, on=False)
    assert fast == plain and len(fast[0]) == 50  # 250 + 50 = the slot's 300 positions
    assert all(torch.equal(a, b) for a, b in zip(fl, pl))
    assert eng.fast_step._rope.filled == 300


def test_rope_table_rows_equal_one_position_tables():
    rope = model_of().blocks[0].attn.rope
    for dt in (torch.float32, torch.bfloat16):
        t = fast_step._RopeTable(rope, dt)
        t.grow(300, 1000)
        t.grow(301, 1000)
        assert t.filled == 600  # doubled
        for p in (0, 1, 17, 255, 256, 511, 599):
            one = rope(torch.tensor([[p]]), dt)
            assert torch.equal(t.cos[p], one[0][0, 0]) and torch.equal(t.sin_rot[p], one.sin_rot[0, 0])


@pytest.mark.parametrize("over,why", [
    (dict(d_model=128, n_heads=2, n_kv_heads=1), "linear"),  # small weights: F.linear, not the C GEMV
    (dict(clip_qkv=8.0), "attention"),
    (dict(router="switch", top_k=1, capacity_factor=1.25), "capacity"),
])
def test_not_applicable(over, why):
    eng = engine_of(model_of(**over), max_batch=1)
    assert eng.fast_step is None
    assert why in fast_step.why_not(eng.model, eng.cache)


def test_other_backends_and_switch_off(monkeypatch):
    eng = engine_of(model_of(), max_batch=1, backend="sorted")
    assert eng.fast_step is None and "onednn" in fast_step.why_not(eng.model, eng.cache)
    eng = engine_of(model_of(prec="bf16"), max_batch=1, quantize="int8", quantize_linears=True)
    assert eng.fast_step is None and "bf16 activations" in fast_step.why_not(eng.model, eng.cache)
    monkeypatch.setattr(fast_step, "ENABLED", False)
    assert engine_of(model_of(), max_batch=1).fast_step is None


def test_program_stops_at_a_nonzero_result_and_resumes():
    p = cpu_program.Program()
    x = torch.zeros(1, 4)
    one = torch.ones(1, 4)
    p.op("add_f32", [x.data_ptr(), one.data_ptr(), 4])
    # the int op: the router on a zero row (every logit ties) gives up with 1
    gate = torch.randn(8, 4)
    logits, ids, w = torch.empty(1, 8), torch.empty(1, 2, dtype=torch.int64), torch.empty(1, 2)
    at = p.route(torch.zeros(1, 4), gate, 2, 0, None, True, 1.0, logits, ids, w)
    p.op("add_f32", [x.data_ptr(), one.data_ptr(), 4])
    p.keep += [x, one]
    assert p.run() == (at, 1)
    assert torch.equal(x, one)
    assert p.run(p.next_op(at)) == (-1, 1)
    assert torch.equal(x, 2 * one)
    with pytest.raises(ValueError, match="at most"):
        p.add_call(0, [0] * (cpu_program.MAX_ARGS + 1))
    assert ctypes.sizeof(ctypes.c_int64) == 8


def test_forward_hooks_run_on_the_module_path():
    """A module with forward hooks (routing traces, decode.py's expert counter) makes the step take the model's
    forward, which runs them; removing the hook brings the fast step back."""
    eng = engine_of(model_of(), max_batch=1)
    seen = []
    h = eng.model.blocks[1].ffn.register_forward_hook(lambda m, a, o: seen.append(o[1].expert_ids_TK.shape))
    toks, _ = run(eng, prompts_of([5]), 6, on=True)
    assert len(seen) == 6  # the prefill and the 5 decode steps
    h.remove()
    calls = count_calls(eng.fast_step)
    assert run(eng, prompts_of([5]), 6, on=True)[0] == toks and calls[0] == 5


@pytest.mark.parametrize("prec", list(PRECS))
def test_two_threads_split_over_the_c_worker(prec):
    """At two torch threads the program hands half of every linear and of the experts to the C worker (what the
    tests' single thread never does), and the split tuner also runs the one-thread program (warm-up): both bitwise
    the module path (whose splits are bitwise one thread's)."""
    from moesaic.kernels import cpu_pool

    torch.set_num_threads(2)  # conftest restores it
    if not cpu_pool.split_one_row():
        pytest.skip("no C worker split here")
    eng = engine_of(model_of(prec=prec, qk_norm="head"), prec, max_batch=1)
    fast_toks, fast_logits = run(eng, prompts_of([6]), 8, on=True)
    assert sorted(eng.fast_step._plans) == [(None, False), (None, True)]
    plain_toks, plain_logits = run(eng, prompts_of([6]), 8, on=False)
    assert fast_toks == plain_toks and all(torch.equal(a, b) for a, b in zip(fast_logits, plain_logits))


def test_split_tuner_compares_neighbouring_steps_and_switches():
    from moesaic.inference.split_tuner import SplitTuner

    def drive(t, cost, n):
        picks = []
        for step in range(n):
            split = t.choose()
            picks.append(split)
            t.record(split, cost(split, step))
        return picks

    t = SplitTuner()
    # quiet: two threads 1.2x faster, while the bandwidth drifts 2x over the run: it stays with two threads
    picks = drive(t, lambda s, i: (1.0 if s else 1.2) * (1 + i / 100), 200)
    assert t.prefer is True and picks[:8] == [True, False] * 4
    assert picks[8:].count(False) <= 200 // t.EXPLORE  # then one exploring step in EXPLORE
    # another process takes a core: two threads now 1.3x slower; a few explorations later it runs on one
    picks = drive(t, lambda s, i: 1.3 if s else 1.0, 200)
    assert t.prefer is False and picks[-20:].count(False) >= 19
    # the core comes back: it returns to two threads
    drive(t, lambda s, i: 1.0 if s else 1.2, 300)
    assert t.prefer is True
