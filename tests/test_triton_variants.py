"""The grouped-GEMM variants (tensor-descriptor loads, persistent grid) against the reference.

On CPU under the Triton interpreter at small sizes; `gpu` tests run the tuner's own candidate
configs at full benchmark sizes. Same helpers and tolerances as test_triton.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from moesaic.kernels.reference import moe_experts_reference  # noqa: E402
from moesaic.kernels.triton import autotune, launch, moe_experts_triton, ops  # noqa: E402
from moesaic.kernels.triton.launch import GemmConfig, MoEConfig  # noqa: E402
from test_triton import DEV, TOL, assert_configs_run, problem, ref64, rel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter math on padding rows
VARIANTS = {"tma": (1, 0), "tma+gather": (2, 0), "persistent": (0, 1), "tma+persistent": (1, 1), "tma+flat": (1, 2)}


def cfg_of(bm: int, tma: int, persistent: int, bn1: int = 32, bn2: int = 32, bk: int = 32) -> MoEConfig:
    return MoEConfig("grouped", bm, GemmConfig(bn1, bk, 2, 4, 2, tma, persistent),
                     GemmConfig(bn2, bk, 2, 4, 2, tma, persistent))


@pytest.mark.parametrize("t,d,f,e,k,bm,kw", [
    (1, 64, 32, 4, 2, 16, {}),
    (3, 64, 32, 8, 2, 16, {}),
    (33, 80, 48, 8, 2, 16, {}),                    # D, F not multiples of the blocks: zero-filled tiles
    (9, 64, 32, 256, 8, 16, {}),                   # E = 256, K = 8: most experts empty
    (100, 64, 32, 8, 3, 32, {"drop": 0.2}),        # atomic align path, dropped slots
    (40, 64, 32, 8, 2, 16, {"one_expert": True}),  # all tokens on one expert
])
@pytest.mark.parametrize("variant", ["tma+gather", "persistent", "tma+flat"])  # tma+persistent: T = 1000 below
def test_variant_forward_matches_reference(t, d, f, e, k, bm, kw, variant):
    dtype = torch.bfloat16 if t % 2 else torch.float16
    x, w13, w2, ids, w = problem(t, d, f, e, k, dtype, seed=t + e, **kw)
    y = moe_experts_triton(x, w13, w2, ids, w, config=cfg_of(bm, *VARIANTS[variant]))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert rel(y, ref64(x, w13, w2, ids, w)) < TOL[dtype]


def test_variant_at_t1000():
    """T = 1000: several row blocks per expert and many tiles per persistent program (one variant: the
    interpreter needs ~10 s per run at this size)."""
    x, w13, w2, ids, w = problem(1000, 64, 32, 16, 2, torch.bfloat16, seed=11)
    y = moe_experts_triton(x, w13, w2, ids, w, config=cfg_of(64, 1, 1, bn2=64))
    assert rel(y, ref64(x, w13, w2, ids, w)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("variant", ["tma+gather", "tma+flat"])
def test_variant_training_forward_and_backward(variant):
    """The training forward (SAVE_H) runs the variant; the backward's GEMMs take it where they can."""
    x, w13, w2, ids, w = problem(70, 64, 32, 8, 3, torch.bfloat16, seed=4, drop=0.1)
    ins = [x, w13, w2, w]
    ours = [v.clone().requires_grad_() for v in ins]
    ref = [v.double().clone().requires_grad_() for v in ins]
    y = moe_experts_triton(ours[0], ours[1], ours[2], ids, ours[3], config=cfg_of(16, *VARIANTS[variant]))
    dy = torch.randn_like(y)
    y.backward(dy)
    moe_experts_reference(ref[0], ref[1], ref[2], ids, ref[3]).backward(dy.double())
    assert rel(y, ref64(x, w13, w2, ids, w)) < TOL[torch.bfloat16]
    for name, a, b in zip(("x", "w13", "w2", "weights"), ours, ref):
        assert rel(a.grad, b.grad) < 1.5 * TOL[torch.bfloat16], name


def test_tma_only_where_the_layout_allows():
    if DEV.type == "cpu":
        assert ops.tma_available()  # the interpreter runs the descriptor path
    w = torch.randn(4, 64, 32, device=DEV, dtype=torch.float16)
    assert ops._tma_ok(w) == ops.tma_available()
    assert not ops._tma_ok(w.transpose(1, 2))                     # last stride not 1
    assert not ops._tma_ok(w[:, :, :30])                          # not contiguous
    buf = torch.empty(w.numel() + 1, device=DEV, dtype=w.dtype)
    assert not ops._tma_ok(buf[1:].view_as(w))                    # 2-byte offset: base not 16-byte aligned
    assert not ops._tma_ok(torch.randn(8, 36, device=DEV, dtype=w.dtype), rows_contiguous=False)  # 72-byte rows


