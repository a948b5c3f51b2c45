"""The engine's batch-1 CPU decode step as one C program: every kernel call of the step recorded once, then run
back to back by one ctypes call (`kernels.cpu_program`), with no Python module between them.

Why: the module-by-module batch-1 step of the fine-grained benchmark model makes ~20 C kernel calls a layer, each
reached through nn.Module calls, kernel-selection checks, tensor allocations and ctypes argument conversion: ~1.2
ms of Python a step (py-spy, session 5), a quarter of a W8A8 step. Here `FastStep.decode(token, slot, k)` writes
the token, slot and position into a small buffer, runs the program, and returns the logits.

What it records per layer, each the kernel (and arguments) that the switched modules of `prepare_cpu_weights` call
for one row: RMS norm (`cpu_norm`) -> q/k/v GEMVs (`cpu_gemv`, or int8 `cpu_q8` / `cpu_gemv`; + biases) -> per-head
q/k norms -> rotary + KV write + attention (`cpu_attention`) -> o GEMV -> residual add -> RMS norm -> router
(`cpu_router`) -> the K experts (`cpu_experts` / `cpu_q8`, split over the C worker) and their weighted sum ->
residual add; then the final norm, the LM head and the cache length's advance. Hence the same bits as that path
(tested). What has no C kernel runs in Python at its place in the step (an op stops the program, its handler runs
the model's module on the program's buffers, the program resumes): a router's give-up at a near-tie (torch's router
chooses), a group-limited router, a dense FFN layer, shared experts.

It applies (`why_not` says why not) to a CPU fp32 / bf16 model after `prepare_cpu_weights` with onednn whose
attention is `CpuDecodeAttention` with full rotary and qk-norm none / per head and no clipping, whose linears take
the C GEMVs (`OneDNNLinear` of >= 64 Ki weights) or are `Int8Linear`s (W8A8 or weight-only) on fp32 activations,
whose MoE layers have a router without capacity (no dropped tokens) and float experts on the `onednn` backend or
int8 experts, and to a slot cache of separate k / v buffers in the activations' dtype. Otherwise (and for batches
> 1, CUDA, while a module has forward hooks, or with MOESAIC_FAST_STEP=0) the engine runs the model's forward. The
recorded pointers are a snapshot of the weights when the engine starts (the program keeps them alive): change
weights in place only, or build a new engine.
"""

from __future__ import annotations

import ctypes
import os
import time

import torch
from torch.nn.modules import module as _module

from moesaic.inference import split_tuner
from moesaic.inference.cpu_attention import CpuDecodeAttention
from moesaic.inference.cpu_norms import CpuRMSNorm
from moesaic.inference.cpu_router import _CRouting
from moesaic.kernels import (
    cpu_attention,
    cpu_experts,
    cpu_gemv,
    cpu_norm,
    cpu_pool,
    cpu_program,
    cpu_q8,
    cpu_router,
)
from moesaic.kernels.onednn import _ONEDNN_MIN_WEIGHT
from moesaic.kernels.quant import Int8Linear, Int8Weight, OneDNNLinear

ENABLED = os.environ.get("MOESAIC_FAST_STEP", "1") != "0"  # 0: the module-by-module step (A/B runs)
_DTYPES = (torch.float32, torch.bfloat16)
# One-row linears of at least this many weight bytes split over the C worker. The module path splits only the LM
# head (`cpu_pool.SPLIT_MIN_BYTES`, 8 MiB): with Python between the calls the 1-4 MB attention weights lost. In a
# program the worker spins between the calls, and splitting them all measured 0.99-1.15x a step (fine-64x8 fp32 /
# bf16 / W8A8, coarse-8x2 1.02-1.07x; same-process A/B, benchmarks/README.md).
SPLIT_MIN_BYTES = 1 << 16


def _linear_why_not(mod, dt: torch.dtype) -> str | None:
    w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
    if type(mod) is Int8Linear:
        ok = dt == torch.float32 and w.stride(1) == 1 and (b is None or b.dtype == torch.float32)
        return None if ok else "an int8 linear on bf16 activations (or a bias of another dtype)"
    if (type(mod) is not OneDNNLinear or w.dtype != dt or w.stride(1) != 1 or w.numel() < _ONEDNN_MIN_WEIGHT
            or (b is not None and (b.dtype != dt or not b.is_contiguous()))):
        return "a linear that the C GEMV does not take (dtype, size or layout)"
    return None


def _norm_why_not(mod, dt: torch.dtype) -> str | None:
    if type(mod) is not CpuRMSNorm or mod.weight.dtype != dt or not mod.weight.is_contiguous():
        return "a norm that is not the C RMS norm"
    return None


