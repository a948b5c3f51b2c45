"""RMSNorm (computed in fp32, returned in the input dtype, as Llama/Mixtral do)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, times `weight` (any shape that broadcasts against x).

    The statistic is computed in fp32 and the normalised values are cast back to x's dtype before
    the weight multiplies them (transformers' order). fp32 with a [D] weight is torch's one fused
    call; otherwise F.rms_norm without weight, then the multiply (bf16, or per-head weights [H, Dh]).
    F.rms_norm upcasts 16-bit inputs to fp32 itself and returns the input dtype, so 16-bit x goes in
    as it is (the same values as x.float() in, .to(x.dtype) out, without those two casts' kernels).
    """
    d = x.shape[-1]
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.shape == x.shape[-1:]:
        return F.rms_norm(x, (d,), weight, eps)
    if x.dtype in (torch.bfloat16, torch.float16):
        return weight * F.rms_norm(x, (d,), None, eps)
    return weight * F.rms_norm(x.float(), (d,), None, eps).to(x.dtype)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
