"""Grouped-query attention through `scaled_dot_product_attention`, with optional qk-norm, qkv bias, clip.

Shape legend: B batch, T new positions, S key positions, H query heads, Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.config import ModelConfig, rotary_dim
from moesaic.model.norm import RMSNorm
from moesaic.model.rope import RopeTables, RotaryEmbedding, apply_rope, apply_rope_bthd


def rope_tables(rope_module, positions_BT: torch.Tensor, dtype: torch.dtype,
                given: tuple[torch.Tensor, torch.Tensor] | None) -> RopeTables:
    """The (cos, sin) tables the model shared for this forward, in `dtype`; computed here if none.
    The model computes them in its activation dtype, so the layers normally cast nothing."""
    if given is None:
        return rope_module(positions_BT, dtype)
    if given[0].dtype == dtype:
        return given if isinstance(given, RopeTables) else RopeTables(*given)
    return RopeTables(given[0].to(dtype), given[1].to(dtype))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float | None = None) -> torch.Tensor:
    """Attention over [B, H, T, Dh] q and [B, Hkv, S, Dh] k/v; causal when mask is None.

    Grouped kv heads go to SDPA as they are (`enable_gqa`): repeating them first copied the whole
    key/value history every layer and step (~3% of a batch-32 decode step on CPU). With one new token
    per row (decode) the G = H / Hkv query heads of each kv head become G query rows of that head: plain
    multi-head attention over Hkv heads, the same sums. SDPA then runs its fused kernels where it would
    not with grouped heads and a mask (CUDA's memory-efficient kernel has no GQA, flash takes no mask),
    and on CPU it was 1.8x (fp32) to 10x (bf16) faster at Mixtral's 32 / 8 heads (bf16 bitwise the same,
    fp32 within 5e-7)."""
    gqa = k.shape[1] != q.shape[1]
    b, h, t, _ = q.shape
    if gqa and t == 1:
        hkv = k.shape[1]
        o = F.scaled_dot_product_attention(q.reshape(b, hkv, h // hkv, q.shape[-1]), k, v, attn_mask=mask,
                                           scale=scale)  # mask [B, 1, 1, S] broadcasts over the G rows
        return o.reshape(b, h, 1, v.shape[-1])
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    """GQA: H query heads share Hkv key/value heads."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d = cfg.d_model
        self.wq = nn.Linear(d, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(d, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(d, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.hd, d, bias=False)
        self.qk_norm, self.clip = cfg.qk_norm, cfg.clip_qkv
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.norm_eps), RMSNorm(self.hd, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.n_heads * self.hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.n_kv * self.hd, cfg.norm_eps)
        self.rope = RotaryEmbedding(rotary_dim(self.hd, cfg.rope_scaling), cfg.rope_theta, cfg.rope_scaling)

    def fuse_qkv(self) -> bool:
        """Store wq, wk, wv's weights (and biases) as row blocks of one tensor, each parameter a view of
        it, so one matmul projects q, k and v (inference: fewer, larger kernels). Parameter names, shapes,
        values and the state dict stay; no extra memory. Returns False (nothing done) unless the three are
        plain nn.Linear on one dtype and device. Moving or casting the parameters afterwards breaks the
        sharing: forward then sees it and projects separately again (call fuse_qkv again)."""
        lins = (self.wq, self.wk, self.wv)
        if any(type(m) is not nn.Linear for m in lins):
            return False
        ws = [m.weight for m in lins]
        if len({(w.dtype, w.device) for w in ws}) != 1:
            return False
        rows = [w.shape[0] for w in ws]
        with torch.no_grad():
            w = torch.cat([x.detach() for x in ws])
            b = None if lins[0].bias is None else torch.cat([m.bias.detach() for m in lins])
        for i, (m, wi) in enumerate(zip(lins, w.split(rows), strict=True)):
            m.weight = nn.Parameter(wi, requires_grad=ws[i].requires_grad)
            if b is not None:
                m.bias = nn.Parameter(b.split(rows)[i], requires_grad=m.bias.requires_grad)
        self._qkv = (w, b, tuple(m.weight for m in lins), tuple(m.weight.data_ptr() for m in lins))
        return True

    def _fused(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight [(H + 2 Hkv) Dh, D], bias) when the q/k/v parameters still share fuse_qkv's tensor."""
        f = self.__dict__.get("_qkv")
        if f is None or torch.compiler.is_compiling():  # tracing: no pointer checks (graph breaks)
            return None if f is None else (f[0], f[1])
        lins = (self.wq, self.wk, self.wv)
        if any(m.weight is not p or m.weight.data_ptr() != ptr for m, p, ptr in zip(lins, f[2], f[3], strict=True)):
            return None
        return f[0], f[1]

    def forward(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor, cache=None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """rope: (cos, sin) [B, T, R <= Dh] computed once per forward by the model (else computed here)."""
        b, t, _ = x_BTD.shape
        fused = self._fused()
        cos, sin = tables = rope_tables(self.rope, positions_BT, x_BTD.dtype, rope)
        if fused is not None and self.qk_norm == "none" and self.clip is None and cos.shape[-1] == self.hd:
            # one projection, one rotation over the q and k heads side by side (Mixtral / Llama)
            h, hkv = self.n_heads, self.n_kv
            qkv = F.linear(x_BTD, *fused).view(b, t, h + 2 * hkv, self.hd)
            qk = qkv[:, :, :h + hkv]
            # rotated in place when no gradient is asked for: k and v then stay side by side in qkv,
            # so the KV cache stores both with one write
            in_place = not (torch.is_grad_enabled() and qkv.requires_grad)
            qk = apply_rope_bthd(qk, cos, tables.sin_rot, out=qk if in_place else None)
            q, k, v = qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + hkv:]
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            q, k, v = self._project(x_BTD, fused, tables)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(self.layer, k, v)
        o = sdpa(q, k, v, mask)
        return self.wo(o.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))

    def _project(self, x_BTD: torch.Tensor, fused, tables: RopeTables
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, Dh], k and v [B, Hkv, T, Dh], rotated, with qk-norm / clip / partial rotary."""
        b, t, _ = x_BTD.shape
        if fused is not None:
            q, k, v = F.linear(x_BTD, *fused).split([self.n_heads * self.hd, self.n_kv * self.hd,
                                                     self.n_kv * self.hd], dim=-1)
        else:
            q, k, v = self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        if self.qk_norm == "full":  # OLMoE: normalise over all heads, then clip (transformers' order)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q = q.reshape(b, t, self.n_heads, self.hd)
        k = k.reshape(b, t, self.n_kv, self.hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = tables
        if cos.shape[-1] == self.hd:
            q, k = apply_rope_bthd(q, cos, tables.sin_rot), apply_rope_bthd(k, cos, tables.sin_rot)
            return q.transpose(1, 2), k.transpose(1, 2), v.reshape(b, t, self.n_kv, self.hd).transpose(1, 2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.reshape(b, t, self.n_kv, self.hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def build_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    """The attention module the config asks for."""
    if cfg.attention == "mla":
        from moesaic.model.mla import MLAttention

        return MLAttention(cfg, layer)
    return Attention(cfg, layer)
