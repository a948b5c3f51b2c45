"""Dense decoders: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM (dense twins, upcycling sources).

HF layer i: self_attn.{q,k,v,o}_proj (+ q/k bias for Qwen2, + per-head q_norm/k_norm for Qwen3),
mlp.{gate,up,down}_proj -> moesaic blocks.i.attn.{wq,wk,wv,wo}, blocks.i.ffn.{w13 = [gate; up], w2 = down}.
"""

from __future__ import annotations

from typing import Any

from moesaic.checkpoint.archs.base import (
    Arch,
    Entry,
    gqa_blockers,
    gqa_entries,
    no_o_bias,
    norm_entries,
    swiglu_entries,
    trunk_entries,
    trunk_fields,
    trunk_to_hf,
)
from moesaic.config import ModelConfig


class _Dense(Arch):
    qkv_bias = False
    qk_norm = "none"

    def check(self, h) -> None:
        no_o_bias(h)

    def to_config(self, d: dict[str, Any]) -> ModelConfig:
        h = self.hf(d)
        self.check(h)
        return ModelConfig(**trunk_fields(h), ffn=int(h.require("intermediate_size")), num_experts=0,
                           qkv_bias=self.qkv_bias, qk_norm=self.qk_norm)

    def entries(self, cfg: ModelConfig, names: set[str] | None = None) -> list[Entry]:
        out = trunk_entries(cfg)
        for i in range(cfg.n_layers):
            out += norm_entries(i) + gqa_entries(cfg, i)
            out += swiglu_entries(f"blocks.{i}.ffn", f"model.layers.{i}.mlp")
        return out

    def export_blocker(self, cfg: ModelConfig) -> str | None:
        why = gqa_blockers(cfg, self.qkv_bias, self.qk_norm)
        if cfg.is_moe:
            why.append("num_experts > 0 (a dense architecture)")
        return "; ".join(why) or None

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = trunk_to_hf(cfg, self.name, self.model_type)
        d.update(intermediate_size=cfg.ffn, attention_bias=False)
        return d


class Llama(_Dense):
    name, model_type = "LlamaForCausalLM", "llama"
    defaults = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0}

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**super().to_hf(cfg), "mlp_bias": False, "pretraining_tp": 1}


class Qwen2(_Dense):
    name, model_type = "Qwen2ForCausalLM", "qwen2"
    defaults = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0}
    qkv_bias = True

    def check(self, h) -> None:  # Qwen2 always has q/k/v biases and never an o_proj bias
        pass

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = super().to_hf(cfg)
        del d["attention_bias"]
        return {**d, "use_sliding_window": False, "sliding_window": None}


class Qwen3(_Dense):
    name, model_type = "Qwen3ForCausalLM", "qwen3"
    defaults = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0}
    qk_norm = "head"

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**super().to_hf(cfg), "use_sliding_window": False, "sliding_window": None}


class Mistral(_Dense):
    """Llama layout with sliding-window attention: exact up to the window, so max_seq_len is capped there."""

    name, model_type = "MistralForCausalLM", "mistral"
    defaults = {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "rope_theta": 10000.0,
                "sliding_window": 4096}

    def export_blocker(self, cfg: ModelConfig) -> str | None:
        return "exported as LlamaForCausalLM instead"

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        raise ValueError("MistralForCausalLM is load-only: moesaic exports these models as LlamaForCausalLM")
