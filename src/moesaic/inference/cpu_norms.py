"""The engine's CPU RMS norms: the model's `RMSNorm` modules switched, in place, to the one-call C kernel.

`use_cpu_norms(model)` gives every plain `RMSNorm` of a CPU fp32 or bf16 model the class `CpuRMSNorm` (same
parameters, state dict and values up to fp32 rounding; bf16 rounded at the model's two points): its forward calls
`kernels.cpu_norm.rms_norm` when the input is a few fp32 / bf16 rows (a decode step's norms: 9-17 calls a step on the benchmark shapes, each
~8 ATen ops in torch) and the model's own `rms_norm` otherwise. A transform from outside, like
`inference.quantize.use_onednn`: the model code knows nothing of it.
"""

from __future__ import annotations

import torch
from torch import nn

from moesaic.kernels import cpu_norm
from moesaic.model.norm import RMSNorm, rms_norm


class CpuRMSNorm(RMSNorm):
    """RMSNorm whose few-row fp32 / bf16 CPU inputs go through the C kernel (`kernels.cpu_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_norm.usable(x, self.weight):
            return cpu_norm.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def switch_class(model: nn.Module, plain: type[nn.Module], fast: type[nn.Module]) -> int:
    """Give every module of exactly class `plain` the class `fast` (a subclass adding no state) in place;
    returns how many. Subclasses of `plain` (other variants) are left alone."""
    n = 0
    for mod in model.modules():
        if type(mod) is plain:
            mod.__class__ = fast
            n += 1
    return n


def use_cpu_norms(model: nn.Module) -> int:
    """Switch the plain RMSNorm modules of a CPU fp32 or bf16 model to `CpuRMSNorm` in place; returns how many
    (0 where the kernel cannot be built or the model is not fp32 / bf16 on CPU)."""
    p = model.embed.weight
    if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16) or not cpu_norm.available():
        return 0
    return switch_class(model, RMSNorm, CpuRMSNorm)
