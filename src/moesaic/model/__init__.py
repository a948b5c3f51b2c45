"""Pure nn.Modules and functions of the MoE language model (no training, serving or kernels code)."""

from moesaic.model.router import RouterOutput, build_router
from moesaic.model.transformer import ModelOutput, ParamCount, Transformer, build_model

__all__ = ["Transformer", "ModelOutput", "ParamCount", "RouterOutput", "build_model", "build_router"]
