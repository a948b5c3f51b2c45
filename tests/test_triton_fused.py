"""The Triton "fused" small-T path (one kernel, fp32 atomics, self-cleaning workspace) vs the reference.

Without CUDA the kernel runs under the Triton interpreter (programs one after another, so the
atomics' order is fixed there; the GPU tests check the real concurrency). fp32 inputs call the
path directly (the backend itself takes 16-bit only): 1e-5 relative; fp16 / bf16 through
`moe_experts_triton` with the tolerances of test_triton.py.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from moesaic import kernels  # noqa: E402
from moesaic.kernels.reference import moe_experts_reference  # noqa: E402
from moesaic.kernels.triton import autotune, launch, moe_experts_triton, ops  # noqa: E402
from moesaic.kernels.triton import fused_decode as fd  # noqa: E402
from moesaic.kernels.triton.launch import GemmConfig, MoEConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SMALL = launch.fused(16, 32, 32, 4, 2)     # D, F not multiples of BK / BD / BF below: every mask
WIDE = launch.fused(32, 64, 64, 4, 2)      # BF > F for the F=24 shapes: one slice, rows past F zeroed


def problem(t, d, f, e, k, dtype, seed, *, drop=0.0, one_expert=False, out_of_range=False):
    x, w13, w2, ids, w = autotune.random_problem(t, d, f, e, k, dtype, DEV, seed=seed)
    if one_expert:  # every pair of every token on one expert (a token repeats it)
        ids[:] = e - 1
    if drop:
        g = torch.Generator(device=DEV).manual_seed(seed + 1)
        ids = torch.where(torch.rand(ids.shape, generator=g, device=DEV) < drop, -1, ids)
    if out_of_range:
        ids[::2, -1] = e + torch.arange(ids[::2, -1].numel(), device=DEV) % 3
    return x, w13, w2, ids, w


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def ref64(x, w13, w2, ids, w):
    return moe_experts_reference(x.double(), w13.double(), w2.double(), ids, w.double())


CASES = [  # t, d, f, e, k, cfg, problem kwargs
    (1, 80, 48, 16, 8, SMALL, {}),
    (1, 64, 24, 256, 8, WIDE, {}),
    (3, 80, 40, 8, 2, SMALL, {"drop": 0.3}),
    (3, 72, 48, 256, 8, SMALL, {"out_of_range": True}),
    (8, 64, 24, 256, 8, WIDE, {"drop": 0.2}),
    (8, 48, 32, 4, 4, SMALL, {"one_expert": True}),
]


@pytest.mark.parametrize("t,d,f,e,k,cfg,kw", CASES)
def test_fused_fp32_matches_reference(t, d, f, e, k, cfg, kw):
    x, w13, w2, ids, w = problem(t, d, f, e, k, torch.float32, seed=t * 13 + e, **kw)
    want = ref64(x, w13, w2, ids, w)
    y = fd.forward_fused(x, w13, w2, ids, w, cfg)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert rel(y, want) < TOL[torch.float32]
    if kw.get("drop") or kw.get("out_of_range"):  # a token whose pairs are all dropped gets exact zeros
        dead = ((ids < 0) | (ids >= e)).all(dim=1)
        assert (y[dead] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,d,f,e,k,cfg,kw", [CASES[0], CASES[2], CASES[4]])
def test_fused_16bit_through_the_backend(t, d, f, e, k, cfg, kw, dtype):
    x, w13, w2, ids, w = problem(t, d, f, e, k, dtype, seed=t + 5, **kw)
    y = moe_experts_triton(x, w13, w2, ids, w, config=cfg)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y, ref64(x, w13, w2, ids, w)) < TOL[dtype]


def test_workspace_cleans_itself_between_calls():
    """The 2nd and 3rd call give the 1st call's answer (a stale workspace would add to it), the workspace and
    the counters are zero afterwards, and other T in the same bucket / another D reuse or get their own."""
    x, w13, w2, ids, w = problem(3, 80, 48, 16, 4, torch.float32, seed=3, drop=0.2)
    first = fd.forward_fused(x, w13, w2, ids, w, SMALL)
    for _ in range(2):
        again = fd.forward_fused(x, w13, w2, ids, w, SMALL)
        # the interpreter runs programs in order: bitwise; on a GPU the atomics' order varies (~1 ulp)
        assert torch.equal(again, first) if DEV.type == "cpu" else rel(again, first) < 1e-6
    ws, cnt = fd.workspace(x.device, 3, 80)
    assert ws.shape == (4, 80) and cnt.shape == (4,)
    assert not ws.any() and not cnt.any()
    assert fd.workspace(x.device, 4, 80)[0] is ws and fd.workspace(x.device, 3, 64)[0] is not ws
    y4 = fd.forward_fused(x[:2], w13, w2, ids[:2], w[:2], SMALL)  # bucket 2: rows 2.. of ws untouched
    assert rel(y4, ref64(x[:2], w13, w2, ids[:2], w[:2])) < 1e-5
    assert fd.forward_fused(x[:0], w13, w2, ids[:0], w[:0], SMALL).shape == (0, 80)


def test_fused_config_validation_and_candidates():
    with pytest.raises(ValueError, match="gemm2.bk"):
        MoEConfig("fused", 1, GemmConfig(32, 256), GemmConfig(128, 16))
    cfg = launch.fused(32, 256, 128, 8, 2)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg and cfg.path in launch.PATHS
    cands = launch.fused_candidates()
    assert len(set(cands)) == len(cands) >= 6
    for c in cands:  # two fp32 accumulators of BF x BK: at most 64 registers a thread
        assert c.path == "fused" and c.gemm2.bk == c.gemm1.bn
        assert 2 * c.gemm1.bn * c.gemm1.bk <= 64 * 32 * c.gemm1.num_warps


def test_deterministic_request_never_takes_the_fused_path(monkeypatch):
    """Under kernels.deterministic() or torch.use_deterministic_algorithms the fused config runs the heuristic's
    (decode) path: same answer, and forward_fused is never called."""
    x, w13, w2, ids, w = problem(1, 64, 32, 8, 2, torch.float16, seed=2)
    want = ref64(x, w13, w2, ids, w)
    calls = []
    real = fd.forward_fused
    monkeypatch.setattr(fd, "forward_fused", lambda *a: calls.append(1) or real(*a))
    assert not kernels.deterministic_requested()
    with kernels.deterministic():
        assert kernels.deterministic_requested()
        with kernels.deterministic(False):  # cannot lift an outer request
            assert kernels.deterministic_requested()
        y = ops.forward(x, w13, w2, ids, w, SMALL)
    assert calls == [] and rel(y, want) < TOL[torch.float16]
    assert not kernels.deterministic_requested()
    ops.forward(x, w13, w2, ids, w, SMALL)
    assert calls == [1]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert kernels.deterministic_requested()
        assert rel(ops.forward(x, w13, w2, ids, w, SMALL), want) < TOL[torch.float16] and calls == [1]
    finally:
        torch.use_deterministic_algorithms(was)


def test_deterministic_engine_steps_request_determinism(monkeypatch):
    from moesaic import ModelConfig, build_model
    from moesaic.inference import Engine, SamplingParams

    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny", vocab_size=97, max_seq_len=32)).eval()
    seen = []
    for flag in (True, False):
        eng = Engine(model, max_batch=2, deterministic=flag, backend="reference")
        real = model.forward_aux
        monkeypatch.setattr(model, "forward_aux", lambda *a, real=real, **kw:
                            seen.append(kernels.deterministic_requested()) or real(*a, **kw))
        eng.submit([1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
        while eng.has_unfinished():
            eng.step()
        monkeypatch.undo()
        assert seen and set(seen) == {flag}
        seen.clear()
    assert not kernels.deterministic_requested()


def test_tune_times_fused_candidates_only_for_few_pairs_when_asked(monkeypatch):
    """With MOESAIC_TRITON_FUSED=1 autotune.tune offers the fused candidates next to the decode ones up to
    DECODE_MAX_PAIRS pairs, and the fastest config wins (times faked: tuning itself needs CUDA); by default it
    does not (the path lost on every H200 benchmark shape)."""
    timed = []

    def fake_time(cfg, args, ref=None, tol=2e-2, log=None):
        timed.append(cfg)
        return 1.0 if cfg == launch.fused_candidates()[2] else 5.0

    monkeypatch.setattr(autotune, "_time_us", fake_time)
    monkeypatch.setattr(autotune, "variants", lambda: (False, False))
    monkeypatch.delenv("MOESAIC_TRITON_FUSED", raising=False)
    autotune.tune(2, 64, 32, 8, 2, torch.float16, torch.device("cpu"))
    assert {c.path for c in timed} == {"grouped", "decode"}
    timed.clear()
    monkeypatch.setenv("MOESAIC_TRITON_FUSED", "1")
    best, us = autotune.tune(2, 64, 32, 8, 2, torch.float16, torch.device("cpu"))
    assert best == launch.fused_candidates()[2] and us == 1.0
    assert {c.path for c in timed} == {"grouped", "decode", "fused"}
    timed.clear()
    autotune.tune(65, 64, 32, 8, 1, torch.float16, torch.device("cpu"))
    assert {c.path for c in timed} == {"grouped"}


# ---- full sizes on the GPU -------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("t,d,f,e,k", [(1, 2048, 768, 128, 8), (1, 2048, 1024, 64, 8), (8, 2048, 768, 128, 8),
                                       (3, 4096, 14336, 8, 2), (1, 7168, 2048, 256, 8), (64, 1000, 300, 16, 1)])
def test_gpu_every_fused_candidate(t, d, f, e, k):
    x, w13, w2, ids, w = problem(t, d, f, e, k, torch.bfloat16, seed=t)
    want = moe_experts_reference(x.float(), w13.float(), w2.float(), ids, w.float())
    for cfg in launch.fused_candidates():
        ys = [moe_experts_triton(x, w13, w2, ids, w, config=cfg) for _ in range(3)]
        for y in ys:  # the atomics' order varies: each call close to the reference, not bitwise equal
            assert rel(y, want) < 1e-2, cfg


@pytest.mark.gpu
@gpu
def test_gpu_fused_graph_capture_and_replay():
    """A graph captured after an eager warm-up reuses the cached workspace; replays after new inputs are
    right, and eager calls in between still see a clean workspace."""
    x, w13, w2, ids, w = problem(8, 2048, 768, 128, 8, torch.bfloat16, seed=4, drop=0.1)
    cfg = launch.fused_candidates()[0]
    xs, ids_s, ws = x.clone(), ids.clone(), w.clone()
    moe_experts_triton(xs, w13, w2, ids_s, ws, config=cfg)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = moe_experts_triton(xs, w13, w2, ids_s, ws, config=cfg)
    for seed in (5, 6):
        x2, _, _, ids2, w2_ = problem(8, 2048, 768, 128, 8, torch.bfloat16, seed=seed)
        xs.copy_(x2)
        ids_s.copy_(ids2)
        ws.copy_(w2_)
        g.replay()
        want = moe_experts_reference(x2.float(), w13.float(), w2.float(), ids2, w2_.float())
        assert rel(out, want) < 1e-2
        assert rel(moe_experts_triton(x2, w13, w2, ids2, w2_, config=cfg), want) < 1e-2


_SM90 = r'''
import json, os, re, subprocess, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moesaic.kernels.triton import launch
from moesaic.kernels.triton.fused_decode import fused_decode_kernel as kern
sig = dict(x_ptr="*bf16", w13_ptr="*bf16", w2_ptr="*bf16", ids_ptr="*i64", wts_ptr="*fp32", ws_ptr="*fp32",
           cnt_ptr="*i32", y_ptr="*bf16", D="i32", F="i32", E="i32", TOPK="i32", stride_xt="i32", stride_13e="i32",
           stride_13g="i32", stride_2e="i32", stride_2d="i32", stride_yt="i32")
names = list(sig)
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in ("E", "TOPK")}  # as at D, F % 16 == 0
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = []
for c in launch.fused_candidates():
    consts = dict(BF=c.gemm1.bn, BK=c.gemm1.bk, BD=c.gemm2.bn, EVEN_K=True, EVEN_D=True)
    src = ASTSource(fn=kern, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=c.gemm1.num_warps, num_stages=c.gemm1.num_stages))
    path = os.path.join(os.environ["OUTDIR"], "k.cubin")
    open(path, "wb").write(k.asm["cubin"])
    use = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    ptx = k.asm["ptx"]
    out.append(dict(use=use, v4="ld.global.v4" in ptx, acq_rel="atom.global.gpu.acq_rel.add" in ptx,
                    red=bool(re.search(r"red\.global\.gpu\.relaxed\.add(\.v[24])?\.f32", ptx))))
print(json.dumps(out))
'''


@pytest.mark.slow
def test_kernel_compiles_for_sm90_without_spills(tmp_path):
    """No GPU needed: Triton + ptxas compile every candidate for Hopper (~10 s). The first five fit 128 registers
    (two 8-warp programs per multiprocessor), none spills, weight loads are 16-byte vectors, the partial sums are
    relaxed fp32 reductions (scalar or v2) and the counter an acq_rel atomic."""
    import json
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUTDIR=str(tmp_path), TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, "-c", _SM90], capture_output=True, text=True, env=env, timeout=300)
    if run.returncode != 0 and ("ptxas" in run.stderr or "No module named" in run.stderr):
        pytest.skip(f"no sm_90 toolchain here: {run.stderr[-200:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    for i, r in enumerate(rows):
        regs, local = (int(re.search(p, r["use"]).group(1)) for p in (r"REG:(\d+)", r"LOCAL:(\d+)"))
        assert local == 0 and regs <= (128 if i < 5 else 255), (i, r["use"])
        assert r["v4"] and r["acq_rel"] and r["red"], (i, r)