def _moe_why_not(ffn, dt: torch.dtype) -> str | None:
    r = ffn.router
    if r.capacity_factor is not None or r.training:
        return "a router with capacity (it may drop tokens) or in training mode"
    w13, w2 = ffn.experts.w13, ffn.experts.w2
    if isinstance(w13, Int8Weight):
        if ffn.backend not in ("int8", "auto"):
            return "int8 experts on a backend other than int8"
    elif ffn.backend != "onednn" or w13.dtype != dt or w2.dtype != dt:
        return "float experts not on the onednn backend"
    if not all(w.dim() == 3 and w.stride(2) == 1 and w.device.type == "cpu" for w in (getattr(w13, "q", w13),
                                                                                      getattr(w2, "q", w2))):
        return "expert weights with strided rows"
    return None


def _block_why_not(blk, dt: torch.dtype) -> str | None:
    attn = blk.attn
    if type(attn) is not CpuDecodeAttention or attn.clip is not None or attn.qk_norm not in ("none", "head") \
            or attn.hd % 2 or attn.rope.inv_freq.shape[0] * 2 != attn.hd:
        return "attention other than full-rotary GQA without clipping"
    mods = [attn.wq, attn.wk, attn.wv, attn.wo]
    reasons = [_linear_why_not(m, dt) for m in mods] + [_norm_why_not(n, dt) for n in (blk.attn_norm, blk.ffn_norm)]
    if attn.qk_norm == "head":
        reasons += [_norm_why_not(n, dt) for n in (attn.q_norm, attn.k_norm)]
    if blk.is_moe:
        reasons.append(_moe_why_not(blk.ffn, dt))
    return next((r for r in reasons if r), None)


def why_not(model, cache) -> str | None:
    """None when `FastStep` can run this model and cache, else the first reason it cannot."""
    dt = model.embed.weight.dtype
    if model.embed.weight.device.type != "cpu" or dt not in _DTYPES:
        return "not an fp32 / bf16 CPU model"
    if model.training:
        return "model in training mode"
    if not all(k.available() for k in (cpu_program, cpu_gemv, cpu_norm, cpu_attention, cpu_router, cpu_experts)):
        return "the C kernels cannot be built here"
    if cache.kv is not None or cache.k.dtype != dt or cache.v.dtype != dt or cache.k.shape[-1] != cache.v.shape[-1]:
        return "a KV cache layout the C attention does not take"
    for blk in model.blocks:
        why = _block_why_not(blk, dt)
        if why:
            return f"layer {blk.layer}: {why}"
        if cache.k.shape[-1] != blk.attn.hd:
            return "KV head dim differs from the attention's"
    return _linear_why_not(model.lm_head, dt) or _norm_why_not(model.norm, dt)


class FastStep:
    """One program per (experts per token, two-thread split) for a model and slot cache; see the module docstring.
    Where the kernels may split over the C worker, `split_tuner` picks the two-thread or the one-thread program each
    step (the same bits either way)."""

    def __init__(self, model, cache, split_min_bytes: int | None = None) -> None:
        """split_min_bytes: one-row linears with at least this many weight bytes (int8: elements) split their rows
        over the C worker (None: `SPLIT_MIN_BYTES`)."""
        self.model, self.cache = model, cache
        self.split_min_bytes = SPLIT_MIN_BYTES if split_min_bytes is None else split_min_bytes
        self.dt = model.embed.weight.dtype
        self.state = (ctypes.c_int64 * 3)()  # slot, position, token: what the program reads each step
        n = cache.lengths.numel()
        self._lengths = (ctypes.c_int64 * n).from_address(cache.lengths.data_ptr())
        self._plans: dict[tuple[int, bool], _Plan] = {}
        self._rope = _RopeTable(model.blocks[0].attn.rope, self.dt)
        self.router_fallbacks = 0  # router calls the torch router decided (near-ties)
        self.tuner = split_tuner.SplitTuner()  # two-thread or one-thread program, by their recent run times
        self.adapt = split_tuner.ENABLED  # False: the two-thread program whenever the kernels may split
        # forward (pre-)hooks on any module would not run inside the program: then the model's forward runs
        self._hooks = [h for mod in model.modules() for h in (mod._forward_hooks, mod._forward_pre_hooks)]

    @classmethod
    def build(cls, model, cache) -> FastStep | None:
        """A FastStep when it applies (`why_not` is None) and MOESAIC_FAST_STEP is not 0, else None."""
        if not ENABLED or why_not(model, cache) is not None:
            return None
        return cls(model, cache)

    def decode(self, token: int, slot: int, k: int | None = None) -> torch.Tensor | None:
        """Logits [1, V] (the model's dtype) of the next token after `token` for the request in KV `slot`, with k
        routed experts per MoE layer (None: the trained top-k); writes the token's keys / values and advances the
        slot's length, as the model's forward with the engine's cache view does. None (nothing done) while forward
        hooks are registered on a module (or globally): the caller's usual path runs them."""
        if any(self._hooks) or _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return None
        pos = self._lengths[slot]
        if pos >= self.cache.max_len:
            raise ValueError(f"KV cache overflow: {pos + 1} positions needed, a slot holds {self.cache.max_len}")
        if pos >= self._rope.filled:
            self._rope.grow(pos + 1, self.cache.max_len)
            self._plans.clear()  # the tables moved: the programs point into them
        can_split = cpu_pool.split_one_row()
        split = can_split and (self.tuner.choose() if self.adapt else True)
        plan = self._plans.get((k, split))
        if plan is None:
            plan = self._plans[(k, split)] = _Plan(self, k, split)
        st = self.state
        st[0], st[1], st[2] = slot, pos, token
        prog = plan.program
        t0 = time.perf_counter()
        at, rc = prog.run(0)
        while at >= 0:
            plan.handle(at, rc)
            at, rc = prog.run(prog.next_op(at))
        if can_split:
            self.tuner.record(split, time.perf_counter() - t0)
        return plan.logits.clone()


