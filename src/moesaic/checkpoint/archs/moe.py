"""Softmax top-k MoE decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

HF MoE layer i (`p` = model.layers.i.mlp, Mixtral: .block_sparse_moe in older files):
  p.gate.weight [E, D]                         -> blocks.i.ffn.router.weight
  p.experts.{e}.{gate,up,down}_proj.weight     -> blocks.i.ffn.experts.w13[e] = [gate; up], w2[e] = down
    (Mixtral: w1 = gate, w3 = up, w2 = down; transformers-5 fused: p.experts.gate_up_proj / down_proj)
  p.shared_expert.{gate,up,down}_proj, p.shared_expert_gate (Qwen2-MoE) -> blocks.i.ffn.shared.mlp, .gate
Dense layers (Qwen mlp_only_layers / decoder_sparse_step) map like the dense architectures.
"""

from __future__ import annotations

from typing import Any

import torch

from moesaic.checkpoint.archs.base import (
    Arch,
    Copy,
    Entry,
    expert_entries,
    gqa_blockers,
    gqa_entries,
    has_prefix,
    no_o_bias,
    norm_entries,
    swiglu_entries,
    trunk_entries,
    trunk_fields,
    trunk_to_hf,
)
from moesaic.config import ModelConfig


def _plain_moe_blockers(cfg: ModelConfig) -> list[str]:
    """What an architecture with no shared experts and an MoE FFN in every layer cannot express."""
    out = []
    if cfg.is_moe and cfg.num_shared_experts:
        out.append("shared experts")
    if cfg.is_moe and len(cfg.moe_layers) != cfg.n_layers:
        out.append("dense layers between MoE layers")
    return out


def _router_blockers(cfg: ModelConfig, normalize: bool | None) -> list[str]:
    out = []
    if not cfg.is_moe:
        out.append("num_experts=0 (an MoE architecture)")
        return out
    if cfg.router != "softmax_topk":
        out.append(f"router={cfg.router!r} (needs 'softmax_topk')")
    if normalize is not None and cfg.normalize_topk != normalize:
        out.append(f"normalize_topk={cfg.normalize_topk} (needs {normalize})")
    if cfg.routed_scaling_factor != 1.0:
        out.append(f"routed_scaling_factor={cfg.routed_scaling_factor} (needs 1.0)")
    if cfg.capacity_factor is not None:
        out.append("capacity_factor (token dropping)")
    return out


class _SoftmaxMoE(Arch):
    """Shared logic: softmax top-k router, routed experts, optional dense layers."""

    expert_names = ("gate_proj", "up_proj", "down_proj")

    def moe_prefix(self, i: int, names: set[str] | None) -> str:
        return f"model.layers.{i}.mlp"

    def ffn_entries(self, cfg: ModelConfig, i: int, names: set[str] | None) -> list[Entry]:
        o, p = f"blocks.{i}.ffn", self.moe_prefix(i, names)
        if not cfg.is_moe_layer(i):
            return swiglu_entries(o, f"model.layers.{i}.mlp")
        out: list[Entry] = [Copy(f"{o}.router.weight", f"{p}.gate.weight")]
        out += expert_entries(o, p, cfg.num_experts, self.expert_names)
        if cfg.num_shared_experts:
            out += swiglu_entries(f"{o}.shared.mlp", f"{p}.shared_expert")
            if cfg.shared_expert_gate:
                out.append(Copy(f"{o}.shared.gate.weight", f"{p}.shared_expert_gate.weight"))
        return out

    def entries(self, cfg: ModelConfig, names: set[str] | None = None) -> list[Entry]:
        out = trunk_entries(cfg)
        for i in range(cfg.n_layers):
            out += norm_entries(i) + gqa_entries(cfg, i) + self.ffn_entries(cfg, i, names)
        return out

    def qwen_layers(self, h) -> dict[str, Any]:
        return dict(moe_every=int(h.get("decoder_sparse_step", 1)), mlp_only_layers=list(h.get("mlp_only_layers") or []),
                    ffn=int(h.require("intermediate_size")))

    def qwen_layers_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)],
                "intermediate_size": cfg.ffn, "moe_intermediate_size": cfg.expert_ffn,
                "num_experts_per_tok": cfg.top_k, "norm_topk_prob": cfg.normalize_topk,
                "output_router_logits": False, "router_aux_loss_coef": 0.001}


