"""DeepseekV3ForCausalLM / DeepseekV2ForCausalLM: multi-head latent attention on DeepSeek's MoE layers.

HF layer i (`a` = model.layers.i.self_attn; the MoE/dense FFN layout is in deepseek_moe.py):
  a.q_proj | a.q_a_proj, a.q_a_layernorm, a.q_b_proj   -> blocks.i.attn.wq | wq_a, q_norm, wq_b
  a.kv_a_proj_with_mqa, a.kv_a_layernorm, a.kv_b_proj  -> blocks.i.attn.wkv_a, kv_norm, wkv_b
  a.o_proj                                             -> blocks.i.attn.wo
"""

from __future__ import annotations

from typing import Any

from moesaic.checkpoint.archs.base import Copy, Entry, partial_rotary_factor, trunk_fields, trunk_to_hf
from moesaic.checkpoint.archs.deepseek_moe import DeepseekMoE
from moesaic.config import ModelConfig


class DeepseekV3(DeepseekMoE):
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
        trunk = trunk_fields(h)
        rope = int(h.require("qk_rope_head_dim"))
        trunk.update(n_kv_heads=trunk["n_heads"], head_dim=rope)
        q_rank = h.d.get("q_lora_rank", self.defaults["q_lora_rank"])
        return ModelConfig(
            **trunk, **self.moe_fields(h, trunk["n_layers"]), attention="mla",
            q_lora_rank=None if q_rank is None else int(q_rank), kv_lora_rank=int(h.require("kv_lora_rank")),
            qk_nope_head_dim=int(h.require("qk_nope_head_dim")), qk_rope_head_dim=rope,
            v_head_dim=int(h.require("v_head_dim")), rope_interleave=bool(h.d.get("rope_interleave", True)))

    @staticmethod
    def attn_entries(cfg: ModelConfig, i: int) -> list[Entry]:
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

    def export_blocker(self, cfg: ModelConfig) -> str | None:
        why = []
        if cfg.attention != "mla":
            why.append(f"attention={cfg.attention!r} (DeepSeek-V3 needs 'mla')")
        if cfg.qkv_bias or cfg.qk_norm != "none" or cfg.clip_qkv is not None or partial_rotary_factor(cfg) != 1:
            why.append("qkv_bias / qk_norm / clip_qkv / partial rotary (not in DeepSeek-V3 attention)")
        why += self.moe_blockers(cfg, "DeepSeek-V3")
        return "; ".join(why) or None

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = trunk_to_hf(cfg, self.name, self.model_type)
        d.update(self.moe_to_hf(cfg), num_key_value_heads=cfg.n_heads, head_dim=cfg.qk_rope_head_dim,
                 q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                 qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                 rope_interleave=cfg.rope_interleave, attention_bias=False, num_nextn_predict_layers=0)
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
        if cfg.qkv_bias or cfg.qk_norm != "none" or cfg.clip_qkv is not None or partial_rotary_factor(cfg) != 1:
            why.append("qkv_bias / qk_norm / clip_qkv / partial rotary (not in DeepSeek-V2 attention)")
        if not cfg.is_moe:
            return "; ".join(why + ["num_experts=0 (an MoE architecture)"])
        if cfg.router != "softmax_topk" or cfg.normalize_topk or cfg.capacity_factor is not None:
            why.append("DeepSeek-V2 routing is softmax top-k without renormalisation or capacity")
        why += self.layout_blockers(cfg, "DeepSeek-V2")
        return "; ".join(why) or None

    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        d = super().to_hf(cfg)
        for k in ("rope_interleave", "num_nextn_predict_layers"):
            d.pop(k, None)
        d.update(topk_method="greedy", n_group=None, topk_group=None, norm_topk_prob=False)
        return d
