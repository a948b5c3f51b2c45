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


GLM = dict(BASE, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, partial_rotary_factor=1.0)


@pytest.mark.parametrize("arch, extra, match", [
    ("Glm4MoeForCausalLM", {"partial_rotary_factor": 0.5625}, "gives 9 rotary dims of head_dim=16"),
    ("Dots1ForCausalLM", {"partial_rotary_factor": 0.5, "n_shared_experts": 1}, "partial_rotary_factor=0.5"),
    ("Glm4MoeForCausalLM", {"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ("Glm4MoeForCausalLM", {"n_shared_experts": 0}, "n_shared_experts must be >= 1"),
    ("Glm4MoeForCausalLM", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("Dots1ForCausalLM", {"attention_bias": True, "n_shared_experts": 1}, "attention_bias=True"),
    ("Dots1ForCausalLM", {}, "n_shared_experts must be >= 1"),  # dots1 has no default
])
def test_glm_and_dots1_unsupported_features_are_named(arch, extra, match):
    d = {"architectures": [arch], **GLM, **extra}
    with pytest.raises(ArchError, match=f"{arch}: .*{match}"):
        hf_to_config({k: v for k, v in d.items() if v is not None})


def test_partial_rope_matches_transformers():
    """model/rope.py's partial rotary (first R of D dims, rotate_half) against GLM-4-MoE's reference code."""
    from transformers.models.glm4_moe import modeling_glm4_moe as ref

    from moesaic.config import rotary_dim
    from moesaic.model.rope import RotaryEmbedding, apply_rope

    d = {k: v for k, v in GLM.items() if k != "partial_rotary_factor"}
    _, cfg = hf_to_config({"architectures": ["Glm4MoeForCausalLM"], **d})
    assert cfg.rope_scaling == {"rope_type": "default", "partial_rotary_factor": 0.5}  # GLM's default
    hf_cfg = transformers.Glm4MoeConfig(**d)
    r = rotary_dim(cfg.head_dim, cfg.rope_scaling)
    assert r == 8 and cfg.head_dim == 16
    pos = torch.arange(11)[None]
    q, k = torch.randn(2, 1, 4, 11, 16, dtype=torch.float64).float()
    cos, sin = RotaryEmbedding(r, cfg.rope_theta, cfg.rope_scaling)(pos, torch.float32)
    hcos, hsin = ref.Glm4MoeRotaryEmbedding(hf_cfg)(q, pos)
    assert torch.allclose(cos, hcos) and torch.allclose(sin, hsin)
    want_q, want_k = ref.apply_rotary_pos_emb(q, k, hcos, hsin)
    assert torch.equal(apply_rope(q, cos, sin), want_q) and torch.equal(apply_rope(k, cos, sin), want_k)
    assert torch.equal(apply_rope(q, cos, sin)[..., 8:], q[..., 8:])  # the rest passes through
    with pytest.raises(ValueError, match="gives 3 rotary dims"):
        rotary_dim(16, {"partial_rotary_factor": 0.2})


def test_glm_attention_bias_is_qkv_only():
    _, cfg = hf_to_config({"architectures": ["Glm4MoeForCausalLM"], **GLM, "attention_bias": True})
    assert cfg.qkv_bias and cfg.qk_norm == "none" and cfg.first_dense_layers == 1 and cfg.normalize_topk


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


REAL_CONFIGS = {  # config.json of public checkpoints (the fields that matter)
"mixtral-8x7b": {"architectures": ["MixtralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000},
"qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936},
"deepseek-v2-lite": {"architectures": ["DeepseekV2ForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400},
"deepseek-v3": {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "num_nextn_predict_layers": 1, "tie_word_embeddings": False},
"olmoe-1b-7b": {"architectures": ["OlmoeForCausalLM"], "attention_bias": False, "clip_qkv": None, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": 50304},
}
# GLM-4.5-Air / GLM-4.5: shapes as published for training (Megatron arguments: 1 + 45 / 3 + 89 layers, 96 heads,
# 8 kv groups of 128, rotary-percent 0.5, qkv bias, GLM-4.5 with qk layernorm), in config.json spelling.
_GLM = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 131072, "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 96, "num_experts_per_tok": 8, "num_key_value_heads": 8, "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_theta": 1000000, "tie_word_embeddings": False, "vocab_size": 151552}
REAL_CONFIGS["glm-4.5-air"] = {**_GLM, "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 128, "num_hidden_layers": 46, "first_k_dense_replace": 1, "routed_scaling_factor": 1.0, "use_qk_norm": False}
REAL_CONFIGS["glm-4.5"] = {**_GLM, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_routed_experts": 160, "num_hidden_layers": 92, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5, "use_qk_norm": True}


# Published totals (model cards): parameters including embeddings, in billions (DeepSeek-V3: without its
# 14B multi-token-prediction module, which moesaic skips as transformers does).
# GLM: 106.9B and 352.8B without the MTP layer; the cards' 106B / 355B are rounded (and 12B / 32B active match).
PUBLISHED_TOTAL_B = {"deepseek-v3": 671, "mixtral-8x7b": 46.7, "qwen3-30b-a3b": 30.5, "deepseek-v2-lite": 15.7, "olmoe-1b-7b": 6.9,
                     "glm-4.5-air": 106, "glm-4.5": 355}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_configs_give_the_published_parameter_counts(name):
    """The config mapping of real checkpoints builds a model of the published size (on the meta device)."""
    from moesaic.model import Transformer

    _, cfg = hf_to_config(REAL_CONFIGS[name])
    with torch.device("meta"):
        model = Transformer(cfg)
    total = model.count_params().total_with_embeddings / 1e9
    assert total == pytest.approx(PUBLISHED_TOTAL_B[name], rel=0.01)
