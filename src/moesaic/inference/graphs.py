"""CUDA graphs for the engine's T = 1 decode step: one graph per (batch bucket, key bucket, top_k, packed).

Shape legend: B rows of one decode forward (a bucket: 1, 2, 4, 8, ..., max_batch), n real rows (n <= B),
S key positions attended (a bucket: 128, 256, ... up to the slot length M), V vocabulary.

Why: at decode the GPU needs ~2 ms per step for a Mixtral-shaped model, while launching the step's
few hundred kernels from Python costs more than that on the host. A CUDA graph replays them all
with one launch. Capture needs fixed shapes, fixed addresses and no host syncs, so the step runs
over static buffers instead of the engine's per-step `SlotView`:
  inputs [3, B] int64: token id, slot, valid (1 for a real row, 0 for padding) of each row;
  positions come from the cache's lengths on the device; attention reads keys [0, S) of each row's
  slot through a mask (key <= own position), S a bucket above the longest row (a plain slice when the
  rows are slots 0..B-1, as the scheduler keeps them packed; else a gather: a graph of its own);
  padding rows route to no expert (token_mask), do not advance any length, and write their keys at
  position M - 1 of slots no real row uses: a position no running request has committed (a request
  finishes when its slot is full), so it is overwritten before anything reads it.
The MoE layers must be on a capturable backend (triton: its grids are sized from T*K upper bounds,
and dropped pairs exit early); `sorted` / `reference` read counts on the host, so the engine decodes
eagerly then (`unsupported_reason`). With `capture=False` the same static-shape forward runs
eagerly: the CPU tests check it against the engine's eager decode. Opt-in (MOESAIC_DECODE_COMPILE=1 or
compile=True): each bucket's forward goes through torch.compile before capture, fusing the small ops
between the matmuls (the Triton experts forward stays one opaque custom op).
"""

from __future__ import annotations

import os
import sys

import torch

from moesaic.inference.cache import SlotCache, write_kv
from moesaic.model.cache import additive_mask

MIN_KEYS = 128


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def keys_bucket(needed: int, max_len: int) -> int:
    """The smallest power of two >= max(needed, MIN_KEYS), capped at the slot length."""
    s = MIN_KEYS
    while s < needed:
        s *= 2
    return min(s, max_len)


def unsupported_reason(model, cache: SlotCache) -> str | None:
    """Why the decode step cannot be captured in a CUDA graph (None: it can)."""
    from moesaic import kernels

    if not cache.k.is_cuda:
        return "the model is not on a CUDA device"
    for m in model.moe_layers():
        if getattr(m.router, "capacity_factor", None) is not None:
            return "capacity-factor routing counts dropped tokens on the host"
        w13 = m.experts.w13
        probe = torch.empty(1, w13.shape[-1], dtype=model.embed.weight.dtype, device=cache.k.device)
        try:
            name = kernels.get_backend(m.backend, probe, w13).name
        except ValueError as exc:
            return str(exc)
        if name != "triton":
            return f"MoE backend {name!r} has data-dependent shapes (only 'triton' is capturable)"
    return None


class StaticDecodeView:
    """The model's KV-cache protocol for one padded T = 1 forward over static buffers (see module doc)."""

    def __init__(self, cache: SlotCache, batch: int, keys: int, packed: bool = False) -> None:
        dev = cache.lengths.device
        self.cache, self.batch, self.keys, self.packed = cache, batch, keys, packed
        self.inputs = torch.zeros(3, batch, dtype=torch.long, device=dev)  # ids, slots, valid
        self._key_pos = torch.arange(keys, device=dev)
        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _info(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions [B, 1], flat write rows [B] of the [N*M] view, mask [B, 1, 1, S]), once per forward."""
        if self._step is None:
            slots, valid = self.inputs[1], self.inputs[2] > 0
            m = self.cache.max_len
            pos = torch.where(valid, self.cache.lengths.index_select(0, slots), m - 1)[:, None]
            mask = additive_mask((self._key_pos[None, None, :] <= pos[:, :, None])[:, None], self.cache.k.dtype)
            self._step = (pos, slots * m + pos[:, 0], mask)
        return self._step

    def positions(self, t: int) -> torch.Tensor:
        if t != 1:
            raise ValueError(f"StaticDecodeView serves one new token per row, got T={t}")
        return self._info()[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k/v [B, H, 1, D] at each row's position; return keys/values [B, H, S, D] and the mask."""
        _, flat, mask = self._info()
        slots, b = self.inputs[1], k.shape[0]
        write_kv(self.cache, layer, flat, k, v)
        out = []
        for buf in (self.cache.k[layer], self.cache.v[layer]):  # buf [N, M, H, D]
            rows = buf[:b, :self.keys] if self.packed else buf[:, :self.keys].index_select(0, slots)
            out.append(rows.transpose(1, 2))
        return out[0], out[1], mask

    def advance(self, t: int) -> None:
        self.cache.lengths.index_add_(0, self.inputs[1], self.inputs[2])
        self._step = None


