"""DeepSeek-V3-style MoE layers, shared by DeepSeek-V3/V2 (MLA) and GLM-4-MoE / dots1 (GQA attention).

HF layer i (`p` = model.layers.i.mlp), whatever the attention:
  p.gate.weight [E, D], p.gate.e_score_correction_bias [E]  -> blocks.i.ffn.router.weight, .correction_bias
  p.experts.{e}.{gate,up,down}_proj (or fused)              -> blocks.i.ffn.experts.w13 / w2 (stacked)
  p.shared_experts.{gate,up,down}_proj                      -> blocks.i.ffn.shared.mlp (ungated)
Layers below first_k_dense_replace are dense (p.{gate,up,down}_proj, `intermediate_size`). Routing: sigmoid
scores; selection on scores + correction bias within the `topk_group` best of `n_group` groups; weights are
the unbiased scores, optionally renormalised (`norm_topk_prob`), times `routed_scaling_factor`.
Multi-token-prediction layers (model.layers.{n >= num_hidden_layers}) are skipped, as transformers does.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import Any

from moesaic.checkpoint.archs.base import (
    Arch,
    Copy,
    Entry,
    HFConfig,
    expert_entries,
    norm_entries,
    swiglu_entries,
    trunk_entries,
)
from moesaic.config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekMoE(Arch):
    """Base of the architectures with DeepSeek-V3's MoE layer layout; subclasses supply the attention."""

    @abstractmethod
    def attn_entries(self, cfg: ModelConfig, i: int) -> list[Entry]:
        ...  # per architecture

    # ------------------------------------------------------------------ loading
    def moe_fields(self, h: HFConfig, n_layers: int) -> dict[str, Any]:
        """ModelConfig fields of the FFNs (dense width, routed + shared experts, routing)."""
        if h.d.get("scoring_func", "sigmoid") != "sigmoid":
            raise h.fail(f"scoring_func={h.d['scoring_func']!r} is not supported (only sigmoid routing is mapped)")
        n_shared = int(h.get("n_shared_experts") or 0)
        if n_shared < 1:
            raise h.fail("n_shared_experts must be >= 1 (transformers always builds the shared experts)")
        f = int(h.require("moe_intermediate_size"))
        return dict(
            ffn=int(h.require("intermediate_size")), num_experts=int(h.first("n_routed_experts", "num_local_experts")),
            top_k=int(h.require("num_experts_per_tok")), expert_ffn=f, num_shared_experts=n_shared,
            shared_ffn=n_shared * f, first_dense_layers=min(int(h.require("first_k_dense_replace")), n_layers),
            router="sigmoid_topk", normalize_topk=bool(h.get("norm_topk_prob")),
            routed_scaling_factor=float(h.get("routed_scaling_factor")),
            n_group=int(h.get("n_group") or 1), topk_group=int(h.get("topk_group") or 1), aux_loss_coef=0.0)

    def entries(self, cfg: ModelConfig, names: set[str] | None = None) -> list[Entry]:
        out = trunk_entries(cfg)
        for i in range(cfg.n_layers):
            out += norm_entries(i) + self.attn_entries(cfg, i) + self.ffn_entries(cfg, i)
        return out

    @staticmethod
    def ffn_entries(cfg: ModelConfig, i: int) -> list[Entry]:
        o, p = f"blocks.{i}.ffn", f"model.layers.{i}.mlp"
        if not cfg.is_moe_layer(i):
            return swiglu_entries(o, p)
        out: list[Entry] = [Copy(f"{o}.router.weight", f"{p}.gate.weight"),
                            Copy(f"{o}.router.correction_bias", f"{p}.gate.e_score_correction_bias")]
        out += expert_entries(o, p, cfg.num_experts)
        return out + swiglu_entries(f"{o}.shared.mlp", f"{p}.shared_experts")

    def keep_fp32(self, key: str) -> bool:  # transformers' _keep_in_fp32_modules_strict for these models
        return key.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias"))

    def ignored(self, key: str, cfg: ModelConfig) -> bool:
        m = _LAYER.match(key)
        if m and int(m.group(1)) >= cfg.n_layers:  # multi-token-prediction modules
            return True
        return super().ignored(key, cfg)

    # ------------------------------------------------------------------ export
    @staticmethod
    def moe_blockers(cfg: ModelConfig, arch: str) -> list[str]:
        """What the DeepSeek-V3 MoE layout cannot express (sigmoid routing assumed)."""
        if not cfg.is_moe:
            return ["num_experts=0 (an MoE architecture)"]
        why = []
        if cfg.router != "sigmoid_topk":
            why.append(f"router={cfg.router!r} (needs 'sigmoid_topk')")
        if cfg.capacity_factor is not None:
            why.append("capacity_factor (token dropping)")
        why += DeepseekMoE.layout_blockers(cfg, arch)
        return why

    @staticmethod
    def layout_blockers(cfg: ModelConfig, arch: str) -> list[str]:
        """Shared experts and dense-layer placement (whatever the router)."""
        why = []
        if cfg.num_shared_experts < 1 or cfg.shared_expert_gate:
            why.append(f"{arch} needs ungated shared experts (num_shared_experts >= 1, no shared_expert_gate)")
        elif cfg.shared_ffn % cfg.expert_ffn:
            why.append(f"shared_ffn={cfg.shared_ffn} is not a multiple of expert_ffn={cfg.expert_ffn}")
        if cfg.moe_layers != list(range(cfg.first_dense_layers, cfg.n_layers)):
            why.append("dense layers after the first MoE layer (moe_every / mlp_only_layers)")
        return why

    @staticmethod
    def moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
        return dict(intermediate_size=cfg.ffn, moe_intermediate_size=cfg.expert_ffn, n_routed_experts=cfg.num_experts,
                    n_shared_experts=cfg.shared_ffn // cfg.expert_ffn, num_experts_per_tok=cfg.top_k,
                    routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group, topk_group=cfg.topk_group,
                    norm_topk_prob=cfg.normalize_topk, first_k_dense_replace=cfg.first_dense_layers,
                    output_router_logits=False)
