"""Weight formats for CPU inference: int8 (per-output-channel scales; W8A8 or weight-only), oneDNN float matmuls.

Shape legend: T tokens, D model dim, F expert hidden, G = 2F, E experts, K top-k, N = T*K rows,
M rows of a linear, I its input features, O its output features.

    w[..., o, i] ~= q[..., o, i] * scale[..., o],   q int8 in [-127, 127],  scale = max|w[..., o, :]| / 127

An `Int8Weight` / `Int8Linear` with `act_block` set runs W8A8 where the CPU has VNNI (`cpu_q8`: the activations
are quantized on the fly per block of act_block inputs, int8 x int8 dot products); without it, weight-only.

`Int8Weight` stands in for a stacked expert tensor w13_EGD / w2_EDF in `moe_experts`: it has the
same `.shape`, and `w[e]` dequantizes one expert only, so the `reference` and `sorted` backends
still run on a quantized model (one expert's copy at a time). The `int8` backend never dequantizes:
each expert's rows go through `int8_linear`, which on CPU uses torch's int8-weight matmul
(`torch._weight_int8pack_mm`, bf16 activations: the fast kernel takes bf16) and elsewhere converts
one matrix at a time.

The `onednn` backend is the same expert loop over float weights, through `kernels.onednn` (oneDNN,
its blocked weight copies, and the C GEMV of `cpu_gemv`).
"""

from __future__ import annotations

import torch
from torch import nn

from moesaic.kernels import cpu_experts, cpu_gemv, cpu_pool, cpu_q8
from moesaic.kernels.onednn import (
    _ONEDNN_MIN_WEIGHT,
    cpu_linear,
    gemv_expert_linear,
    one_thread_gemv,
    onednn_available,
    onednn_expert_linear,
    onednn_supports,
)
from moesaic.kernels.reference import swiglu
from moesaic.kernels.sorted import sort_by_expert


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] float -> (q [..., O, I] int8, scale [..., O] in w's dtype); rows of zeros get scale 1."""
    if not w.dtype.is_floating_point:
        raise ValueError(f"quantize_int8 expects a float tensor, got {w.dtype}")
    amax = w.detach().abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w.detach().float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    # contiguous whatever w's strides (e.g. a w2 stored transposed by use_onednn): the fast int8 kernel needs it
    return q.contiguous(), scale.to(w.dtype)


def _fast_int8_ok(x: torch.Tensor, q: torch.Tensor) -> bool:
    # the CPU kernel crashes for input widths that are not a multiple of 16 and rejects empty inputs
    return (x.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm") and x.shape[0] > 0
            and q.shape[-1] % 16 == 0 and q.is_contiguous())


def w8a8_ok(x: torch.Tensor, act_block: int | None) -> bool:
    """Whether a matmul with int8 weights runs W8A8 (`cpu_q8`): the layer asks for int8 activations, the CPU has
    VNNI, x is on the CPU and no gradient is wanted. Else the weight-only kernels run (float activations)."""
    return (act_block is not None and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)
            and cpu_q8.available())


def int8_linear(x_MI: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor,
                act_block: int | None = None) -> torch.Tensor:
    """y = x @ (q * scale[:, None]).T, returned in x's dtype. act_block: quantize x too, per block of that many
    inputs (W8A8, `cpu_q8`) where the CPU can; None: weight-only (x stays float)."""
    if w8a8_ok(x_MI, act_block) and q_OI.stride(-1) == 1:
        # 2 threads for several rows (compute-bound) of a big enough weight, when torch has 2; one row only for the
        # LM-head-sized weights and through the C worker (`cpu_pool.split_one_row`): for the ~1 MB attention weights
        # the split cost more than it saved (0.9x on those calls, in-engine A/B, fine-64x8)
        if x_MI.shape[0] > 1:
            threads = 2 if q_OI.numel() >= 1 << 20 and torch.get_num_threads() > 1 else 1
        else:
            threads = 2 if q_OI.numel() >= cpu_pool.SPLIT_MIN_BYTES and cpu_pool.split_one_row() else 1
        return cpu_q8.linear(x_MI, q_OI, scale_O, act_block, threads)
    if (x_MI.shape[0] == 1 and x_MI.device.type == "cpu" and q_OI.stride(-1) == 1
            and not torch.is_grad_enabled() and cpu_gemv.available()):
        return cpu_gemv.gemv_int8(x_MI, q_OI, scale_O)  # one row: the C kernel reads int8 rows ~1.3x faster
    if _fast_int8_ok(x_MI, q_OI):
        y = torch._weight_int8pack_mm(x_MI.to(torch.bfloat16).contiguous(), q_OI, scale_O.to(torch.bfloat16))
        return y.to(x_MI.dtype)
    return (x_MI @ q_OI.to(x_MI.dtype).t()) * scale_O.to(x_MI.dtype)


