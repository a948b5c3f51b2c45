"""DeepseekV3ForCausalLM: multi-head latent attention, sigmoid group-limited routing, shared experts.

HF layer i (`a` = model.layers.i.self_attn, `p` = model.layers.i.mlp):
  a.q_proj | a.q_a_proj, a.q_a_layernorm, a.q_b_proj   -> blocks.i.attn.wq | wq_a, q_norm, wq_b
  a.kv_a_proj_with_mqa, a.kv_a_layernorm, a.kv_b_proj  -> blocks.i.attn.wkv_a, kv_norm, wkv_b
  a.o_proj                                             -> blocks.i.attn.wo
  p.gate.weight, p.gate.e_score_correction_bias        -> blocks.i.ffn.router.weight, .correction_bias
  p.experts.{e}.{gate,up,down}_proj                    -> blocks.i.ffn.experts.w13 / w2 (stacked)
  p.shared_experts.{gate,up,down}_proj                 -> blocks.i.ffn.shared.mlp
Layers below first_k_dense_replace are dense (p.{gate,up,down}_proj). Multi-token-prediction layers
(model.layers.{n >= num_hidden_layers}) are not part of the decoder and are skipped, as transformers does.
"""

from __future__ import annotations

import re
from typing import Any

from moesaic.checkpoint.archs.base import (
    Arch,
    Copy,
    Entry,
    expert_entries,
    norm_entries,
    swiglu_entries,
    trunk_entries,
    trunk_fields,
    trunk_to_hf,
)
from moesaic.config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekV3(Arch):
    name, model_type = "DeepseekV3ForCausalLM", "deepseek_v3"
    defaults = {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "rope_theta": 10000.0,
                "n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
                "intermediate_size": 18432, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
                "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
                "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
                "norm_topk_prob": True, "rope_interleave": True}

    def to_config(self, d: dict[str, Any]) -> ModelConfig:
        h = self.hf(d)
        if h.get("attention_bias", False):
            raise h.fail("attention_bias=True is not supported by moesaic's MLA")
        if h.d.get("scoring_func", "sigmoid") != "sigmoid":
            raise h.fail(f"scoring_func={h.d['scoring_func']!r} is not supported (DeepSeek-V3 uses sigmoid)")
        n_shared = int(h.get("n_shared_experts") or 0)
        if n_shared < 1:
            raise h.fail("n_shared_experts must be >= 1 (transformers always builds the shared experts)")
        trunk = trunk_fields(h)
        rope = int(h.require("qk_rope_head_dim"))
        trunk.update(n_kv_heads=trunk["n_heads"], head_dim=rope)
        n_layers = trunk["n_layers"]
        q_rank = h.d.get("q_lora_rank", self.defaults["q_lora_rank"])
        return ModelConfig(
            **trunk, ffn=int(h.require("intermediate_size")), attention="mla",
            q_lora_rank=None if q_rank is None else int(q_rank), kv_lora_rank=int(h.require("kv_lora_rank")),
            qk_nope_head_dim=int(h.require("qk_nope_head_dim")), qk_rope_head_dim=rope,
            v_head_dim=int(h.require("v_head_dim")), rope_interleave=bool(h.d.get("rope_interleave", True)),
            num_experts=int(h.first("n_routed_experts", "num_local_experts")),
            top_k=int(h.require("num_experts_per_tok")), expert_ffn=int(h.require("moe_intermediate_size")),
            num_shared_experts=n_shared, shared_ffn=n_shared * int(h.require("moe_intermediate_size")),
            first_dense_layers=min(int(h.require("first_k_dense_replace")), n_layers), router="sigmoid_topk",
            normalize_topk=bool(h.get("norm_topk_prob")), routed_scaling_factor=float(h.get("routed_scaling_factor")),
            n_group=int(h.get("n_group") or 1), topk_group=int(h.get("topk_group") or 1),
            aux_loss_coef=0.0)

    def entries(self, cfg: ModelConfig, names: set[str] | None = None) -> list[Entry]:
        out = trunk_entries(cfg)
        for i in range(cfg.n_layers):
            out += norm_entries(i) + self.mla_entries(cfg, i)
            o, p = f"blocks.{i}.ffn", f"model.layers.{i}.mlp"
            if not cfg.is_moe_layer(i):
                out += swiglu_entries(o, p)
                continue
            out += [Copy(f"{o}.router.weight", f"{p}.gate.weight"),
                    Copy(f"{o}.router.correction_bias", f"{p}.gate.e_score_correction_bias")]
            out += expert_entries(o, p, cfg.num_experts)
            out += swiglu_entries(f"{o}.shared.mlp", f"{p}.shared_experts")
        return out

    @staticmethod
    def mla_entries(cfg: ModelConfig, i: int) -> list[Entry]:
        o, a = f"blocks.{i}.attn", f"model.layers.{i}.self_attn"
        if cfg.q_lora_rank is None:
            out: list[Entry] = [Copy(f"{o}.wq.weight", f"{a}.q_proj.weight")]
        else:
            out = [Copy(f"{o}.wq_a.weight", f"{a}.q_a_proj.weight"),
                   Copy(f"{o}.q_norm.weight", f"{a}.q_a_layernorm.weight"),
                   Copy(f"{o}.wq_b.weight", f"{a}.q_b_proj.weight")]
        return out + [Copy(f"{o}.wkv_a.weight", f"{a}.kv_a_proj_with_mqa.weight"),
                      Copy(f"{o}.kv_norm.weight", f"{a}.kv_a_layernorm.weight"),
                      Copy(f"{o}.wkv_b.weight", f"{a}.kv_b_proj.weight"),
                      Copy(f"{o}.wo.weight", f"{a}.o_proj.weight")]

    def keep_fp32(self, key: str) -> bool:  # transformers' _keep_in_fp32_modules_strict for DeepSeek
        return key.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias"))

    def ignored(self, key: str, cfg: ModelConfig) -> bool:
        m = _LAYER.match(key)
        if m and int(m.group(1)) >= cfg.n_layers:  # multi-token-prediction modules
            return True
        return super().ignored(key, cfg)

    def export_blocker(self, cfg: ModelConfig) -> str | None:
        why = []
        if cfg.attention != "mla":
            why.append(f"attention={cfg.attention!r} (DeepSeek-V3 needs 'mla')")
        if cfg.qkv_bias or cfg.qk_norm != "none" or cfg.clip_qkv is not None:
            why.append("qkv_bias / qk_norm / clip_qkv (not in DeepSeek-V3 attention)")
        if not cfg.is_moe:
            why.append("num_experts=0 (an MoE architecture)")
            return "; ".join(why)
        if cfg.router != "sigmoid_topk":
            why.append(f"router={cfg.router!r} (needs 'sigmoid_topk')")
        if cfg.capacity_factor is not None:
            why.append("capacity_factor (token dropping)")
        if cfg.num_shared_experts < 1 or cfg.shared_expert_gate:
            why.append("DeepSeek-V3 needs ungated shared experts (num_shared_experts >= 1, no shared_expert_gate)")
        elif cfg.shared_ffn % cfg.expert_ffn:
            why.append(f"shared_ffn={cfg.shared_ffn} is not a multiple of expert_ffn={cfg.expert_ffn}")
        if cfg.moe_layers != list(range(cfg.first_dense_layers, cfg.n_layers)):
            why.append("dense layers after the first MoE layer (moe_every / mlp_only_layers)")
        return "; ".join(why) or None

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = trunk_to_hf(cfg, self.name, self.model_type)
        d.update(num_key_value_heads=cfg.n_heads, head_dim=cfg.qk_rope_head_dim, intermediate_size=cfg.ffn,
                 moe_intermediate_size=cfg.expert_ffn, n_routed_experts=cfg.num_experts,
                 n_shared_experts=cfg.shared_ffn // cfg.expert_ffn, num_experts_per_tok=cfg.top_k,
                 routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group, topk_group=cfg.topk_group,
                 norm_topk_prob=cfg.normalize_topk, first_k_dense_replace=cfg.first_dense_layers,
                 q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                 qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                 rope_interleave=cfg.rope_interleave, attention_bias=False, num_nextn_predict_layers=0,
                 output_router_logits=False)
        return d


