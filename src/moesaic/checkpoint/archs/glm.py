"""Glm4MoeForCausalLM (GLM-4.5 / 4.6) and Dots1ForCausalLM (dots.llm1): GQA attention on DeepSeek-V3's MoE
layers (sigmoid routing with a correction bias, shared experts, first dense layers; see deepseek_moe.py).

HF layer i (`a` = model.layers.i.self_attn):
  a.{q,k,v,o}_proj (+ q/k/v biases: GLM `attention_bias`)  -> blocks.i.attn.{wq,wk,wv,wo}
  a.q_norm, a.k_norm (per-head RMSNorm: GLM `use_qk_norm`, always in dots1) -> blocks.i.attn.q_norm, k_norm
GLM rotates the first `partial_rotary_factor` of each head (default 0.5 when config.json omits it), kept in
ModelConfig.rope_scaling as transformers keeps it in rope_parameters (config.py: rotary_dim; model/rope.py: apply_rope).
"""

from __future__ import annotations

from typing import Any

from moesaic.checkpoint.archs.base import (
    Entry,
    HFConfig,
    gqa_blockers,
    gqa_entries,
    no_o_bias,
    partial_rotary_factor,
    trunk_fields,
    trunk_to_hf,
)
from moesaic.checkpoint.archs.deepseek_moe import DeepseekMoE
from moesaic.config import ModelConfig, rotary_dim


class Glm4Moe(DeepseekMoE):
    name, model_type = "Glm4MoeForCausalLM", "glm4_moe"
    defaults = {"rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5, "num_key_value_heads": 8, "n_routed_experts": 128,
                "num_experts_per_tok": 8, "moe_intermediate_size": 1408, "intermediate_size": 10944,
                "n_shared_experts": 1, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                "first_k_dense_replace": 1, "norm_topk_prob": True, "attention_bias": False, "use_qk_norm": False}

    def to_config(self, d: dict[str, Any]) -> ModelConfig:
        h = self.hf(d)
        trunk = self.trunk(h)
        return ModelConfig(**trunk, **self.moe_fields(h, trunk["n_layers"]), **self.attn_fields(h))

    def trunk(self, h: HFConfig) -> dict[str, Any]:
        out = trunk_fields(h, partial_rotary=True)
        try:
            rotary_dim(out["head_dim"], out["rope_scaling"])
        except ValueError as e:
            raise h.fail(str(e)) from None
        return out

    def attn_fields(self, h: HFConfig) -> dict[str, Any]:
        # attention_bias puts biases on q/k/v only (o_proj never has one in GLM-4-MoE).
        return dict(qkv_bias=bool(h.get("attention_bias")), qk_norm="head" if h.get("use_qk_norm") else "none")

    def attn_entries(self, cfg: ModelConfig, i: int) -> list[Entry]:
        return gqa_entries(cfg, i)

    def export_blocker(self, cfg: ModelConfig) -> str | None:
        qk_norm = "head" if cfg.qk_norm == "head" else "none"
        why = gqa_blockers(cfg, cfg.qkv_bias, qk_norm, partial_rotary=True) + self.moe_blockers(cfg, "GLM-4-MoE")
        return "; ".join(why) or None

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = trunk_to_hf(cfg, self.name, self.model_type)
        d["rope_parameters"]["partial_rotary_factor"] = partial_rotary_factor(cfg)  # explicit: GLM's default is 0.5
        d.update(self.moe_to_hf(cfg), attention_bias=cfg.qkv_bias, use_qk_norm=cfg.qk_norm == "head",
                 num_nextn_predict_layers=0)
        return d


class Dots1(Glm4Moe):
    """dots.llm1: Qwen3 attention (per-head q/k norm always; `attention_bias` would bias o_proj too, refused);
    layers from `max_window_layers` on use sliding-window attention, exact up to the window (max_seq_len is
    capped there when any layer slides)."""

    name, model_type = "Dots1ForCausalLM", "dots1"
    defaults = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0,
                "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0, "norm_topk_prob": False,
                "routed_scaling_factor": 1.0, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                "sliding_window": 4096, "max_window_layers": 62}

    def trunk(self, h: HFConfig) -> dict[str, Any]:
        no_o_bias(h)
        n = int(h.require("num_hidden_layers"))
        window, first = h.get("sliding_window"), int(h.get("max_window_layers"))
        types = h.d.get("layer_types") or ["sliding_attention" if window is not None and i >= first
                                           else "full_attention" for i in range(n)]
        slides = "sliding_attention" in types
        return trunk_fields(HFConfig({**h.d, "use_sliding_window": slides}, h.defaults, h.arch))

    def attn_fields(self, h: HFConfig) -> dict[str, Any]:
        return dict(qk_norm="head")

    def export_blocker(self, cfg: ModelConfig) -> str | None:
        why = gqa_blockers(cfg, False, "head") + self.moe_blockers(cfg, "dots1")
        return "; ".join(why) or None

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = trunk_to_hf(cfg, self.name, self.model_type)
        d.update(self.moe_to_hf(cfg), attention_bias=False, sliding_window=None, max_window_layers=cfg.n_layers,
                 layer_types=["full_attention"] * cfg.n_layers)
        return d