class Int8Weight:
    """A stacked int8 weight q [E, O, I] with scales [E, O], shaped like the float tensor it replaces."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, act_block: int | None = None) -> None:
        if q.dtype != torch.int8 or scale.shape != q.shape[:-1]:
            raise ValueError(f"Int8Weight needs int8 q [..., O, I] and scale [..., O]; got {q.dtype} "
                             f"{tuple(q.shape)} and {tuple(scale.shape)}")
        self.q, self.scale = q, scale
        # W8A8: the kernels quantize the activations per block of act_block inputs (None: weight-only)
        self.act_block = None if act_block is None else cpu_q8.check_block(act_block)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    def dim(self) -> int:
        return self.q.dim()

    def __getitem__(self, e: int) -> torch.Tensor:
        """Expert e dequantized ([O, I] in the scale dtype): one expert's copy, for the float backends."""
        return self.q[e].to(self.scale.dtype) * self.scale[e][:, None]

    def unbind(self, dim: int = 0) -> _LazyExperts:
        """Per-expert access like `tensor.unbind(0)`, dequantizing an expert only when it is indexed."""
        if dim != 0:
            raise ValueError(f"Int8Weight.unbind supports dim=0 (experts) only, got {dim}")
        return _LazyExperts(self)

    def dequantize(self) -> torch.Tensor:
        """The whole float tensor (tests and export only)."""
        return self.q.to(self.scale.dtype) * self.scale[..., None]


class _LazyExperts:
    def __init__(self, w: Int8Weight) -> None:
        self._w = w

    def __len__(self) -> int:
        return self._w.shape[0]

    def __getitem__(self, e: int) -> torch.Tensor:
        return self._w[e]