class Mixtral(_SoftmaxMoE):
    name, model_type = "MixtralForCausalLM", "mixtral"
    defaults = {"rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 1e6,
                "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None}
    expert_names = ("w1", "w3", "w2")

    def moe_prefix(self, i: int, names: set[str] | None) -> str:
        legacy = f"model.layers.{i}.block_sparse_moe"
        return legacy if names is None or has_prefix(names, legacy + ".") else f"model.layers.{i}.mlp"

    def to_config(self, d: dict[str, Any]) -> ModelConfig:
        h = self.hf(d)
        no_o_bias(h)
        f = int(h.require("intermediate_size"))
        return ModelConfig(**trunk_fields(h), ffn=f, expert_ffn=f,
                           num_experts=int(h.first("num_local_experts", "num_experts")),
                           top_k=int(h.require("num_experts_per_tok")), router="softmax_topk", normalize_topk=True)

    def export_blocker(self, cfg: ModelConfig) -> str | None:
        why = gqa_blockers(cfg, False, "none") + _router_blockers(cfg, True)
        why += _plain_moe_blockers(cfg)
        return "; ".join(why) or None

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = trunk_to_hf(cfg, self.name, self.model_type)
        d.update(intermediate_size=cfg.expert_ffn, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                 sliding_window=None, router_jitter_noise=0.0, output_router_logits=False,
                 router_aux_loss_coef=0.001)
        return d


class Qwen2Moe(_SoftmaxMoE):
    name, model_type = "Qwen2MoeForCausalLM", "qwen2_moe"
    defaults = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0,
                "decoder_sparse_step": 1, "norm_topk_prob": False, "qkv_bias": True, "num_experts": 60,
                "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                "intermediate_size": 5632, "use_sliding_window": False}

    def to_config(self, d: dict[str, Any]) -> ModelConfig:
        h = self.hf(d)
        shared = int(h.require("shared_expert_intermediate_size"))
        if shared < 1:
            raise h.fail("shared_expert_intermediate_size must be >= 1")
        return ModelConfig(**trunk_fields(h), **self.qwen_layers(h), qkv_bias=bool(h.get("qkv_bias")),
                           num_experts=int(h.require("num_experts")), top_k=int(h.require("num_experts_per_tok")),
                           expert_ffn=int(h.require("moe_intermediate_size")), num_shared_experts=1,
                           shared_ffn=shared, shared_expert_gate=True, router="softmax_topk",
                           normalize_topk=bool(h.get("norm_topk_prob")))

    def export_blocker(self, cfg: ModelConfig) -> str | None:
        why = gqa_blockers(cfg, cfg.qkv_bias, "none") + _router_blockers(cfg, None)
        if cfg.is_moe and not cfg.num_shared_experts:
            why.append("Qwen2-MoE needs a shared expert")
        return "; ".join(why) or None

    # An ungated shared expert is written exactly as a gated one: gate weight 0 gives sigmoid(0) = 0.5, and
    # the down projection is doubled (both scalings are powers of two, so no rounding changes).
    def export_adjust(self, cfg: ModelConfig, key: str, t: torch.Tensor) -> torch.Tensor:
        if not cfg.shared_expert_gate and key.endswith(".mlp.shared_expert.down_proj.weight"):
            return t * 2
        return t

    def export_extra(self, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
        if cfg.shared_expert_gate:
            return []
        return [(f"model.layers.{i}.mlp.shared_expert_gate.weight", torch.zeros(1, cfg.d_model))
                for i in cfg.moe_layers]

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = trunk_to_hf(cfg, self.name, self.model_type)
        d.update(self.qwen_layers_to_hf(cfg), num_experts=cfg.num_experts, qkv_bias=cfg.qkv_bias,
                 shared_expert_intermediate_size=cfg.shared_ffn, use_sliding_window=False, sliding_window=None)
        return d


class Qwen3Moe(_SoftmaxMoE):
    name, model_type = "Qwen3MoeForCausalLM", "qwen3_moe"
    defaults = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0,
                "decoder_sparse_step": 1, "norm_topk_prob": False, "num_experts": 128, "num_experts_per_tok": 8,
                "moe_intermediate_size": 768, "intermediate_size": 6144, "use_sliding_window": False}

    def to_config(self, d: dict[str, Any]) -> ModelConfig:
        h = self.hf(d)
        no_o_bias(h)
        return ModelConfig(**trunk_fields(h), **self.qwen_layers(h), qk_norm="head",
                           num_experts=int(h.first("num_experts", "num_local_experts")),
                           top_k=int(h.require("num_experts_per_tok")), expert_ffn=int(h.require("moe_intermediate_size")),
                           router="softmax_topk", normalize_topk=bool(h.get("norm_topk_prob")))

    def export_blocker(self, cfg: ModelConfig) -> str | None:
        why = gqa_blockers(cfg, False, "head") + _router_blockers(cfg, None)
        if cfg.is_moe and cfg.num_shared_experts:
            why.append("shared experts")
        return "; ".join(why) or None

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = trunk_to_hf(cfg, self.name, self.model_type)
        d.update(self.qwen_layers_to_hf(cfg), num_experts=cfg.num_experts, attention_bias=False,
                 use_sliding_window=False, sliding_window=None)
        return d


class Olmoe(_SoftmaxMoE):
    name, model_type = "OlmoeForCausalLM", "olmoe"
    defaults = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0,
                "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "intermediate_size": 2048}

    def to_config(self, d: dict[str, Any]) -> ModelConfig:
        h = self.hf(d)
        no_o_bias(h)
        f = int(h.require("intermediate_size"))
        clip = h.get("clip_qkv")
        return ModelConfig(**trunk_fields(h), ffn=f, expert_ffn=f, qk_norm="full",
                           clip_qkv=None if clip is None else float(clip),
                           num_experts=int(h.first("num_experts", "num_local_experts")),
                           top_k=int(h.require("num_experts_per_tok")), router="softmax_topk",
                           normalize_topk=bool(h.get("norm_topk_prob")))

    def export_blocker(self, cfg: ModelConfig) -> str | None:
        why = gqa_blockers(cfg, False, "full") + _router_blockers(cfg, None)
        if cfg.head_dim * cfg.n_heads != cfg.d_model:  # OLMoE sizes its q/k norms from hidden_size
            why.append(f"head_dim={cfg.head_dim} != d_model / n_heads")
        why += _plain_moe_blockers(cfg)
        return "; ".join(why) or None

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = trunk_to_hf(cfg, self.name, self.model_type)
        d.update(intermediate_size=cfg.expert_ffn, num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                 norm_topk_prob=cfg.normalize_topk, clip_qkv=cfg.clip_qkv, attention_bias=False,
                 output_router_logits=False, router_aux_loss_coef=0.01)
        return d
