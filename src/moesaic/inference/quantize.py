"""Apply an int8 quantization scheme to a finished model, in place (a transform from outside).

`quantize_model(model, "int8")` (or "w8a8") replaces every MoE layer's stacked expert weights by int8 +
per-output-channel scales (`kernels.quant.Int8Experts`); the MoE layers then run the `int8`
kernels backend (picked by "auto", or by name). With `linears=True` the attention projections,
dense / shared-expert FFNs and the LM head become `Int8Linear` too. Routers stay in float: their
logits choose experts, and they are tiny.

Schemes (same int8 weights, different activations):
  "int8"  weight-only: the activations stay float (fp32 in the C kernels, bf16 in torch's int8 matmul).
  "w8a8"  the activations are quantized too, on the fly, per block of `cpu_q8.ACT_BLOCK` = 32 inputs (llama.cpp's
          q8_0 x q8_0), and multiplied with AVX-512 VNNI (`kernels.cpu_q8`); where the CPU has no VNNI (or off
          CPU) the weight-only kernels run instead.
"""

from __future__ import annotations

import torch
from torch import nn

from moesaic.inference.cpu_attention import use_cpu_attention
from moesaic.inference.cpu_norms import use_cpu_norms
from moesaic.inference.cpu_router import use_cpu_router
from moesaic.inference.hugepages import move_to_huge_pages
from moesaic.kernels import cpu_gemv, cpu_q8
from moesaic.kernels.onednn import _ONEDNN_MIN_WEIGHT, onednn_available, transpose_for_gemv, unpack_onednn
from moesaic.kernels.onednn import pack_onednn as _pack
from moesaic.kernels.quant import Int8Experts, Int8Linear, OneDNNLinear
from moesaic.memory import available_memory

SCHEMES = ("int8", "w8a8")