def moe_experts_weight_only(hidden_TD: torch.Tensor, w13_EGD: Int8Weight, w2_EDF: Int8Weight,
                     expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """`moe_experts` for inference on CPU: sort by expert, one matmul pair per non-empty expert, scatter-add.

    Int8Weight experts use int8 matmuls (`int8` backend); float experts use `cpu_linear` (`onednn`
    backend). Weights are never quantized on the fly: quantize the model once (inference.quantize); W8A8 weights
    (act_block set) quantize the activations on the fly (`cpu_q8`).
    The matmul is chosen once per call (not per expert): this runs a few hundred times per decode step.
    """
    lin = _expert_matmul(hidden_TD, w13_EGD, w2_EDF)
    if hidden_TD.shape[0] == 1:
        return _one_token(hidden_TD, w13_EGD, w2_EDF, expert_ids_TK, weights_TK, lin)
    k = expert_ids_TK.shape[1]
    order_N, counts_E, n_dropped = sort_by_expert(expert_ids_TK, w13_EGD.shape[0])
    order_N = order_N[n_dropped:]
    token_N = order_N // k
    x_ND = hidden_TD[token_N]
    acc = torch.promote_types(hidden_TD.dtype, torch.float32)
    counts = counts_E.tolist()
    small = 0  # experts with at most this many rows go to one grouped C call (cpu_experts), the others one by one
    if cpu_experts.usable(x_ND, w13_EGD, w2_EDF):
        # W8A8 takes every expert (its C kernel is 2.1-2.2x torch's int8 matmul at 8-256 rows), the others up to 16
        w8a8 = w8a8_ok(x_ND, getattr(w13_EGD, "act_block", None))
        small = x_ND.shape[0] if w8a8 else cpu_experts.MAX_ROWS
        y_ND = cpu_experts.experts(x_ND, counts, w13_EGD, w2_EDF, threads=min(2, torch.get_num_threads()),
                                   max_rows=small)
    else:
        y_ND = torch.empty(x_ND.shape, dtype=acc, device=hidden_TD.device)
    start = 0
    for e, c in enumerate(counts):
        if c > small:
            h = swiglu(lin(x_ND[start:start + c], w13_EGD, e))
            y_ND[start:start + c] = lin(h, w2_EDF, e)
        start += c
    if small and cpu_experts.COMBINE_IN_C and y_ND.dtype == torch.float32 and order_N.dtype == torch.int64:
        return cpu_experts.combine_sorted(y_ND, order_N, k, weights_TK).to(hidden_TD.dtype)
    w_N = weights_TK.reshape(-1)[order_N].to(acc)
    out_TD = torch.zeros(hidden_TD.shape, dtype=acc, device=hidden_TD.device)
    out_TD.index_add_(0, token_N, y_ND * w_N[:, None])
    return out_TD.to(hidden_TD.dtype)


ONE_TOKEN_GROUPED = True  # one-token steps through cpu_experts.one_token (False: the per-expert loop; for A/B runs)


def _one_token(hidden_1D: torch.Tensor, w13_EGD, w2_EDF, expert_ids_1K: torch.Tensor,
               weights_1K: torch.Tensor, lin=None) -> torch.Tensor:
    """Decode of one row: no sort or scatter, just its K experts summed (in slot order, fp32 accumulation).

    The combine weight is applied by the accumulating add (alpha), in the fp32 accumulator: one op per
    expert instead of a slice, a cast and a multiply.
    """
    if (ONE_TOKEN_GROUPED and cpu_experts.usable(hidden_1D, w13_EGD, w2_EDF)
            and not (torch.is_grad_enabled() and weights_1K.requires_grad)):
        # one C call for the K experts: batch-1 steps 1.04-1.11x (fp32 / bf16), ~1.1x (int8) against the loop of
        # per-expert cpu_gemv calls, same-process A/B at 1 thread. The experts split over the C worker thread: the
        # experts' time 1.05-1.2x, the step 1.03-1.1x (in-engine A/B, both shapes, fp32 / bf16 / W8A8; through the
        # Python helper thread it was 0.98-1.01x)
        threads = 2 if cpu_pool.split_one_row() else 1
        return cpu_experts.one_token(hidden_1D, expert_ids_1K[0].tolist(), weights_1K[0].tolist(), w13_EGD, w2_EDF,
                                     threads)
    lin = lin or _expert_matmul(hidden_1D, w13_EGD, w2_EDF)
    acc = torch.promote_types(hidden_1D.dtype, torch.float32)
    out_1D = torch.zeros(hidden_1D.shape, dtype=acc, device=hidden_1D.device)
    if torch.is_grad_enabled() and weights_1K.requires_grad:  # keep the weights in the autograd graph
        for slot, e in enumerate(expert_ids_1K[0].tolist()):
            if e >= 0:
                y = lin(swiglu(lin(hidden_1D, w13_EGD, e)), w2_EDF, e)
                out_1D = out_1D + y.to(acc) * weights_1K[:, slot:slot + 1].to(acc)
        return out_1D.to(hidden_1D.dtype)
    for e, w in zip(expert_ids_1K[0].tolist(), weights_1K[0].tolist(), strict=True):
        if e >= 0:
            out_1D.add_(lin(swiglu(lin(hidden_1D, w13_EGD, e)), w2_EDF, e), alpha=w)
    return out_1D.to(hidden_1D.dtype)


def _expert_linear(x_MI: torch.Tensor, w: Int8Weight | torch.Tensor, e: int) -> torch.Tensor:
    if isinstance(w, Int8Weight):
        return int8_linear(x_MI, w.q[e], w.scale[e], w.act_block)
    return cpu_linear(x_MI, w[e])


def _expert_matmul(hidden_TD: torch.Tensor, w13_EGD, w2_EDF):
    """The per-expert matmul for this call: the direct oneDNN op when every expert matmul qualifies
    (CPU float weights of the input's dtype, no autograd, big enough), else the checked path."""
    if (isinstance(w13_EGD, torch.Tensor) and isinstance(w2_EDF, torch.Tensor) and hidden_TD.dim() == 2
            and onednn_available() and onednn_supports(hidden_TD, w13_EGD) and w2_EDF.dtype == hidden_TD.dtype
            and not (torch.is_grad_enabled() and w2_EDF.requires_grad)
            and min(w13_EGD[0].numel(), w2_EDF[0].numel()) >= _ONEDNN_MIN_WEIGHT):
        return gemv_expert_linear if one_thread_gemv(hidden_TD) else onednn_expert_linear
    return _expert_linear


class Int8Experts(nn.Module):
    """Drop-in for model.experts.RoutedExperts holding int8 w13/w2 (+ scales); `.w13`/`.w2` give Int8Weight."""

    def __init__(self, w13_EGD: torch.Tensor, w2_EDF: torch.Tensor, act_block: int | None = None) -> None:
        super().__init__()
        self.act_block = act_block  # W8A8 activation block (see Int8Weight), None: weight-only
        q13, s13 = quantize_int8(w13_EGD)
        q2, s2 = quantize_int8(w2_EDF)
        # int8 parameters (frozen) so parameter counts still see the experts; scales are buffers
        self.q13 = nn.Parameter(q13, requires_grad=False)
        self.q2 = nn.Parameter(q2, requires_grad=False)
        self.register_buffer("s13", s13)
        self.register_buffer("s2", s2)

    @property
    def w13(self) -> Int8Weight:
        return Int8Weight(self.q13, self.s13, self.act_block)

    @property
    def w2(self) -> Int8Weight:
        return Int8Weight(self.q2, self.s2, self.act_block)

    @property
    def num_experts(self) -> int:
        return self.q13.shape[0]

    @property
    def params_per_expert(self) -> int:
        return self.q13[0].numel() + self.q2[0].numel()


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with an int8 weight [O, I] and per-output-channel scales [O]; act_block: W8A8 (see
    `int8_linear`), None: weight-only."""

    def __init__(self, linear: nn.Linear, act_block: int | None = None) -> None:
        super().__init__()
        self.act_block = act_block
        q, s = quantize_int8(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", s)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x.reshape(-1, self.in_features), self.weight, self.scale, self.act_block)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)


moe_experts_int8 = moe_experts_weight_only  # the registered names: "int8" and "onednn"
moe_experts_onednn = moe_experts_weight_only


class OneDNNLinear(nn.Linear):
    """nn.Linear whose forward goes through `cpu_linear` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)
