"""moesaic: sparse Mixture-of-Experts language models, end to end.

Public API:
    ModelConfig, PRESETS      typed configuration and named presets
    build_model               a randomly initialised model from a config
    kernels.moe_experts       the expert-dispatch entry point; kernels.available_backends()
    Engine, SamplingParams    inference: Engine(model, tokenizer).generate(prompts, SamplingParams(...))
    load, export_hf           a model from a run folder or a local Hugging Face folder; write an HF folder
"""

from moesaic import kernels
from moesaic.checkpoint import load
from moesaic.checkpoint.export import export_hf
from moesaic.config import PRESETS, ModelConfig
from moesaic.inference import Completion, Engine, SamplingParams
from moesaic.model import ModelOutput, ParamCount, RouterOutput, Transformer, build_model

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "build_model", "Transformer", "ModelOutput", "ParamCount",
           "RouterOutput", "kernels", "__version__", "Engine", "SamplingParams", "Completion",
           "load", "export_hf"]
