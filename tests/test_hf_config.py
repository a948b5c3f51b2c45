"""config.json -> ModelConfig: legacy and transformers-5 spellings give the same model as transformers builds."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moesaic.checkpoint.archs import ArchError  # noqa: E402
from moesaic.checkpoint.hf import hf_to_config  # noqa: E402
from moesaic.model.mla import mla_softmax_scale  # noqa: E402
from moesaic.model.rope import rope_inv_freq  # noqa: E402

BASE = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=8192)
LEGACY = {
    "llama31": ("LlamaForCausalLM", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024})),
    "mixtral_theta": ("MixtralForCausalLM", dict(rope_theta=1e6, num_local_experts=4, num_experts_per_tok=2)),
    "linear_type_key": ("Qwen2ForCausalLM", dict(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 4.0})),
    "yarn_no_original": ("Qwen3ForCausalLM", dict(rope_theta=10000.0, head_dim=16,
                                                  rope_scaling={"rope_type": "yarn", "factor": 4.0})),
}


@pytest.mark.parametrize("case", sorted(LEGACY))
def test_legacy_rope_spelling_matches_transformers(case):
    arch, extra = LEGACY[case]
    d = {"architectures": [arch], **BASE, **extra}
    _, cfg = hf_to_config(d)
    prefix = arch.removesuffix("ForCausalLM")
    hf_cfg = getattr(transformers, prefix + "Config")(**{k: v for k, v in d.items() if k != "architectures"})
    model = getattr(transformers, arch)(hf_cfg)
    rope = model.model.rotary_emb
    ours, factor = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.allclose(ours, rope.inv_freq.float(), rtol=1e-5, atol=0)
    assert factor == pytest.approx(rope.attention_scaling)


def test_deepseek_yarn_scale_matches_transformers():
    d = {"architectures": ["DeepseekV3ForCausalLM"], **BASE, "n_routed_experts": 4, "num_experts_per_tok": 2,
         "n_group": 2, "topk_group": 1, "moe_intermediate_size": 16, "q_lora_rank": None, "kv_lora_rank": 16,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "num_key_value_heads": 4,
         "first_k_dense_replace": 1,
         "rope_scaling": {"type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32,
                          "beta_slow": 1, "original_max_position_embeddings": 4096}, "rope_theta": 10000.0}
    _, cfg = hf_to_config(d)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **{k: v for k, v in d.items() if k != "architectures"}))
    attn = model.model.layers[0].self_attn
    assert mla_softmax_scale(cfg) == pytest.approx(attn.scaling, rel=1e-6)
    ours, factor = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.allclose(ours, model.model.rotary_emb.inv_freq.float(), rtol=1e-5, atol=0)
    assert factor == pytest.approx(model.model.rotary_emb.attention_scaling)


@pytest.mark.parametrize("extra, match", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope type 'longrope'"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "truncate": False}}, "truncate=false"),
])
def test_unsupported_features_are_named(extra, match):
    with pytest.raises(ArchError, match=f"LlamaForCausalLM: .*{match}"):
        hf_to_config({"architectures": ["LlamaForCausalLM"], **BASE, **extra})


def test_model_type_fallback_and_aliases():
    arch, cfg = hf_to_config({"model_type": "qwen3_moe", **BASE, "num_experts": 8, "num_experts_per_tok": 2,
                              "moe_intermediate_size": 16, "head_dim": 16, "decoder_sparse_step": 2})
    assert arch.name == "Qwen3MoeForCausalLM" and cfg.num_experts == 8 and cfg.moe_layers == [1]
    _, cfg2 = hf_to_config({"architectures": ["Qwen3MoeForCausalLM"], **BASE, "num_local_experts": 6,
                            "num_experts_per_tok": 2, "moe_intermediate_size": 16})
    assert cfg2.num_experts == 6


def test_deepseek_v2_group_limited_routing_is_refused():
    d = {"architectures": ["DeepseekV2ForCausalLM"], **BASE, "n_routed_experts": 8, "num_experts_per_tok": 2,
         "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "kv_lora_rank": 16,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "q_lora_rank": None}
    with pytest.raises(ArchError, match="DeepseekV2ForCausalLM: topk_method='group_limited_greedy' with n_group=4"):
        hf_to_config(d)
    arch, cfg = hf_to_config({**d, "topk_method": "greedy"})
    assert arch.name == "DeepseekV2ForCausalLM" and cfg.router == "softmax_topk" and not cfg.normalize_topk