class _RopeTable:
    """cos / sin_rot rows [positions, Dh] in the activations' dtype, computed by the model's rotary module over
    blocks of positions (the same values as one position at a time: elementwise ops; tested)."""

    def __init__(self, rope, dt: torch.dtype) -> None:
        self.rope, self.dt, self.filled = rope, dt, 0
        self.cos = self.sin_rot = None

    def grow(self, need: int, cap: int) -> None:
        """Cover positions < need (at least doubling, at most cap): new tables."""
        n = min(cap, max(need, 2 * self.filled, 256))
        t = self.rope(torch.arange(n)[:, None], self.dt)
        self.cos, self.sin_rot = t[0][:, 0].contiguous(), t.sin_rot[:, 0].contiguous()
        self.filled = n


class _Plan:
    """The recorded program of one step for k experts per token, its buffers, and the Python handlers of the ops that
    stop it (a router's near-tie; the modules run in Python: a dense FFN, shared experts, a router the C router does
    not take)."""

    def __init__(self, fs: FastStep, k: int | None, split: bool) -> None:
        m, cache = fs.model, fs.cache
        self.fs, self.k, self.split = fs, k, split
        p = self.program = cpu_program.Program()
        d = m.config.d_model
        st = ctypes.addressof(fs.state)
        self.slot, pos, tok = st, st + 8, st + 16
        self.x, self.hn = self.buf(d), self.buf(d)
        hd = m.blocks[0].attn.hd
        self.cos, self.sinr = self.buf(hd), self.buf(hd)
        p.keep += [fs.state, m.embed.weight, fs._rope.cos, fs._rope.sin_rot, cache.lengths]
        p.op("row", [m.embed.weight.data_ptr(), tok, d * self.x.element_size(), self.x.data_ptr()])
        for src, dst in ((fs._rope.cos, self.cos), (fs._rope.sin_rot, self.sinr)):
            p.op("row", [src.data_ptr(), pos, hd * src.element_size(), dst.data_ptr()])
        self._handlers: dict[int, object] = {}
        for blk in m.blocks:
            self._attention(blk)
            p.norm(self.x, blk.ffn_norm.weight, self.hn, 1, blk.ffn_norm.eps)
            if blk.is_moe:
                self._moe(blk.ffn)
            else:  # a dense FFN: the module in Python (x += ffn(norm(x)), as Block.forward)
                self._python(lambda f=blk.ffn: self.x.add_(f(self.hn)))
        p.norm(self.x, m.norm.weight, self.hn, 1, m.norm.eps)
        self.logits = _linear(p, m.lm_head, self.hn, split, fs.split_min_bytes)
        p.op("advance", [cache.lengths.data_ptr(), self.slot])

    def buf(self, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.empty((1, n), dtype=self.fs.dt if dtype is None else dtype)

    def _add(self, y: torch.Tensor) -> None:
        """x += y (x's dtype; y of x's dtype, or fp32 cast to bf16 first)."""
        name = "add_f32" if self.fs.dt == torch.float32 else "add_bf16" if y.dtype == self.fs.dt else "add_bf16_f32"
        self.program.op(name, [self.x.data_ptr(), y.data_ptr(), y.shape[1]])

    def _python(self, fn) -> None:
        """Stop the program here for fn() (it reads and writes the buffers), then go on."""
        self._handlers[self.program.op("yield", [1], returns_int=True)] = lambda rc: fn()

    def _attention(self, blk) -> None:
        p, a, fs = self.program, blk.attn, self.fs
        h, hkv, hd = a.n_heads, a.n_kv, a.hd
        p.norm(self.x, blk.attn_norm.weight, self.hn, 1, blk.attn_norm.eps)
        q, kk, v = (_linear(p, lin, self.hn, self.split, fs.split_min_bytes) for lin in (a.wq, a.wk, a.wv))
        if a.qk_norm == "head":
            qn, kn = self.buf(h * hd), self.buf(hkv * hd)
            p.norm(q, a.q_norm.weight, qn, h, a.q_norm.eps)
            p.norm(kk, a.k_norm.weight, kn, hkv, a.k_norm.eps)
            q, kk = qn, kn
        ao = self.buf(h * hd)
        p.attention(q, kk, v, self.cos, self.sinr, fs.cache.k[blk.layer], fs.cache.v[blk.layer], self.slot,
                    self.slot + 8, h, ao)
        self._add(_linear(p, a.wo, ao, self.split, fs.split_min_bytes))

    def _moe(self, ffn) -> None:
        p, hn, r = self.program, self.hn, ffn.router
        kr = r.top_k if self.k is None else int(self.k)
        ids, rw = self.buf(kr, torch.int64), self.buf(kr)
        # the C router where `_CRouting.forward` would try it (one contiguous row, its dtypes)
        c_kind = (r._c_kind() if isinstance(r, _CRouting) and r.weight.dtype in cpu_router.DTYPES
                  and r.weight.is_contiguous() and r.weight.shape[1] == hn.shape[1] else None)

        def torch_route(rc: int, c_tried: bool) -> None:  # the model's torch router chooses
            out = (super(_CRouting, r) if c_tried else r).forward(hn, None, kr)
            ids.copy_(out.expert_ids_TK)
            rw.copy_(out.weights_TK)
            self.fs.router_fallbacks += c_tried

        if c_kind is not None and kr <= cpu_router.MAX_K:
            at = p.route(hn, r.weight, kr, c_kind[0], c_kind[1], r.normalize, float(r.scale),
                         self.buf(r.num_experts, torch.float32), ids, rw)
            self._handlers[at] = lambda rc: (_no_memory(at, rc) if rc != 1 else torch_route(rc, True))
        else:  # a router the C router does not take (group limits): torch's, in Python
            self._python(lambda: torch_route(0, False))
        y = self.buf(hn.shape[1], torch.float32)
        p.experts_one_token(hn, ids, rw, ffn.experts.w13, ffn.experts.w2, self.split, y)
        if ffn.shared is None:
            self._add(y)
        else:  # MoELayer: y = experts (cast to x's dtype) + shared(x), then the residual add
            self._python(lambda: self.x.add_(y.to(self.fs.dt) + ffn.shared(hn)))

    def handle(self, at: int, rc: int) -> None:
        """The op at `at` returned rc: run its Python handler (or fail: a kernel without memory)."""
        fn = self._handlers.get(at)
        if fn is None:
            _no_memory(at, rc)
        fn(rc)


def _no_memory(at: int, rc: int) -> None:
    raise MemoryError(f"fast decode step: a C kernel could not allocate its scratch (op {at}, rc {rc})")


def _linear(p: cpu_program.Program, mod, x: torch.Tensor, split: bool, min_bytes: int) -> torch.Tensor:
    """Record mod(x) for one row, split over two threads (when split) for weights of at least min_bytes (int8: that
    many elements, as `quant.int8_linear` counts); returns the output buffer [1, O]."""
    if type(mod) is Int8Linear:  # quant.int8_linear: W8A8 where cpu_q8 runs, else weight-only
        y = torch.empty((1, mod.out_features), dtype=torch.float32)
        big = split and mod.weight.numel() >= min_bytes
        if mod.act_block is not None and cpu_q8.available():
            p.linear_q8(x, mod.weight, mod.scale, y, mod.act_block, big)
        else:
            p.gemv_int8(x, mod.weight, mod.scale, y, big)
    else:
        w = mod.weight
        y = torch.empty((1, w.shape[0]), dtype=x.dtype)
        p.gemv(x, w, y, split and w.shape[0] * w.stride(0) * w.element_size() >= min_bytes)
    if mod.bias is not None:  # y + bias (Int8Linear: fp32 + fp32) / cpu_linear's y.add_(bias)
        p.keep.append(mod.bias)
        p.op("add_f32" if y.dtype == torch.float32 else "add_bf16", [y.data_ptr(), mod.bias.data_ptr(), y.shape[1]])
    return y