def test_tma_gather_variant_sorts_x_first(monkeypatch):
    calls = []
    real = ops._gather_sorted
    monkeypatch.setattr(ops, "_gather_sorted", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    x, w13, w2, ids, w = problem(5, 64, 32, 4, 2, torch.float16, seed=2)
    moe_experts_triton(x, w13, w2, ids, w, config=cfg_of(16, 1, 0))
    assert calls == []
    y = moe_experts_triton(x, w13, w2, ids, w, config=cfg_of(16, 2, 0))
    assert calls == ([x.shape] if ops.tma_available() else [])
    assert rel(y, ref64(x, w13, w2, ids, w)) < TOL[torch.float16]


def test_candidates_and_json_roundtrip_of_variants():
    for which in ("gemm1", "gemm2"):
        base = launch.gemm_candidates(128, which)
        wide = launch.gemm_candidates(128, which, tma=True, persistent=True)
        assert set(base) < set(wide) and not any(g.tma or g.persistent for g in base)
        assert any(g.tma and g.persistent for g in wide) and any(g.persistent and not g.tma for g in wide)
        assert any(g.tma == 2 for g in wide) == (which == "gemm1")  # pre-gathered x: the w13 GEMM only
    cfg = cfg_of(64, 2, 2)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="persistent"):
        cfg_of(64, 1, 3)
    with pytest.raises(ValueError, match="tma"):
        cfg_of(64, 3, 0)
    old = {"path": "grouped", "bm": 64, "gemm1": {"bn": 32, "bk": 32, "group_m": 2, "num_warps": 4,
                                                  "num_stages": 2}, "gemm2": {"bn": 32, "bk": 32}}
    assert MoEConfig.from_dict(old).gemm1 == GemmConfig(32, 32, 2, 4, 2, 0, 0)  # shipped JSON still loads


# ---- full sizes on the GPU: every large-T candidate of the tuner, on the benchmark shapes -----------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("t,d,f,e,k,bm", [(1000, 2048, 768, 128, 8, 64), (2048, 2048, 1024, 64, 8, 128),
                                          (600, 7168, 2048, 256, 8, 64), (1000, 4096, 1000, 8, 2, 128)])
def test_gpu_every_large_t_candidate(t, d, f, e, k, bm, monkeypatch):
    monkeypatch.setenv("MOESAIC_TRITON_AUTOTUNE", "0")
    x, w13, w2, ids, w = problem(t, d, f, e, k, torch.bfloat16, seed=t, drop=0.02)
    ref = moe_experts_reference(x, w13, w2, ids, w)
    tma, persistent = autotune.variants()
    g1s = launch.gemm_candidates(bm, "gemm1", tma, persistent)
    g2s = launch.gemm_candidates(bm, "gemm2", tma, persistent)
    assert_configs_run((x, w13, w2, ids, w), ref, [MoEConfig("grouped", bm, g1s[i % len(g1s)], g2s[i % len(g2s)])
                                                   for i in range(max(len(g1s), len(g2s)))])


def test_persistent_and_tma_switches_also_cap_shipped_configs(monkeypatch):
    """MOESAIC_TRITON_PERSISTENT=0 / MOESAIC_TRITON_TMA=0 turn the variants off for configs read from JSON too, and
    the grid follows the kernel's (non-)persistent loop."""
    from moesaic.kernels.triton import ops
    from moesaic.kernels.triton.launch import GemmConfig

    g = GemmConfig(64, 32, 1, 4, 2, tma=1, persistent=2)
    for env, fn in (("MOESAIC_TRITON_PERSISTENT", ops._persistent_max), ("MOESAIC_TRITON_TMA", ops.tma_available)):
        fn.cache_clear()
        monkeypatch.setenv(env, "0")
        try:
            if fn is ops._persistent_max:
                assert ops._persistent(g) == 0
            else:
                assert not ops.tma_available()
        finally:
            monkeypatch.delenv(env)
            fn.cache_clear()
    assert ops._persistent(g) in (1, 2)


def test_persistent_config_runs_correctly_with_the_switch_off(monkeypatch):
    """A persistent config from a JSON file under MOESAIC_TRITON_PERSISTENT=0: a full grid, same result."""
    monkeypatch.setenv("MOESAIC_TRITON_PERSISTENT", "0")
    ops._persistent_max.cache_clear()
    try:
        x, w13, w2, ids, w = problem(33, 64, 32, 8, 2, torch.bfloat16, seed=5)
        y = moe_experts_triton(x, w13, w2, ids, w, config=cfg_of(16, 0, 2))
        assert rel(y, ref64(x, w13, w2, ids, w)) < TOL[torch.bfloat16]
    finally:
        monkeypatch.delenv("MOESAIC_TRITON_PERSISTENT")
        ops._persistent_max.cache_clear()
