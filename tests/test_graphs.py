"""The engine's static-shape decode step (inference/graphs.py) against its eager decode.

On CPU the static forward runs eagerly (capture=False): padded batch buckets, key buckets, slots
not packed, padding rows writing to spare slots, experts_per_token groups, deterministic mode.
On CUDA (marked gpu) the captured graphs are replayed and compared with the eager engine.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from moesaic import ModelConfig, build_model
from moesaic.inference import Engine, SamplingParams
from moesaic.inference import graphs as gr

VOCAB = 97


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", vocab_size=VOCAB, **{"max_seq_len": 64, **overrides})
    model = build_model(cfg).eval()
    with torch.no_grad():  # sharper logits: greedy choices far from ties
        model.lm_head.weight.mul_(20.0)
    return model


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _record(eng: Engine) -> list[torch.Tensor]:
    """Every logits block the engine samples from, in order (prefill and decode)."""
    seen: list[torch.Tensor] = []
    sample = eng._sample

    def spy(reqs, logits):
        seen.append(logits.float().cpu().clone())
        return sample(reqs, logits)

    eng._sample = spy
    return seen


def _rows_by_request(eng: Engine) -> dict[str, list[torch.Tensor]]:
    """Each request's logits rows [V] in the order it sampled them (prefill, then decode steps)."""
    rows: dict[str, list[torch.Tensor]] = {}
    sample = eng._sample

    def spy(reqs, logits):
        for r, row in zip(reqs, logits.float().cpu()):
            rows.setdefault(r.request_id, []).append(row.clone())
        return sample(reqs, logits)

    eng._sample = spy
    return rows


def assert_greedy_equal_up_to_ties(got: dict, want: dict, tol: float) -> None:
    """Low-precision runs: per request, logits agree within tol * max|logit| while the greedy tokens
    agree; where they first differ, the two tokens' logits in `want` must be within that tolerance
    (a near-tie that rounding may flip); the request is not compared further (its inputs differ)."""
    assert got.keys() == want.keys()
    for rid in want:
        assert len(got[rid]) == len(want[rid]), rid  # no stop tokens: the same number of steps
        for step, (a, b) in enumerate(zip(got[rid], want[rid])):
            scale = tol * float(b.abs().max())
            torch.testing.assert_close(a, b, rtol=0, atol=scale, msg=lambda m, rid=rid, step=step: f"{rid} step {step}: {m}")
            ta, tb = int(a.argmax()), int(b.argmax())
            if ta != tb:
                assert float(b[tb] - b[ta]) <= scale, f"{rid} step {step}: tokens {ta} vs {tb} are no near-tie"
                break


def _drive(eng: Engine, prompts, params) -> list[list[int]]:
    """Two requests now, one after two steps, the rest queue for slots (joins, leaves, repacking)."""
    reqs = [eng.submit(p, sp) for p, sp in zip(prompts[:2], params[:2])]
    eng.step()
    eng.step()
    reqs += [eng.submit(p, sp) for p, sp in zip(prompts[2:], params[2:])]
    while eng.has_unfinished():
        eng.step()
    return [r.output_ids for r in reqs]


def _pair(model, **kw) -> tuple[Engine, Engine]:
    eager = Engine(copy.deepcopy(model), onednn=False, **kw)
    static = Engine(copy.deepcopy(model), onednn=False, **kw)
    assert eager.decode_graphs is None and static.decode_graphs is None  # CPU: no graphs by default
    static.decode_graphs = gr.DecodeGraphs(static.model, static.cache, capture=False)
    return eager, static


