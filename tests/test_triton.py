"""Triton MoE backend vs the reference.

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set
here before Triton loads) at small sizes; `gpu`-marked tests run the compiled kernels at full size.
Tolerances (relative Frobenius error against an fp64 reference): fp16 2e-3; bf16 2e-2 (the CPU
interpreter rounds fp32 -> bf16 by truncation, doubling bf16 error; on the GPU it is ~5e-3).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from moesaic import kernels  # noqa: E402
from moesaic.kernels.reference import moe_experts_reference  # noqa: E402
from moesaic.kernels.triton import autotune, launch, moe_experts_triton, supports  # noqa: E402
from moesaic.kernels.triton.align import align, max_blocks  # noqa: E402
from moesaic.kernels.triton.launch import GemmConfig, MoEConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter math on padding rows
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
G = GemmConfig(32, 32, 2, 4, 2)
GROUPED16 = MoEConfig("grouped", 16, G, G)
GROUPED32 = MoEConfig("grouped", 32, GemmConfig(32, 64, 4, 4, 2), GemmConfig(64, 32, 1, 4, 2))
DECODE = MoEConfig("decode", 1, GemmConfig(16, 32), GemmConfig(16, 64))


def problem(t, d, f, e, k, dtype, seed, *, drop=0.0, one_expert=False):
    x, w13, w2, ids, w = autotune.random_problem(t, d, f, e, k, dtype, DEV, seed=seed)
    if one_expert:
        ids[:, 0] = e - 1
        ids[:, 1:] = -1
    if drop:
        g = torch.Generator(device=DEV).manual_seed(seed + 1)
        ids = torch.where(torch.rand(ids.shape, generator=g, device=DEV) < drop, -1, ids)
    return x, w13, w2, ids, w


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_configs_run(args, ref, cfgs) -> None:
    """Each config's forward on args = (x, w13, w2, ids, w) within 2e-2 of ref; a config the chip cannot run (out of
    shared memory / registers) is skipped, as the tuner skips it."""
    for cfg in cfgs:
        try:
            y = moe_experts_triton(*args, config=cfg)
        except Exception as exc:
            if "resources" not in str(exc).lower():
                raise
            continue
        assert rel(y, ref) < 2e-2, cfg


def ref64(x, w13, w2, ids, w):
    return moe_experts_reference(x.double(), w13.double(), w2.double(), ids, w.double())


@pytest.mark.parametrize("t,d,f,e,k,cfg,kw", [
    (1, 64, 32, 4, 2, GROUPED16, {}),
    (3, 64, 32, 8, 2, GROUPED16, {}),
    (33, 80, 48, 8, 2, GROUPED16, {}),          # D, F not multiples of the blocks
    (9, 64, 32, 256, 8, GROUPED16, {}),         # E = 256, K = 8: most experts empty; 72 pairs (atomic align)
    (100, 64, 32, 8, 3, GROUPED32, {"drop": 0.2}),  # > 64 pairs: the atomic align path; dropped slots
    (40, 64, 32, 8, 2, GROUPED16, {"one_expert": True}),
    (3, 64, 32, 8, 2, DECODE, {"drop": 0.3}),
    (1, 80, 48, 16, 8, DECODE, {}),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_matches_reference(t, d, f, e, k, cfg, kw, dtype):
    x, w13, w2, ids, w = problem(t, d, f, e, k, dtype, seed=t * 7 + e, **kw)
    y = moe_experts_triton(x, w13, w2, ids, w, config=cfg)
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y, ref64(x, w13, w2, ids, w)) < TOL[dtype]


@pytest.mark.parametrize("t,cfg", [(5, GROUPED16), (40, GROUPED16), (3, DECODE)])
def test_out_of_range_ids_are_dropped_like_the_reference(t, cfg):
    """ids >= E contribute nothing (the reference's loop never reaches them); int32 ids work too."""
    x, w13, w2, ids, w = problem(t, 64, 32, 8, 2, torch.float16, seed=t)
    ids[::2, 1] = 8 + torch.arange(ids[::2, 1].numel(), device=DEV) % 3
    ids = ids.to(torch.int32)
    y = moe_experts_triton(x, w13, w2, ids, w, config=cfg)
    assert rel(y, ref64(x, w13, w2, ids.long(), w)) < TOL[torch.float16]


@pytest.mark.parametrize("t,e,k,dtype", [(33, 8, 2, torch.float16), (70, 4, 3, torch.bfloat16)])
def test_backward_matches_reference(t, e, k, dtype):
    x, w13, w2, ids, w = problem(t, 64, 32, e, k, dtype, seed=5, drop=0.1)
    ins = [x, w13, w2, w]
    ours = [v.clone().requires_grad_() for v in ins]
    ref = [v.double().clone().requires_grad_() for v in ins]
    y = moe_experts_triton(ours[0], ours[1], ours[2], ids, ours[3], config=DECODE)  # grads force grouped
    dy = torch.randn_like(y)
    y.backward(dy)
    moe_experts_reference(ref[0], ref[1], ref[2], ids, ref[3]).backward(dy.double())
    for name, a, b in zip(("x", "w13", "w2", "weights"), ours, ref):
        assert rel(a.grad, b.grad) < 1.5 * TOL[dtype], name


@pytest.mark.parametrize("t,e,k,bm", [(5, 4, 2, 16), (300, 16, 4, 32), (3, 256, 8, 16)])
def test_align_is_a_padded_permutation(t, e, k, bm):
    ids = torch.randint(-1, e, (t, k), device=DEV)
    al = align(ids, e, bm)
    flat = ids.reshape(-1)
    counts = torch.bincount(flat[flat >= 0], minlength=e)
    assert torch.equal(al.counts_E.long().cpu(), counts.cpu())
    off = al.off_E1.long().cpu()
    padded = (counts.cpu() + bm - 1) // bm * bm
    assert off[0] == 0 and torch.equal(off[1:] - off[:-1], padded) and off[-1] == padded.sum()
    assert al.max_blocks == max_blocks(t * k, e, bm) and off[-1] <= al.max_blocks * bm
    sorted_ids = al.sorted_ids_P.long().cpu()
    bexp = al.block_expert_B.long().cpu()
    for x in range(e):
        rows = sorted_ids[off[x]: off[x] + counts[x]]
        assert torch.equal(rows.sort().values, (flat.cpu() == x).nonzero().flatten())
        assert (bexp[off[x] // bm: off[x + 1] // bm] == x).all()


def test_config_validation_and_json_roundtrip(tmp_path):
    with pytest.raises(ValueError, match="path"):
        MoEConfig("bogus", 16, G, G)
    with pytest.raises(ValueError, match="bm"):
        MoEConfig("grouped", 24, G, G)
    path = tmp_path / "dev.json"
    autotune.write_entry(path, "T8_D64_F32_E4_K2_bfloat16", GROUPED32, 12.5, "test device")
    data = json.loads(path.read_text())
    assert data["device"] == "test device"
    assert MoEConfig.from_dict(data["entries"]["T8_D64_F32_E4_K2_bfloat16"]) == GROUPED32
    assert autotune.shape_key(1000, 64, 32, 4, 2, torch.bfloat16) == "T1024_D64_F32_E4_K2_bfloat16"
    assert [autotune.t_bucket(t) for t in (0, 1, 3, 64, 65)] == [1, 1, 4, 64, 128]


def test_lookup_prefers_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESAIC_CACHE_DIR", str(tmp_path))
    key = autotune.shape_key(8, 64, 32, 4, 2, torch.float16)
    assert autotune.lookup(key, "some_gpu") is None
    autotune.write_entry(autotune.user_dir() / "some_gpu.json", key, DECODE, 3.0, "some gpu")
    assert autotune.lookup(key, "some_gpu") == DECODE


def test_registration_and_input_errors():
    assert "triton" in kernels._BACKENDS
    x, w13, w2, ids, w = problem(2, 64, 32, 4, 2, torch.float16, seed=1)
    assert supports(x, w13) == (DEV.type == "cuda")
    assert not supports(x.float(), w13.float())
    with pytest.raises(ValueError, match="dtype"):
        moe_experts_triton(x.float(), w13.float(), w2.float(), ids, w)
    with pytest.raises(ValueError, match="match"):
        moe_experts_triton(x, w13.bfloat16(), w2, ids, w)
    if DEV.type == "cpu":
        assert "triton" not in kernels.available_backends()
        with pytest.raises(ValueError, match="not available"):
            kernels.moe_experts(x, w13, w2, ids, w, backend="triton")


def test_fast_launch_key_is_at_least_as_fine_as_tritons():
    from moesaic.kernels.triton.fastlaunch import _spec

    buf = torch.zeros(64, dtype=torch.float16)
    assert _spec(buf[8:]) == _spec(buf[16:])          # both 16-byte aligned
    assert _spec(buf[1:]) != _spec(buf[8:])           # 2-byte offset: another specialization
    assert _spec(buf) != _spec(buf.float())           # dtype
    assert _spec(1) != _spec(2) and _spec(16) == _spec(32) and _spec(16) != _spec(24)
    assert _spec(16) != _spec(2 ** 32)                # int32 vs int64 argument


def test_heuristic_is_valid_everywhere():
    for t in (1, 3, 33, 1000, 16384):
        for e, k in ((8, 2), (64, 8), (256, 8)):
            cfg = launch.heuristic(t, 2048, 768, e, k)
            assert cfg.path in launch.PATHS


# ---- full sizes on the GPU -------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("t,d,f,e,k", [(1, 2048, 768, 128, 8), (3, 4096, 1024, 8, 2), (33, 7168, 2048, 256, 8),
                                       (1000, 2048, 768, 128, 8), (1000, 2048, 1024, 64, 8), (4096, 4096, 1024, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_full_size_forward(t, d, f, e, k, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("MOESAIC_TRITON_AUTOTUNE", "0")  # heuristic + explicit configs: no tuning in tests
    x, w13, w2, ids, w = problem(t, d, f, e, k, dtype, seed=t)
    ref = moe_experts_reference(x.float(), w13.float(), w2.float(), ids, w.float())
    cands = [None] + [MoEConfig("grouped", bm, GemmConfig(64, 64, 8, 4, 3), GemmConfig(128, 64, 8, 4, 3))
                      for bm in (16, 64, 128)]
    if t * k <= 64:
        cands.append(MoEConfig("decode", 1, GemmConfig(32, 256), GemmConfig(16, 256)))
    for cfg in cands:
        y = moe_experts_triton(x, w13, w2, ids, w, config=cfg)
        assert rel(y, ref) < 1e-2, cfg
    assert kernels.get_backend("auto", x, w13).name == "triton"


@pytest.mark.gpu
@gpu
def test_gpu_backward_and_graph_capture(monkeypatch):
    monkeypatch.setenv("MOESAIC_TRITON_AUTOTUNE", "0")
    x, w13, w2, ids, w = problem(512, 1024, 512, 16, 4, torch.bfloat16, seed=3, drop=0.05)
    ins = [x, w13, w2, w]
    ours = [v.clone().requires_grad_() for v in ins]
    ref = [v.float().clone().requires_grad_() for v in ins]
    y = moe_experts_triton(ours[0], ours[1], ours[2], ids, ours[3])
    dy = torch.randn_like(y)
    y.backward(dy)
    moe_experts_reference(ref[0], ref[1], ref[2], ids, ref[3]).backward(dy.float())
    for name, a, b in zip(("x", "w13", "w2", "weights"), ours, ref):
        assert rel(a.grad, b.grad) < 2e-2, name
    # the forward is capturable (no host sync) and replays to the same result
    xs = x[:4].clone()
    out = moe_experts_triton(xs, w13, w2, ids[:4], w[:4])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g = moe_experts_triton(xs, w13, w2, ids[:4], w[:4])
    xs.copy_(x[4:8])
    g.replay()
    assert torch.equal(out_g, moe_experts_triton(x[4:8], w13, w2, ids[:4], w[:4]))
    assert not torch.equal(out_g, out)


@pytest.mark.gpu
@gpu
def test_gpu_fast_launch_matches_triton_launch(monkeypatch):
    monkeypatch.setenv("MOESAIC_TRITON_AUTOTUNE", "0")
    x, w13, w2, ids, w = problem(300, 512, 256, 8, 2, torch.bfloat16, seed=9)
    cfg = MoEConfig("grouped", 32, GemmConfig(64, 64, 4, 4, 3), GemmConfig(64, 64, 4, 4, 3))
    first = moe_experts_triton(x, w13, w2, ids, w, config=cfg)   # compiled and launched by Triton
    again = moe_experts_triton(x, w13, w2, ids, w, config=cfg)   # relaunched by fastlaunch
    assert torch.equal(first, again)
    # a 2-byte-offset view is not 16-byte aligned: a different specialization, compiled anew
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    xv = buf[1:].view_as(x)
    xv.copy_(x)
    assert torch.allclose(moe_experts_triton(xv, w13, w2, ids, w, config=cfg).float(), first.float(), atol=1e-2)
