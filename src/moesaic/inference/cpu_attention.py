"""The engine's CPU decode attention: the model's `Attention` modules switched, in place, to one C call per
layer for the one-new-token steps (`kernels.cpu_attention`).

`use_cpu_attention(model)` gives every plain `Attention` of a CPU model the class `CpuDecodeAttention` (same
parameters, state dict and values up to fp32 rounding). Its forward takes the C path when a decode step
allows it: one new token per row, fp32 or bf16 on CPU, no gradient, the engine's KV cache (`SlotView`) with
separate key / value buffers of the activations' dtype, full rotary, no qk clipping (qk-norm per head is fine:
it runs before the call).
Then the q/k/v projections and the output projection stay the model's (oneDNN / the C GEMVs), and rotary,
the cache write and the attention are one call. Everything else (prefill, fp16, MLA, partial rotary) runs
the model's own forward. A transform from outside, like `inference.cpu_norms`: the model code knows nothing of it.
"""

from __future__ import annotations

import torch
from torch import nn

from moesaic.inference.cpu_norms import switch_class
from moesaic.kernels import cpu_attention
from moesaic.model.attention import Attention, rope_tables


class CpuDecodeAttention(Attention):
    """Attention whose fp32 / bf16 CPU decode steps run rotary + KV write + attention in one C call."""

    def forward(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor, cache=None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        layout = self._c_layout(x_BTD, cache)
        if layout is None:
            return super().forward(x_BTD, positions_BT, cache, rope)
        k_cache, v_cache, slots, pos = layout
        b, h, hkv, d = x_BTD.shape[0], self.n_heads, self.n_kv, self.hd
        tables = rope_tables(self.rope, positions_BT, x_BTD.dtype, rope)
        if tables[0].shape[-1] != d:  # partial rotary: the model's own path
            return super().forward(x_BTD, positions_BT, cache, rope)
        q, k, v = self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        if self.qk_norm == "head":
            q = self.q_norm(q.view(b, 1, h, d))
            k = self.k_norm(k.view(b, 1, hkv, d))
        o = cpu_attention.decode_attention_unchecked(
            q.reshape(b, h * d), k.reshape(b, hkv * d), v.reshape(b, hkv * d), tables[0].reshape(b, d).contiguous(),
            tables.sin_rot.reshape(b, d).contiguous(), k_cache, v_cache, slots, pos, h)  # one row stride for both
        return self.wo(o.view(b, 1, h * d))

    def _c_layout(self, x: torch.Tensor, cache):
        """(k_cache, v_cache [N, M, Hkv, D], slots [B], positions [B]) when this call can take the C path."""
        if (x.dim() != 3 or x.shape[1] != 1 or x.dtype not in cpu_attention.DTYPES or x.device.type != "cpu"
                or self.clip is not None or self.qk_norm not in ("none", "head") or self.hd % 2
                or (torch.is_grad_enabled() and x.requires_grad) or not hasattr(cache, "decode_layout")):
            return None
        return cache.decode_layout(self.layer, x.shape[0], x.dtype)


def use_cpu_attention(model: nn.Module) -> int:
    """Switch the plain Attention modules of a CPU model to `CpuDecodeAttention` in place; returns how many
    (0 where the kernel cannot be built or the model is not on CPU)."""
    if model.embed.weight.device.type != "cpu" or not cpu_attention.available():
        return 0
    return switch_class(model, Attention, CpuDecodeAttention)
