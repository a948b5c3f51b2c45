"""The C RMS norm (kernels.cpu_norm) and the engine's CpuRMSNorm against the model's torch rms_norm."""

import pytest
import torch

from moesaic import ModelConfig, build_model
from moesaic.inference.cpu_norms import CpuRMSNorm, use_cpu_norms
from moesaic.kernels import cpu_norm
from moesaic.model.norm import RMSNorm, rms_norm

needs_kernel = pytest.mark.skipif(not cpu_norm.available(), reason="C RMS norm kernel not buildable here")


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 1024), (1, 1, 16, 64), (3, 1, 4, 128), (1, 33), (2, 5, 7), (1, 1, 1)])
def test_kernel_matches_torch(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    assert cpu_norm.usable(x, w)
    got = cpu_norm.rms_norm(x, w, 1e-5)
    want = rms_norm(x, w, 1e-5)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_kernel_non_contiguous_and_eps():
    x = torch.randn(4, 64).t()  # [64, 4]: rows not contiguous
    w = torch.rand(4)
    torch.testing.assert_close(cpu_norm.rms_norm(x, w, 0.5), rms_norm(x, w, 0.5), rtol=1e-5, atol=1e-6)
    tiny = torch.full((1, 8), 1e-4)  # eps dominates
    torch.testing.assert_close(cpu_norm.rms_norm(tiny, torch.ones(8), 1e-2), rms_norm(tiny, torch.ones(8), 1e-2))


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 1024), (1, 1, 16, 64), (3, 1, 4, 128), (1, 33), (2, 5, 7), (1, 1, 1)])
def test_bf16_kernel_matches_the_models_bf16_norm(shape):
    """bf16: the model rounds the normalised value to bf16, then the product with the bf16 weight; the kernel
    does the same, so only the fp32 sum of squares' order differs: equal but for rare 1-ulp differences."""
    g = torch.Generator().manual_seed(7 + sum(shape))
    x = (torch.randn(shape, generator=g) * 3).bfloat16()
    w = torch.randn(shape[-1], generator=g).bfloat16()
    assert cpu_norm.usable(x, w)
    got = cpu_norm.rms_norm(x, w, 1e-5)
    want = rms_norm(x, w, 1e-5)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert (got != want).float().mean() < 0.02  # the same roundings: almost every value bit-identical


def test_usable_refuses_what_it_cannot_do():
    w = torch.ones(8)
    assert not cpu_norm.usable(torch.ones(2, 8, dtype=torch.bfloat16), w)  # dtypes differ
    assert not cpu_norm.usable(torch.ones(2, 8, dtype=torch.float16), torch.ones(8, dtype=torch.float16))
    assert not cpu_norm.usable(torch.ones(2, 8), torch.ones(2, 4))  # per-head weights
    assert not cpu_norm.usable(torch.ones(cpu_norm.MAX_ELEMENTS // 8 + 1, 8), w)  # a prefill: torch's norm
    assert not cpu_norm.usable(torch.ones(0, 8), w)
    assert not cpu_norm.usable(torch.ones(2, 8, requires_grad=True), w)


@needs_kernel
def test_engine_norms_switch_and_match():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      num_experts=4, top_k=2, expert_ffn=16, ffn=16, qk_norm="head")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.inference_mode():
        want = model(ids)
        n = use_cpu_norms(model)
        assert n == 2 * 4 + 1 and all(type(m) is not RMSNorm for m in model.modules() if isinstance(m, RMSNorm))
        got = model(ids)
        big = torch.randn(cpu_norm.MAX_ELEMENTS // 32 + 1, 32)  # beyond the kernel's size: torch's path
        norm = model.norm
        assert isinstance(norm, CpuRMSNorm)
        torch.testing.assert_close(norm(big), rms_norm(big, norm.weight, norm.eps))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert use_cpu_norms(build_model(cfg).to(torch.float16)) == 0
    torch.manual_seed(0)
    bf = build_model(cfg).eval().to(torch.bfloat16)
    with torch.inference_mode():
        want = bf(ids)
        assert use_cpu_norms(bf) == 2 * 4 + 1
        got = bf(ids)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
