"""The engine's CPU routers: the model's softmax / sigmoid top-k routers switched, in place, to one C call for
the expert choice of a few rows (`kernels.cpu_router`).

`use_cpu_router(model)` gives every plain `SoftmaxTopK` router of a CPU model the class `CpuSoftmaxTopK`, and
every `SigmoidTopK` without group limits `CpuSigmoidTopK` (same parameters, buffers and state dict). Their
forward replaces the whole eval path (gate matmul, topk, softmax / sigmoid, gather, renormalisation, scale,
cast: ~7 ATen ops) by one C call when the call allows it: contiguous fp32 / bf16 activations [T, D] on CPU with
T <= `cpu_router.MAX_ROWS`, an fp32 / bf16 gate weight (read as it is stored: a bf16 weight needs no fp32 copy),
eval mode, no gradient wanted, no token mask, no capacity, k <= `cpu_router.MAX_K`. Otherwise, and when the
kernel gives up at a (near) tie, the model's own forward runs: the experts chosen, and their order, are torch's.
The RouterOutput is the model's: ids int64, weights in the activations' dtype (within fp32 rounding of torch's),
logits fp32 (within fp32 rounding: the kernel's are the more exact), probs on access.
Switch routers, group-limited sigmoid routing and training keep the model's code. A transform from outside,
like `inference.cpu_attention`: the model code knows nothing of it.
"""

from __future__ import annotations

from abc import abstractmethod
from functools import cached_property

import torch
from torch import nn

from moesaic.kernels import cpu_router
from moesaic.model.router import Router, RouterOutput, SigmoidTopK, SoftmaxTopK


class _SigmoidRouterOutput(RouterOutput):
    """A RouterOutput whose balance-loss probabilities are the normalised sigmoid scores, computed on access
    (as `SigmoidTopK.select` computes them; decode never asks)."""

    @cached_property
    def probs_TE(self) -> torch.Tensor:
        s = self.logits_TE.sigmoid()
        return s / s.sum(-1, keepdim=True)


class _CRouting(Router):
    """The C path shared by the switched router classes; `_c_kind` says which kind applies (None: none)."""

    @abstractmethod
    def _c_kind(self) -> tuple[int, torch.Tensor | None] | None:
        """(cpu_router KIND_*, the fp32 correction bias or None) for this router, or None: torch's forward."""

    def forward(self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None = None,
                top_k: int | None = None) -> RouterOutput:
        k = self.top_k if top_k is None else int(top_k)
        w = self.weight
        kind = None
        if (token_mask_T is None and not self.training and self.capacity_factor is None and x_TD.dim() == 2
                and 0 < x_TD.shape[0] <= cpu_router.MAX_ROWS and 1 <= k <= min(self.num_experts, cpu_router.MAX_K)
                and x_TD.dtype in cpu_router.DTYPES and w.dtype in cpu_router.DTYPES and x_TD.device.type == "cpu"
                and x_TD.is_contiguous() and w.is_contiguous() and x_TD.shape[1] == w.shape[1]
                and not (torch.is_grad_enabled() and (x_TD.requires_grad or w.requires_grad))):
            kind = self._c_kind()
        if kind is not None:
            got = cpu_router.route_unchecked(x_TD, w, k, kind[0], kind[1], self.normalize, float(self.scale))
            if got is not None:  # else a (near) tie or a NaN: torch's matmul and topk decide
                weights_TK, ids_TK, logits_TE = got
                out = RouterOutput if kind[0] != cpu_router.KIND_SIGMOID else _SigmoidRouterOutput
                return out(weights_TK, ids_TK, logits_TE, None)
        return super().forward(x_TD, token_mask_T, top_k)


class CpuSoftmaxTopK(_CRouting, SoftmaxTopK):
    """SoftmaxTopK whose few-row CPU eval calls choose experts in one C call."""

    def _c_kind(self):
        return (cpu_router.KIND_SOFTMAX_RENORM if self.normalize else cpu_router.KIND_SOFTMAX), None


class CpuSigmoidTopK(_CRouting, SigmoidTopK):
    """SigmoidTopK (no group limits) whose few-row CPU eval calls choose experts in one C call."""

    def _c_kind(self):
        if self.n_group > 1:
            return None
        bias = self.correction_bias
        if bias.dtype != torch.float32 or not bias.is_contiguous():
            bias = bias.float().contiguous()
        return cpu_router.KIND_SIGMOID, bias


def use_cpu_router(model: nn.Module) -> int:
    """Switch the plain softmax / sigmoid top-k routers (sigmoid: without group limits) of a CPU model to the
    C classes in place; returns how many (0 where the kernel cannot be built or the model is not on CPU)."""
    if model.embed.weight.device.type != "cpu" or not cpu_router.available():
        return 0
    n = 0
    for mod in model.modules():
        if type(mod) is SoftmaxTopK:
            mod.__class__ = CpuSoftmaxTopK
        elif type(mod) is SigmoidTopK and mod.n_group == 1:
            mod.__class__ = CpuSigmoidTopK
        else:
            continue
        n += 1
    return n