def quantize_model(model: nn.Module, scheme: str = "int8", *, linears: bool = False) -> nn.Module:
    """Quantize `model` (a moesaic Transformer) in place and return it."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize scheme must be one of {SCHEMES}, got {scheme!r}")
    block = cpu_q8.ACT_BLOCK if scheme == "w8a8" else None
    for layer in model.moe_layers():
        if not isinstance(layer.experts, Int8Experts):
            layer.experts = Int8Experts(layer.experts.w13.data, layer.experts.w2.data, act_block=block)
            if layer.backend not in ("auto", "int8", "reference", "sorted"):
                layer.backend = "auto"  # e.g. a GPU kernel that has no int8 path
    if linears:
        _swap_linears(model, block)
    return model


def _swap_linears(module: nn.Module, block: int | None) -> None:
    for name, child in module.named_children():
        if name == "router" or name == "gate":  # routing stays in float
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child, act_block=block))
        else:
            _swap_linears(child, block)


def use_onednn(model: nn.Module, pack_weights: bool = False, transpose_w2: bool | None = None) -> bool:
    """Route a CPU float model's linears and experts through oneDNN (inference only); returns whether it did.

    Plain nn.Linear layers (not routers) become `OneDNNLinear` (same parameters and state dict); MoE
    layers on "auto" get the `onednn` kernels backend. Int8 layers are left as they are.
    transpose_w2 (None: fp32 experts with short down-projection rows, F <= 1024, unless the C GEMV
    `kernels.cpu_gemv` is built, which reads the plain layout faster still; True: every fp32 expert;
    False: none): fp32 w2 keeps its values and shape but is stored transposed
    (`kernels.onednn.transpose_for_gemv`): the one-row decode matmul reads them faster that way through
    MKL's x @ W (fine-64x8 batch-1 steps 1.11x, batch 8 1.06x; coarse F=2816 rows: 1.05x at batch 1 and
    1.03x at batch 8 with blocked copies, on huge pages, but a loss at batch 8 without blocked copies,
    which is why the engine asks for it only when it packs or runs one row; bf16 gains nothing).
    pack_weights: also keep oneDNN-blocked copies of the float expert matrices and linears
    (`kernels.onednn.pack_onednn`) for the multi-row matmuls of batched steps: 1.2x (batch 8) to 1.4-1.5x
    (batch 32) faster decode steps, and bf16 batch-1 steps 1.4-1.5x, at the cost of a second copy of those
    weights in memory.
    """
    p = model.embed.weight
    if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16) or not onednn_available():
        return False
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and ".router" not in f".{name}" and not name.endswith("gate"):
            mod.__class__ = OneDNNLinear
    for layer in model.moe_layers():
        if layer.backend == "auto" and not isinstance(layer.experts, Int8Experts):
            layer.backend = "onednn"
        w2 = layer.experts.w2
        if (layer.backend == "onednn" and isinstance(w2, torch.Tensor) and w2.dtype == torch.float32
                and w2.is_contiguous() and (transpose_w2 if transpose_w2 is not None
                                            else w2.shape[-1] <= 1024 and not cpu_gemv.available())):
            w2.data = transpose_for_gemv(w2.data)
    if pack_weights:
        pack_weights_onednn(model)
    return True


def pack_weights_onednn(model: nn.Module) -> None:
    """Attach oneDNN-blocked copies (`kernels.onednn.pack_onednn`) to the float experts of MoE layers on the
    `onednn` backend and to the `OneDNNLinear` weights (after `use_onednn`; again after moving weights)."""
    for layer in model.moe_layers():
        if layer.backend == "onednn" and isinstance(layer.experts.w2, torch.Tensor):
            _pack(layer.experts.w13)
            _pack(layer.experts.w2)
    for mod in model.modules():
        if isinstance(mod, OneDNNLinear) and mod.weight.numel() >= _ONEDNN_MIN_WEIGHT:
            _pack(mod.weight)


def auto_pack(model: nn.Module, max_batch: int) -> bool:
    """Whether blocked copies pay here: they speed up multi-row steps and bf16 one-row steps through oneDNN
    (not fp32 one-row steps, nor one-row steps through `kernels.cpu_gemv`), and cost a second
    copy of the float weights, which must take < 1/4 of available memory."""
    p = model.embed.weight
    one_row_gemv = cpu_gemv.available()  # one-row steps use the C GEMV
    if max_batch == 1 and (p.dtype != torch.bfloat16 or one_row_gemv):
        return False
    float_bytes = sum(t.numel() * t.element_size() for t in model.parameters() if t.dtype.is_floating_point)
    return float_bytes < (available_memory() or 0) / 4


def prepare_cpu_weights(model: nn.Module, *, onednn: bool = True, pack_weights: bool | None = None,
                        huge_pages: bool = True, max_batch: int = 1) -> bool:
    """The engine's weight preparation on CPU, in order: oneDNN layouts (`use_onednn`), the C RMS norms
    (`inference.cpu_norms`), the C decode attention (`inference.cpu_attention`) and the C routers
    (`inference.cpu_router`; all four only with onednn), huge pages
    (`hugepages.move_to_huge_pages`; before packing, which is keyed by each weight's address), then the
    blocked copies (pack_weights None: `auto_pack`). Returns whether weights were packed."""
    if model.embed.weight.device.type != "cpu":
        return False  # nothing here applies to GPU weights
    pack = auto_pack(model, max_batch) if pack_weights is None else pack_weights
    # one-row fp32 steps read w2 fastest row-major through the C GEMV, else stored transposed (MKL's x @ W)
    transpose = False if cpu_gemv.available() else (True if pack or max_batch == 1 else None)
    used = onednn and use_onednn(model, transpose_w2=transpose)
    if onednn:
        use_cpu_norms(model)
        use_cpu_attention(model)
        use_cpu_router(model)
    if huge_pages:
        move_to_huge_pages(model)
    pack = used and pack
    if pack:
        pack_weights_onednn(model)
    return bool(pack)


def unpack_weights(model: nn.Module) -> None:
    """Drop the oneDNN-blocked copies `use_onednn(pack_weights=True)` attached (frees their memory)."""
    for p in model.parameters():
        unpack_onednn(p)
