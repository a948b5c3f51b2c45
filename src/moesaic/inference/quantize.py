"""Apply a weight-only quantization scheme to a finished model, in place (a transform from outside).

`quantize_model(model, "int8")` replaces every MoE layer's stacked expert weights by int8 +
per-output-channel scales (`kernels.quant.Int8Experts`); the MoE layers then run the `int8`
kernels backend (picked by "auto", or by name). With `linears=True` the attention projections,
dense / shared-expert FFNs and the LM head become `Int8Linear` too. Routers stay in float: their
logits choose experts, and they are tiny.
"""

from __future__ import annotations

from torch import nn

from moesaic.kernels.quant import Int8Experts, Int8Linear

SCHEMES = ("int8",)


def quantize_model(model: nn.Module, scheme: str = "int8", *, linears: bool = False) -> nn.Module:
    """Quantize `model` (a moesaic Transformer) in place and return it."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize scheme must be one of {SCHEMES}, got {scheme!r}")
    for layer in model.moe_layers():
        if not isinstance(layer.experts, Int8Experts):
            layer.experts = Int8Experts(layer.experts.w13.data, layer.experts.w2.data)
            if layer.backend not in ("auto", "int8", "reference", "sorted"):
                layer.backend = "auto"  # e.g. a GPU kernel that has no int8 path
    if linears:
        _swap_linears(model)
    return model


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if name == "router" or name == "gate":  # routing stays in float
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            _swap_linears(child)
