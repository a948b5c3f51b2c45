"""KV cache protocol and a simple static (preallocated) cache.

Shape legend: B batch rows, H kv heads, T new positions, S cached positions, Dk/Dv head dims.

Protocol (what attention relies on):
  cache.positions(T) -> [B, T] absolute positions of the T new tokens of each row
  cache.update(layer, k_BHTDk, v_BHTDv) -> (k_BHSDk, v_BHSDv, mask_B1TS) where mask is
      True where a query may attend (causal and within the row's length), or the same as an
      additive float mask in the attention's dtype (0 there, -inf elsewhere: `additive_mask`)
  cache.advance(T) after the whole forward, to commit the new positions
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVCache(Protocol):
    def positions(self, t: int) -> torch.Tensor: ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def advance(self, t: int) -> None: ...


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask as SDPA's float form (0 where allowed, -inf elsewhere) in `dtype`: made once
    per forward, it spares every layer's SDPA the same conversion (3 kernels per layer on the GPU)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def kv_cache_dims(config) -> tuple[int, int, int]:
    """(cached heads, key dim, value dim) per position for a ModelConfig (GQA kv heads, or MLA's expanded heads)."""
    if config.attention == "mla":
        return config.n_heads, config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    return config.n_kv_heads, config.head_dim, config.head_dim


class StaticCache:
    """Preallocated [L, B, H, max_len, Dk/Dv] buffers; row b holds `lengths[b]` committed positions."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, k_dim: int, v_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.k = torch.zeros(n_layers, batch, n_kv_heads, max_len, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(n_layers, batch, n_kv_heads, max_len, v_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, config, batch: int, max_len: int | None = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> StaticCache:
        """A cache sized for a ModelConfig (GQA or MLA head dims)."""
        h, kd, vd = kv_cache_dims(config)
        return cls(config.n_layers, batch, h, max_len or config.max_seq_len, kd, vd, dtype, device)

    def positions(self, t: int) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(t, device=self.lengths.device)[None, :]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, t, _ = k.shape
        end = int(self.lengths.max()) + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, cache holds {self.max_len}")
        pos_BT = self.positions(t)
        rows = torch.arange(b, device=k.device)[:, None].expand(b, t)
        self.k[layer][rows, :, pos_BT] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer][rows, :, pos_BT] = v.transpose(1, 2).to(self.v.dtype)
        key_pos = torch.arange(end, device=k.device)
        mask = key_pos[None, None, :] <= pos_BT[:, :, None]  # [B, T, S]: causal within the row
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask[:, None]

    def advance(self, t: int) -> None:
        self.lengths += t
