"""The small-T decode path (kernels/triton/decode.py): multi-tile loops, K not a power of two, PDL.

Under the Triton interpreter on CPU (small sizes); `gpu`-marked tests run compiled kernels, with and
without programmatic dependent launch, eagerly and from a CUDA graph.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from moesaic.kernels.reference import moe_experts_reference  # noqa: E402
from moesaic.kernels.triton import autotune, launch, moe_experts_triton  # noqa: E402
from moesaic.kernels.triton.launch import GemmConfig, MoEConfig  # noqa: E402
from moesaic.kernels.triton.ops import forward_decode, pdl_available  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
# BK 16 < D = 80 and < F = 40 (not a multiple): both kernels loop, prefetch one tile ahead, mask the last
LOOP = MoEConfig("decode", 1, GemmConfig(4, 16, 1, 4, 2), GemmConfig(4, 16, 1, 4, 2))
ONE_SHOT = MoEConfig("decode", 1, GemmConfig(8, 128, 1, 4, 2), GemmConfig(2, 64, 1, 4, 2))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def problem(t, d, f, e, k, dtype, seed, drop=0.0):
    x, w13, w2, ids, w = autotune.random_problem(t, d, f, e, k, dtype, DEV, seed=seed)
    if drop:
        g = torch.Generator(device=DEV).manual_seed(seed + 1)
        ids = torch.where(torch.rand(ids.shape, generator=g, device=DEV) < drop, -1, ids)
        ids[0, 0] = ids[0, 0].clamp_min(0)  # keep one live pair: the reference output is not all zeros
    return x, w13, w2, ids, w


def ref64(x, w13, w2, ids, w):
    return moe_experts_reference(x.double(), w13.double(), w2.double(), ids, w.double())


@pytest.mark.parametrize("t,k,drop,dtype", [(1, 1, 0.0, torch.bfloat16), (1, 3, 0.0, torch.float16),
                                            (5, 6, 0.25, torch.bfloat16), (2, 8, 0.0, torch.float16),
                                            (4, 2, 0.4, torch.bfloat16)])
@pytest.mark.parametrize("cfg", [LOOP, ONE_SHOT], ids=["loop", "one_shot"])
def test_decode_matches_reference(t, k, drop, dtype, cfg):
    """K = 3 and 6 pad the [KP, BN, BK] w2 tile to KP = 4 / 8 slots; dropped pairs (id -1) read and add nothing."""
    args = problem(t, 80, 40, 12, k, dtype, seed=10 * t + k, drop=drop)
    y = forward_decode(*args, cfg)
    assert y.shape == args[0].shape and y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y, ref64(*args)) < TOL[dtype]


def test_decode_all_pairs_on_one_expert_and_empty_input():
    x, w13, w2, ids, w = problem(3, 64, 32, 8, 4, torch.bfloat16, seed=3)
    ids[:] = 5
    assert rel(forward_decode(x, w13, w2, ids, w, LOOP), ref64(x, w13, w2, ids, w)) < 2e-2
    assert forward_decode(x[:0], w13, w2, ids[:0], w[:0], LOOP).shape == (0, 64)


def test_pdl_config_is_validated_and_round_trips():
    cfg = MoEConfig("decode", 1, GemmConfig(8, 512, 1, 4, 2), GemmConfig(4, 128, 1, 4, 2), pdl=1)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert MoEConfig.from_dict({k: v for k, v in LOOP.to_dict().items() if k != "pdl"}).pdl == 0  # older tables
    g = GemmConfig(32, 32)
    with pytest.raises(ValueError, match="pdl"):
        MoEConfig("grouped", 16, g, g, pdl=1)
    with pytest.raises(ValueError, match="pdl"):
        MoEConfig("decode", 1, g, g, pdl=2)
    assert launch.heuristic(1, 2048, 768, 128, 8).path == "decode"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the off-GPU case")
def test_pdl_is_off_without_a_hopper_gpu():
    """Off the GPU (the interpreter) a pdl=1 config runs the plain launches: same answer, bitwise."""
    assert not pdl_available(DEV)
    args = problem(2, 80, 40, 12, 8, torch.bfloat16, seed=1)
    on = MoEConfig("decode", 1, LOOP.gemm1, LOOP.gemm2, pdl=1)
    assert torch.equal(forward_decode(*args, on), forward_decode(*args, LOOP))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 3, 8])
def test_pdl_matches_plain_launch_on_gpu(t):
    """Full-size fine-grained shape: pdl=1 and pdl=0 give bitwise the same output, eagerly and replayed from a
    CUDA graph holding three calls (the launches overlap; the sums do not change)."""
    if not pdl_available(DEV):
        pytest.skip("needs a Hopper-or-newer GPU")
    d, f, e, k = 2048, 768, 128, 8
    args = problem(t, d, f, e, k, torch.bfloat16, seed=t)
    g1, g2 = GemmConfig(8, 512, 1, 4, 2), GemmConfig(4, 128, 1, 4, 2)
    plain, pdl = MoEConfig("decode", 1, g1, g2), MoEConfig("decode", 1, g1, g2, pdl=1)
    y0 = forward_decode(*args, plain)
    assert rel(y0, ref64(*args)) < 2e-2
    assert torch.equal(forward_decode(*args, pdl), y0)
    routes = [autotune.random_routing(t, e, k, DEV, seed=s) for s in range(3)]
    outs = [torch.empty_like(y0) for _ in routes]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for (ids, w), out in zip(routes, outs):
            out.copy_(forward_decode(args[0], args[1], args[2], ids, w, pdl))
    graph.replay()
    torch.cuda.synchronize()
    for (ids, w), out in zip(routes, outs):
        assert torch.equal(out, forward_decode(args[0], args[1], args[2], ids, w, plain))
    assert rel(moe_experts_triton(*args, config=pdl), ref64(*args)) < 2e-2
