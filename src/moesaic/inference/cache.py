"""The engine's KV cache: slots preallocated once, and per-forward views over some of the slots.

Shape legend: L layers, N slots, H kv heads, M max positions per slot, Dk/Dv head dims,
B rows of one forward, T new tokens per row, S key positions the forward attends over.

Layout [L, N, M, H, D] (position before head) so one decode step writes each row's new keys with a
single `index_copy_` on a flat [N*M, H, D] view; attention reads a transposed view. On CUDA, when keys
and values have one head dim, both live in one [L, N, M, 2H, D] buffer (k: its first H heads, v: the
rest), so keys and values that sit side by side in memory (the fused q/k/v projection's output) go in
with one write.

One slot holds one running request. The buffers are allocated once when the engine starts
(no per-token reallocation); a request gets a free slot when it joins the batch and gives it
back when it finishes. The engine keeps running requests packed in slots 0..n-1 (it moves the
last request into a freed slot), so the usual decode view is a plain slice with no gather.

A `SlotView` implements the model's KV cache protocol (model/cache.py) for the rows of one
forward: positions(T), update(layer, k, v), advance(T).
"""

from __future__ import annotations

import torch

from moesaic.model.cache import additive_mask, kv_cache_dims


class SlotCache:
    """k [L, N, M, H, Dk] and v [L, N, M, H, Dv] buffers plus lengths [N] (committed positions per slot)."""

    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_len: int, k_dim: int, v_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 kv_together: bool | None = None) -> None:
        """kv_together: keep k and v in one [L, N, M, 2H, D] buffer (needs k_dim == v_dim); None: on CUDA
        only, where the engine fuses q/k/v so one write stores both (on CPU the interleaved keys made
        SDPA ~5-10% slower at long contexts, and the CPU engine projects q/k/v apart)."""
        for name, v in (("n_slots", n_slots), ("max_len", max_len)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SlotCache.{name} must be an integer >= 1, got {v!r}")
        if kv_together is None:
            kv_together = torch.device(device).type == "cuda"
        if kv_together and k_dim == v_dim:  # one buffer, k and v heads side by side: one write per layer
            self.kv = torch.zeros(n_layers, n_slots, max_len, 2 * n_kv_heads, k_dim, dtype=dtype, device=device)
            self.k, self.v = self.kv[..., :n_kv_heads, :], self.kv[..., n_kv_heads:, :]
        else:
            self.kv = None
            self.k = torch.zeros(n_layers, n_slots, max_len, n_kv_heads, k_dim, dtype=dtype, device=device)
            self.v = torch.zeros(n_layers, n_slots, max_len, n_kv_heads, v_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.max_len, self.n_slots = max_len, n_slots

    @classmethod
    def for_model(cls, config, n_slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", kv_together: bool | None = None) -> SlotCache:
        h, kd, vd = kv_cache_dims(config)
        return cls(config.n_layers, n_slots, h, max_len, kd, vd, dtype, device, kv_together)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def view(self, slots: list[int], n_new: list[int] | None = None) -> SlotView:
        return SlotView(self, slots, n_new)

    def reset(self, slot: int) -> None:
        """Free a slot: its length goes to 0 (stale keys are never read: masks stop at the length)."""
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Move slot src's committed positions into slot dst (used to keep running slots packed)."""
        n = int(self.lengths[src])
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0


def side_by_side(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """k, v [B, H, T, D] as one [B*T, 2H, D] view when v's heads directly follow k's in memory (the
    attention's fused q/k/v output), else None."""
    b, h, t, d = k.shape
    if (v.shape != k.shape or v.dtype != k.dtype or v.stride() != k.stride() or k.stride(3) != 1
            or k.stride(1) != d or v.data_ptr() != k.data_ptr() + h * d * k.element_size()
            or v.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
            or (b > 1 and k.stride(0) != t * k.stride(2))):
        return None
    return k.as_strided((b * t, 2 * h, d), (k.stride(2), d, 1))


def write_kv(cache: SlotCache, layer: int, flat_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k, v [B, H, T, D] at rows `flat_idx` [B*T] of layer's flat [N*M, H, D] views: one
    `index_copy_` when the cache keeps k and v side by side and so do k and v, else one each."""
    b, h, t, _ = k.shape
    kv = side_by_side(k, v) if cache.kv is not None and k.dtype == cache.kv.dtype else None
    if kv is not None:
        buf = cache.kv[layer]
        buf.view(-1, *buf.shape[2:]).index_copy_(0, flat_idx, kv)
        return
    for buf, new in ((cache.k[layer], k), (cache.v[layer], v)):  # [N, M, H, D]
        flat = buf.view(-1, *buf.shape[2:])
        flat.index_copy_(0, flat_idx, new.transpose(1, 2).reshape(b * t, *buf.shape[2:]).to(buf.dtype))


class SlotView:
    """The KV cache protocol for the rows `slots` of one forward.

    Every row gets T new tokens in the forward; with `n_new`, row b commits only its first n_new[b]
    (right-padded prompts of a batched prefill): the padding's keys land past the row's length, where
    no later query looks (the mask stops at each query's own position) and the next tokens overwrite them.
    """

    def __init__(self, cache: SlotCache, slots: list[int], n_new: list[int] | None = None) -> None:
        if not slots:
            raise ValueError("SlotView needs at least one slot")
        if n_new is not None and len(n_new) != len(slots):
            raise ValueError(f"SlotView n_new has {len(n_new)} entries for {len(slots)} slots")
        self.cache = cache
        self.slots = list(slots)
        self._n_new = None if n_new is None else torch.tensor(n_new, dtype=torch.long, device=cache.lengths.device)
        lo = self.slots[0]
        self._range = (lo, lo + len(slots)) if self.slots == list(range(lo, lo + len(slots))) else None
        self._idx = torch.tensor(self.slots, dtype=torch.long, device=cache.lengths.device)
        self._pos_cache: dict = {}  # per forward: positions / mask by T

    def _rows(self, buf: torch.Tensor) -> torch.Tensor:
        if self._range is not None:
            return buf[self._range[0]:self._range[1]]
        return buf.index_select(0, self._idx)

    def positions(self, t: int) -> torch.Tensor:
        """[B, T] absolute positions of the new tokens of each row."""
        if t not in self._pos_cache:  # the layers all ask for the same positions before advance()
            base = self._rows(self.cache.lengths)
            # one new token (decode): the lengths themselves, copied (advance() changes them in place)
            self._pos_cache[t] = (base[:, None].clone() if t == 1
                                  else base[:, None] + torch.arange(t, device=base.device)[None, :])
        return self._pos_cache[t]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write k/v [B, H, T, D] at each row's next positions; return keys/values [B, H, S, D] and
        mask [B, 1, T, S] (additive, in the cache's dtype: 0 where a query may attend, causal within its
        own row, -inf elsewhere), or None when T = 1 and every row has the same length (nothing to mask)."""
        b, _, t, _ = k.shape
        _, end, mask, flat_idx = self._step_info(t)
        kbuf, vbuf = self.cache.k[layer], self.cache.v[layer]  # [N, M, H, D]
        write_kv(self.cache, layer, flat_idx, k, v)
        if self._range is not None:
            k_all, v_all = kbuf[self._range[0]:self._range[1], :end], vbuf[self._range[0]:self._range[1], :end]
        else:
            k_all, v_all = kbuf[:, :end].index_select(0, self._idx), vbuf[:, :end].index_select(0, self._idx)
        return k_all.transpose(1, 2), v_all.transpose(1, 2), mask

    def decode_layout(self, layer: int, b: int, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For a C decode-attention call (`kernels.cpu_attention`): (k [N, M, H, D], v [N, M, H, D] of `layer`,
        slots [B], new positions [B]) when the forward has one new token for each of its `b` rows and the
        cache keeps keys and values of `dtype` in separate contiguous CPU buffers; None otherwise. Checks
        the positions against the slot size (once per forward)."""
        c = self.cache
        if (c.kv is not None or b != len(self.slots) or self._n_new is not None or c.k.dtype != dtype
                or c.v.dtype != dtype or c.k.device.type != "cpu" or c.k.shape[-1] != c.v.shape[-1]):
            return None
        if "decode" not in self._pos_cache:
            self._step_info(1)  # the overflow check
            self._pos_cache["decode"] = (self._idx, self.positions(1).view(-1))
        slots, pos = self._pos_cache["decode"]
        return c.k[layer], c.v[layer], slots, pos

    def _step_info(self, t: int) -> tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor]:
        """(positions [B, T], key length S, mask [B, 1, T, S] or None, flat write rows [B*T] of the [N*M] view):
        the same for every layer of a forward."""
        key = -t - 1
        if key not in self._pos_cache:
            pos_BT = self.positions(t)
            if pos_BT.shape[0] == 1:  # one row: one read, nothing to compare
                lo = hi = int(pos_BT[0, -1])
            else:
                lo, hi = torch.stack(torch.aminmax(pos_BT[:, -1])).tolist()  # one host sync
            end = hi + 1
            if end > self.cache.max_len:
                raise ValueError(f"KV cache overflow: {end} positions needed, a slot holds {self.cache.max_len}")
            flat = (self._idx[:, None] * self.cache.max_len + pos_BT).reshape(-1)
            if t == 1 and lo == hi:
                mask = None  # one new token per row and equal lengths: every query sees all `end` keys
            else:
                key_pos = torch.arange(end, device=pos_BT.device)
                mask = additive_mask((key_pos[None, None, :] <= pos_BT[:, :, None])[:, None], self.cache.k.dtype)
            self._pos_cache[key] = (pos_BT, end, mask, flat)
        return self._pos_cache[key]

    def advance(self, t: int) -> None:
        if self._n_new is None and self._range is not None:  # packed slots (the usual decode): one in-place add
            self.cache.lengths[self._range[0]:self._range[1]] += t
        else:
            step = torch.full_like(self._idx, t) if self._n_new is None else self._n_new.clamp(max=t)
            self.cache.lengths.index_add_(0, self._idx, step)
        self._pos_cache.clear()
