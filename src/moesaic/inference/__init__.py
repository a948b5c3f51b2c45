"""Inference: the engine (continuous batching over a preallocated KV cache), sampling, quantization.

    Engine(model, tokenizer).generate(prompts, SamplingParams(...)) -> list[Completion]
"""

from moesaic.inference.engine import Engine
from moesaic.inference.request import Completion
from moesaic.inference.sampler import SamplingParams

__all__ = ["Engine", "SamplingParams", "Completion"]
