"""moesaic's own registry of Hugging Face architectures (code inside a checkpoint folder is never imported).

`resolve(config_dict)` picks the architecture from `architectures` (else `model_type`);
`for_export(cfg)` picks the first architecture that can express a ModelConfig.
"""

from __future__ import annotations

from typing import Any

from moesaic.checkpoint.archs.base import Arch, ArchError
from moesaic.checkpoint.archs.deepseek import DeepseekV2, DeepseekV3
from moesaic.checkpoint.archs.dense import Llama, Mistral, Qwen2, Qwen3
from moesaic.checkpoint.archs.glm import Dots1, Glm4Moe
from moesaic.checkpoint.archs.moe import Mixtral, Olmoe, Qwen2Moe, Qwen3Moe
from moesaic.config import ModelConfig

ARCHS: dict[str, Arch] = {a.name: a for a in (Mixtral(), Qwen2Moe(), Qwen3Moe(), Olmoe(), DeepseekV3(),
                                              DeepseekV2(), Glm4Moe(), Dots1(), Llama(), Mistral(), Qwen2(),
                                              Qwen3())}
BY_MODEL_TYPE: dict[str, Arch] = {a.model_type: a for a in ARCHS.values()}

# Known architectures moesaic does not run, and the feature that blocks each.
UNSUPPORTED: dict[str, str] = {
    "GptOssForCausalLM": "attention sinks, alternating sliding-window layers and clamped SwiGLU experts with "
                         "biases are not implemented",
    "Qwen3NextForCausalLM": "gated DeltaNet linear-attention layers are not implemented",
    "Llama4ForCausalLM": "chunked attention and interleaved MoE with a different expert layout are not mapped",
}

# Export preference: the most specific architecture first. Sigmoid routing goes to DeepSeek-V3 with MLA,
# else to GLM-4-MoE (GQA); dots1 (a subset of GLM-4-MoE's features) is only written when asked for by name.
EXPORT_ORDER = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM",
                "DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Glm4MoeForCausalLM", "LlamaForCausalLM",
                "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def supported() -> list[str]:
    return sorted(ARCHS)


def resolve(d: dict[str, Any]) -> Arch:
    """The Arch for a config.json dict; ValueError naming what was asked and what is supported."""
    names = d.get("architectures") or []
    for n in names:
        if n in ARCHS:
            return ARCHS[n]
    if not names and d.get("model_type") in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[d["model_type"]]
    asked = names[0] if names else d.get("model_type")
    why = UNSUPPORTED.get(asked, "unknown architecture")
    raise ArchError(f"architecture {asked!r} is not supported ({why}); supported: {supported()}")


def for_export(cfg: ModelConfig, name: str | None = None) -> Arch:
    """The architecture to export cfg as (`name` forces one); ValueError listing each blocker otherwise."""
    if name is not None:
        if name not in ARCHS:
            raise ArchError(f"unknown export architecture {name!r}; supported: {supported()}")
        why = ARCHS[name].export_blocker(cfg)
        if why:
            raise ArchError(f"cannot export as {name}: {why}")
        return ARCHS[name]
    reasons = []
    for n in EXPORT_ORDER:
        why = ARCHS[n].export_blocker(cfg)
        if why is None:
            return ARCHS[n]
        reasons.append(f"  {n}: {why}")
    raise ArchError("no transformers architecture can express this model:\n" + "\n".join(reasons))


__all__ = ["ARCHS", "Arch", "ArchError", "UNSUPPORTED", "for_export", "resolve", "supported"]