class _Entry:
    def __init__(self, view: StaticDecodeView, run, host: torch.Tensor) -> None:
        self.view, self.run, self.host = view, run, host
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    """Runs the engine's decode forwards from captured CUDA graphs (or, capture=False, the same
    static-shape forward eagerly). `decode(...)` -> logits [n, V] (a view of a static buffer:
    valid until the next call)."""

    def __init__(self, model, cache: SlotCache, *, capture: bool = True, compile: bool | None = None) -> None:
        self.model, self.cache, self.capture = model, cache, capture
        # opt-in: torch.compile the step first (fuses the small ops between the matmuls); MoE stays opaque
        self.compile = os.environ.get("MOESAIC_DECODE_COMPILE", "0") == "1" if compile is None else compile
        self.buckets = batch_buckets(cache.n_slots)
        self._entries: dict[tuple[int, int, int | None, bool], _Entry] = {}  # (B, S, top_k, packed)
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.stats = dict(captures=0, replays=0)
        self.failed: str | None = None  # set when a capture failed: the engine then decodes eagerly

    def decode(self, tokens: list[int], slots: list[int], positions: list[int], top_k: int | None
               ) -> torch.Tensor | None:
        """tokens/slots/positions: per real row, its last token, its slot and that token's position.
        None when capturing failed (the caller decodes eagerly; the reason was printed once)."""
        if self.failed is not None:
            return None
        n = len(tokens)
        if not 1 <= n <= self.buckets[-1] or len(slots) != n or len(positions) != n:
            raise ValueError(f"DecodeGraphs.decode: need 1..{self.buckets[-1]} rows with one slot and "
                             f"position each, got {n}, {len(slots)}, {len(positions)}")
        b = next(x for x in self.buckets if x >= n)
        s = keys_bucket(max(positions) + 1, self.cache.max_len)
        used = set(slots)
        spare = [i for i in range(self.cache.n_slots) if i not in used][:b - n]
        packed = slots + spare == list(range(b))  # the scheduler keeps slots packed: keys are a plain slice
        key = (b, s, top_k, packed)
        e = self._entries.get(key) or self._build(key)
        if e is None:
            return None
        pad = [0] * (b - n)
        e.host.view(-1).numpy()[:] = tokens + pad + slots + spare + [1] * n + pad  # ids | slots | valid
        e.view.inputs.copy_(e.host, non_blocking=True)
        if e.graph is not None:
            e.graph.replay()
            self.stats["replays"] += 1
            return e.logits[:n]
        return e.run()[:n]

    def captured(self, batch: int, keys: int, top_k: int | None = None, packed: bool = True
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """(graph, its static inputs [3, B]: ids, slots, valid) of a bucket captured so far, for
        benchmarks that time replays; None if that bucket was not captured."""
        e = self._entries.get((batch, keys, top_k, packed))
        return None if e is None or e.graph is None else (e.graph, e.view.inputs)

    def _build(self, key: tuple[int, int, int | None, bool]) -> _Entry | None:
        b, s, top_k, packed = key
        view = StaticDecodeView(self.cache, b, s, packed)
        model = self.model

        def run() -> torch.Tensor:
            out = model.forward_aux(view.inputs[0][:, None], cache=view, token_mask=view.inputs[2][:, None] > 0,
                                    top_k=top_k, last_only=True)
            return out.logits[:, -1]

        pin = self.capture and torch.cuda.is_available()
        e = _Entry(view, run, torch.zeros(3, b, dtype=torch.long, pin_memory=pin))
        if self.compile:
            self._compile(e)
        if self.capture:
            try:
                self._capture(e)
            except Exception as ex:  # any capture error: fall back to eager decoding, say why once
                self.failed = f"{type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"
                print(f"moesaic: CUDA graph capture failed, decoding eagerly: {self.failed}", file=sys.stderr)
                return None
        self._entries[key] = e
        return e

    @staticmethod
    def _padding_inputs(e: _Entry) -> None:
        """All rows padding: they write only at position M - 1 of slots 0..B-1 and advance nothing, so
        warm-up runs leave the cache's contents unharmed."""
        e.view.inputs.zero_()
        e.view.inputs[1] = torch.arange(e.view.batch, device=e.view.inputs.device)

    def _compile(self, e: _Entry) -> None:
        """torch.compile the entry's forward (first call on padding rows); on failure keep it eager, say why."""
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # one compile per bucket, same code object
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        compiled = torch.compile(e.run, dynamic=False)
        try:
            self._padding_inputs(e)
            compiled()
            e.run = compiled
        except Exception as ex:  # the uncompiled step still runs (and is captured)
            self.compile = False
            print(f"moesaic: torch.compile of the decode step failed, not compiling: {type(ex).__name__}: "
                  f"{str(ex).splitlines()[0] if str(ex) else ''}", file=sys.stderr)

    def _capture(self, e: _Entry) -> None:
        """Warm up (compiles / tunes kernels) then capture, all on padding rows (`_padding_inputs`)."""
        self._padding_inputs(e)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                e.run()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            e.logits = e.run()
        e.graph = g
        self.stats["captures"] += 1


def make_decode_graphs(model, cache: SlotCache, option: bool | None) -> DecodeGraphs | None:
    """The engine's hook: DecodeGraphs when `option` is True, or None and the step is capturable;
    otherwise None, with a one-line reason on stderr when graphs were asked for or the model is on CUDA."""
    if option is False:
        return None
    reason = unsupported_reason(model, cache)
    if reason is None:
        return DecodeGraphs(model, cache)
    if option is True or cache.k.is_cuda:
        print(f"moesaic: CUDA graphs off, decoding eagerly: {reason}", file=sys.stderr)
    return None