class DeepseekV2(DeepseekV3):
    """DeepSeek-V2 (and V2-Lite): V3's MLA and layer layout with softmax top-k routing ("greedy"), never
    renormalised, times routed_scaling_factor; no correction bias. RoPE pairs are interleaved (transformers
    rotates them as complex numbers, which equals DeepSeek's interleaved layout up to a permutation of the
    rotary dims applied to q and k alike)."""

    name, model_type = "DeepseekV2ForCausalLM", "deepseek_v2"
    defaults = {**DeepseekV3.defaults, "n_routed_experts": 64, "n_shared_experts": 2, "routed_scaling_factor": 1.0,
                "first_k_dense_replace": 0, "moe_intermediate_size": 1407, "intermediate_size": 11008,
                "max_position_embeddings": 2048}

    def to_config(self, d: dict[str, Any]) -> ModelConfig:
        h = self.hf(d)
        method = h.d.get("topk_method", "greedy")
        n_group = int(h.d.get("n_group") or 1)
        if method not in ("greedy", "group_limited_greedy") or (method != "greedy" and n_group > 1):
            raise h.fail(f"topk_method={method!r} with n_group={n_group} is not supported (only 'greedy' "
                         "softmax top-k is mapped; group-limited softmax routing is not)")
        # V3's parser (groups off: greedy routing ignores them), then the V2 router.
        d = {**d, "scoring_func": "sigmoid", "rope_interleave": True, "n_group": 1, "topk_group": 1}
        cfg = super().to_config(d)
        return cfg.replace(router="softmax_topk", normalize_topk=False, n_group=1, topk_group=1)

    def entries(self, cfg: ModelConfig, names: set[str] | None = None) -> list[Entry]:
        return [e for e in super().entries(cfg, names) if not e.ours.endswith("router.correction_bias")]

    def export_blocker(self, cfg: ModelConfig) -> str | None:
        why = []
        if cfg.attention != "mla" or not cfg.rope_interleave:
            why.append("DeepSeek-V2 needs attention='mla' with rope_interleave")
        if cfg.qkv_bias or cfg.qk_norm != "none" or cfg.clip_qkv is not None:
            why.append("qkv_bias / qk_norm / clip_qkv (not in DeepSeek-V2 attention)")
        if not cfg.is_moe:
            return "; ".join(why + ["num_experts=0 (an MoE architecture)"])
        if cfg.router != "softmax_topk" or cfg.normalize_topk or cfg.capacity_factor is not None:
            why.append("DeepSeek-V2 routing is softmax top-k without renormalisation or capacity")
        if cfg.num_shared_experts < 1 or cfg.shared_expert_gate or cfg.shared_ffn % cfg.expert_ffn:
            why.append("DeepSeek-V2 needs ungated shared experts sized a multiple of expert_ffn")
        if cfg.moe_layers != list(range(cfg.first_dense_layers, cfg.n_layers)):
            why.append("dense layers after the first MoE layer (moe_every / mlp_only_layers)")
        return "; ".join(why) or None

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = super().to_hf(cfg)
        for k in ("rope_interleave", "num_nextn_predict_layers"):
            d.pop(k, None)
        d.update(topk_method="greedy", n_group=None, topk_group=None, norm_topk_prob=False)
        return d