@pytest.mark.parametrize("backend,deterministic", [("reference", False), ("sorted", False), ("sorted", True)])
def test_static_decode_equals_eager_decode(backend, deterministic):
    model = tiny_model()
    eager, static = _pair(model, max_batch=5, backend=backend, deterministic=deterministic)
    prompts = prompts_of([5, 11, 2, 17, 8, 3, 6])
    params = [SamplingParams(max_tokens=n, temperature=0, experts_per_token=k)
              for n, k in zip([9, 4, 12, 6, 7, 10, 5], [None, None, 1, None, 1, None, None])]
    seen_e, seen_s = _record(eager), _record(static)
    out_e = _drive(eager, prompts, params)
    out_s = _drive(static, prompts, params)
    assert out_s == out_e
    assert len(seen_s) == len(seen_e)
    for a, b in zip(seen_s, seen_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert int(static.cache.lengths.sum()) == 0  # every slot freed, padding advanced nothing
    assert {k[3] for k in static.decode_graphs._entries} == {True, False}  # slices and gathers of slots
    if not deterministic:  # 3 and 5 running rows ran padded to buckets 4 and 5
        assert any(k[0] == 4 for k in static.decode_graphs._entries)


@pytest.mark.parametrize("kv_together", [False, True])
def test_static_decode_with_fused_qkv_equals_eager_unfused(kv_together):
    """As on the GPU: the static step on a model with fused q/k/v (one matmul, rotary over q and k
    together; with kv_together, the CUDA cache layout: one KV write per layer) against the eager engine
    with separate projections."""
    from moesaic.inference.cache import SlotCache
    from moesaic.inference.scheduler import Scheduler

    model = tiny_model()
    eager, static = _pair(model, max_batch=4, backend="sorted")
    assert static.model.fuse_qkv() == len(static.model.blocks)
    static.cache = SlotCache.for_model(model.config, 4, static.cache.max_len, kv_together=kv_together)
    static.scheduler = Scheduler(static.cache)
    static.decode_graphs = gr.DecodeGraphs(static.model, static.cache, capture=False)
    assert (static.cache.kv is not None) == kv_together
    prompts = prompts_of([5, 11, 2, 9, 4])
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (7, 4, 9, 5, 6)]
    seen_e, seen_s = _record(eager), _record(static)
    assert _drive(static, prompts, params) == _drive(eager, prompts, params)
    assert len(seen_s) == len(seen_e)
    for a, b in zip(seen_s, seen_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_static_decode_crosses_key_buckets():
    """Prompts near 128 positions: the key bucket grows from 128 to 256 mid-generation."""
    model = tiny_model(max_seq_len=300)
    eager, static = _pair(model, max_batch=2, backend="sorted")
    prompts = prompts_of([120, 30], seed=4)
    params = [SamplingParams(max_tokens=14, temperature=0)] * 2
    seen_e, seen_s = _record(eager), _record(static)
    assert _drive(static, prompts, params) == _drive(eager, prompts, params)
    for a, b in zip(seen_s, seen_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert {k[1] for k in static.decode_graphs._entries} == {128, 256}


def test_static_decode_with_triton_kernels_under_the_interpreter():
    """The Triton decode kernels on padded rows (dropped pairs) inside the static forward, bf16."""
    if torch.cuda.is_available():
        pytest.skip("the CUDA run is test_graph_replay_equals_eager_on_cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 before Triton loads (the triton tests set it)")
    pytest.importorskip("triton")
    from moesaic import kernels
    from moesaic.kernels.triton import moe_experts_triton
    from moesaic.kernels.triton.launch import GemmConfig, MoEConfig

    cfg = MoEConfig("decode", 1, GemmConfig(16, 32), GemmConfig(16, 64))
    kernels.register(kernels.Backend("triton-interp", lambda *a: moe_experts_triton(*a, config=cfg)))
    try:
        model = tiny_model().to(torch.bfloat16)
        eager, static = _pair(model, max_batch=4, backend="triton-interp")
        prompts = prompts_of([5, 3, 7])
        params = [SamplingParams(max_tokens=n, temperature=0) for n in (6, 7, 4)]
        rows_e, rows_s = _rows_by_request(eager), _rows_by_request(static)
        _drive(eager, prompts, params)
        _drive(static, prompts, params)
        assert_greedy_equal_up_to_ties(rows_s, rows_e, 2e-2)  # bf16: rounding may flip exact ties
        assert any(k[0] == 4 for k in static.decode_graphs._entries)  # 3 rows padded to 4
    finally:
        kernels._BACKENDS.pop("triton-interp", None)
        kernels._AVAILABLE = None


@pytest.mark.slow  # torch.compile on this CPU takes a minute or more
def test_compiled_static_decode_with_triton_kernels_under_the_interpreter():
    """MOESAIC_DECODE_COMPILE: the static forward through torch.compile, the Triton forward as one opaque
    custom op (no explicit config, so the op path is taken), equals the eager decode up to bf16 ties."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU with TRITON_INTERPRET=1 (the CUDA path runs in benchmarks/decode_gpu.py)")
    pytest.importorskip("triton")
    from moesaic import kernels
    from moesaic.kernels.triton import moe_experts_triton

    kernels.register(kernels.Backend("triton-interp", moe_experts_triton))
    try:
        model = tiny_model().to(torch.bfloat16)
        eager, static = _pair(model, max_batch=4, backend="triton-interp")
        static.decode_graphs = gr.DecodeGraphs(static.model, static.cache, capture=False, compile=True)
        prompts = prompts_of([5, 3, 7])
        params = [SamplingParams(max_tokens=n, temperature=0) for n in (6, 7, 4)]
        rows_e, rows_s = _rows_by_request(eager), _rows_by_request(static)
        _drive(eager, prompts, params)
        _drive(static, prompts, params)
        assert static.decode_graphs.compile, "compiling the step failed"
        assert_greedy_equal_up_to_ties(rows_s, rows_e, 2e-2)
    finally:
        kernels._BACKENDS.pop("triton-interp", None)
        kernels._AVAILABLE = None


def _alone_and_crowded(model, make_graphs, **kw):
    """A seeded sampling request alone, then with batch-mates (it lands in another slot), deterministic."""
    target = prompts_of([7])[0]
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=11, logprobs=0)
    out = []
    for mates in ([], prompts_of([4, 12, 9], seed=5)):
        eng = Engine(copy.deepcopy(model), max_batch=4, deterministic=True, **kw)
        if make_graphs:
            eng.decode_graphs = gr.DecodeGraphs(eng.model, eng.cache, capture=False)
        assert eng.decode_graphs is not None
        for m in mates[:1]:
            eng.submit(m, SamplingParams(max_tokens=5, temperature=0))
        eng.step()
        r = eng.submit(target, params)
        for m in mates[1:]:
            eng.submit(m, SamplingParams(max_tokens=3, temperature=0.7, seed=3))
        while eng.has_unfinished():
            eng.step()
        assert eng.decode_graphs.stats["replays"] > 0 or not eng.decode_graphs.capture
        out.append((r.completion(), set(eng.decode_graphs._entries)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_static_decode_is_batch_invariant(dtype):
    """Alone the request decodes from slot 0 (keys a slice), crowded from another slot (a gather):
    its logprobs stay bitwise equal."""
    model = tiny_model().to(dtype)
    (alone, ka), (crowded, kc) = _alone_and_crowded(model, True, backend="sorted", onednn=False)
    assert crowded.token_ids == alone.token_ids
    assert crowded.logprobs == alone.logprobs  # bitwise
    assert ka == {(1, 64, None, True)} and (1, 64, None, False) in kc


def test_buckets_and_fallback_reason(capsys):
    assert gr.batch_buckets(1) == [1] and gr.batch_buckets(8) == [1, 2, 4, 8]
    assert gr.batch_buckets(12) == [1, 2, 4, 8, 12]
    assert gr.keys_bucket(1, 4096) == 128 and gr.keys_bucket(129, 4096) == 256 and gr.keys_bucket(300, 200) == 200
    model = tiny_model()
    eng = Engine(model, max_batch=2, onednn=False)
    assert gr.unsupported_reason(eng.model, eng.cache) == "the model is not on a CUDA device"
    assert gr.make_decode_graphs(eng.model, eng.cache, True) is None
    assert "CUDA graphs off" in capsys.readouterr().err
    assert gr.make_decode_graphs(eng.model, eng.cache, None) is None
    assert capsys.readouterr().err == ""  # CPU with graphs not asked for: silent
    with pytest.raises(ValueError, match="rows"):
        gr.DecodeGraphs(eng.model, eng.cache, capture=False).decode([1, 2, 3], [0, 1, 2], [4, 4, 4], None)


# ------------------------------------------------------------------------------------------ GPU
def _cuda_model(dtype=torch.bfloat16):
    model = tiny_model(max_seq_len=256, d_model=128, expert_ffn=256)
    return model.to("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_graph_replay_equals_eager_on_cuda(dtype, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("MOESAIC_TRITON_AUTOTUNE", "0")
    model = _cuda_model(dtype)
    graph = Engine(copy.deepcopy(model), max_batch=5, backend="triton")
    assert graph.decode_graphs is not None, "triton on CUDA must be capturable"
    eager = Engine(copy.deepcopy(model), max_batch=5, backend="triton", cuda_graphs=False)
    static = Engine(copy.deepcopy(model), max_batch=5, backend="triton", cuda_graphs=False)
    static.decode_graphs = gr.DecodeGraphs(static.model, static.cache, capture=False)
    prompts = prompts_of([5, 11, 2, 17, 8, 3, 6])
    params = [SamplingParams(max_tokens=n, temperature=0, experts_per_token=k)
              for n, k in zip([9, 4, 12, 6, 7, 10, 5], [None, None, 1, None, 1, None, None])]
    rows = [_rows_by_request(e) for e in (graph, static, eager)]
    for e in (graph, static, eager):
        _drive(e, prompts, params)
    assert graph.decode_graphs.stats["replays"] > 0 and graph.decode_graphs.failed is None
    # replay == the same static forward run eagerly (same kernels), and == the engine's eager decode
    # (other key lengths, unpadded batches: bf16/fp16 rounding differs, so exact ties may flip)
    assert_greedy_equal_up_to_ties(rows[0], rows[1], 1e-2)
    assert_greedy_equal_up_to_ties(rows[0], rows[2], 2e-2)
    assert int(graph.cache.lengths.sum()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_falls_back_eagerly_for_sorted_on_cuda(capsys):
    model = _cuda_model()
    eng = Engine(model, max_batch=2, backend="sorted")
    assert eng.decode_graphs is None
    assert "data-dependent" in capsys.readouterr().err
    out = eng.generate([prompts_of([4])[0]], SamplingParams(max_tokens=3, temperature=0))
    assert len(out[0].token_ids) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deterministic_graphs_are_batch_invariant_on_cuda(monkeypatch):
    """deterministic=True with captured graphs: bitwise the same logprobs alone or in a crowd."""
    pytest.importorskip("triton")
    monkeypatch.setenv("MOESAIC_TRITON_AUTOTUNE", "0")
    (alone, _), (crowded, kc) = _alone_and_crowded(_cuda_model(), False, backend="triton")
    assert crowded.token_ids == alone.token_ids
    assert crowded.logprobs == alone.logprobs  # bitwise
    assert (1, 128, None, False) in kc  # the crowded run's target decoded from a gather
