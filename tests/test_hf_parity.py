"""Parity with transformers: tiny random HF models -> save_pretrained -> moesaic.load -> same logits.

Every architecture moesaic maps is built from a config (no download), with configs that exercise the
features: group-limited sigmoid routing with a non-zero correction bias, unnormalised top-k, shared-expert
gates, dense layers (first_k_dense_replace, mlp_only_layers, decoder_sparse_step), qkv biases, q/k norms,
clip_qkv, MLA with and without a q LoRA, the same sigmoid routing under GQA (GLM-4-MoE, dots1), YaRN RoPE
scaling, sliding windows, tied embeddings.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moesaic.checkpoint import load  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DEEPSEEK = dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=12,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, num_key_value_heads=4, n_shared_experts=2,
                routed_scaling_factor=2.5, norm_topk_prob=False)
CASES: dict[str, tuple[str, dict]] = {
    "mixtral": ("Mixtral", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2Moe", dict(intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                   num_experts=6, num_experts_per_tok=2, mlp_only_layers=[0], decoder_sparse_step=1,
                                   norm_topk_prob=False)),
    "qwen2_moe_step2": ("Qwen2Moe", dict(intermediate_size=40, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                         decoder_sparse_step=2, norm_topk_prob=True, num_hidden_layers=4)),
    "qwen3_moe": ("Qwen3Moe", dict(intermediate_size=40, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                                   mlp_only_layers=[1], head_dim=8, norm_topk_prob=True)),
    "olmoe": ("Olmoe", dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2, clip_qkv=0.3,
                            norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3", DEEPSEEK),
    "deepseek_v3_noqlora_yarn": ("DeepseekV3", {**DEEPSEEK, "q_lora_rank": None, "rope_interleave": False,
                                                "norm_topk_prob": True, "rope_parameters": {
                                                    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 32, "mscale": 1.0,
                                                    "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}}),
    "deepseek_v2": ("DeepseekV2", dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=6,
                                       num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None,
                                       kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                                       num_key_value_heads=4, n_shared_experts=1, routed_scaling_factor=1.5,
                                       topk_method="greedy")),
    # GLM-4-MoE: q/k/v biases, per-head q/k norm, group-limited sigmoid routing, two shared experts.
    "glm4_moe": ("Glm4Moe", dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                                 num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
                                 n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                 attention_bias=True, use_qk_norm=True, head_dim=12, partial_rotary_factor=1.0)),
    # GLM-4.5-Air's shape: q/k/v biases, no q/k norm, half of each head rotated (GLM's default factor 0.5).
    "glm4_moe_partial": ("Glm4Moe", dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                                         num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=1,
                                         routed_scaling_factor=1.0, norm_topk_prob=True, attention_bias=True,
                                         head_dim=16)),
    "glm4_moe_plain_yarn": ("Glm4Moe", dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=6,
                                            num_experts_per_tok=2, first_k_dense_replace=0, n_shared_experts=1,
                                            routed_scaling_factor=1.0, norm_topk_prob=False, rope_parameters={
                                                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 32,
                                                "partial_rotary_factor": 1.0})),
    # dots1: Qwen3 attention (per-head q/k norm) on DeepSeek-V3 MoE layers; layer 2 slides (window 32 > 19 ids).
    "dots1": ("Dots1", dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=6, num_experts_per_tok=2,
                            n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
                            routed_scaling_factor=1.5, head_dim=8, sliding_window=32, max_window_layers=2)),
    "llama": ("Llama", dict(intermediate_size=40, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": ("Qwen2", dict(intermediate_size=40, tie_word_embeddings=True)),
    "mistral": ("Mistral", dict(intermediate_size=40, sliding_window=32, head_dim=8)),
    "qwen3": ("Qwen3", dict(intermediate_size=40, head_dim=8)),
}


def build_hf(case: str, seed: int = 0, init: float = 0.1):
    """A random-weight transformers model for a case (DeepSeek: non-zero correction biases).

    init 0.1 (vs transformers' 0.02) makes routing depend strongly on the input, so fp32 parity is a
    sharp test; bf16 tests use 0.02, where bf16's own rounding noise does not flip routing decisions."""
    prefix, kw = CASES[case]
    torch.manual_seed(seed)
    cfg = getattr(transformers, prefix + "Config")(**{**COMMON, "initializer_range": init, **kw})
    model = getattr(transformers, prefix + "ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.3)
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| over the logits' scale (max |ref|)."""
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def rel_fro(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| over all logits."""
    return float((ours.float() - ref.float()).norm() / ref.float().norm())


def logits_pair(hf_model, folder, dtype=None, seed: int = 1):
    ours = load(folder, dtype=dtype)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return ours(ids), hf_model(ids).logits, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_logits_match_transformers(case, tmp_path):
    hf_model = build_hf(case)
    hf_model.save_pretrained(tmp_path)
    ours, ref, model = logits_pair(hf_model, tmp_path)
    assert model.embed.weight.dtype == torch.float32 and not model.training
    assert rel_err(ours, ref) <= 1e-4, f"{case}: fp32 relative error {rel_err(ours, ref):.2e}"


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe",
                                  "glm4_moe_partial", "qwen2"])
def test_bf16_checkpoint_logits(case, tmp_path):
    """bf16 weights on disk -> bf16 model. Relative error (Frobenius, over all logits) vs transformers in
    bf16 <= 1e-2, and vs the fp32 truth no worse than transformers' own bf16 error (+ slack)."""
    hf32 = build_hf(case, init=0.02)
    hf_model = build_hf(case, init=0.02).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    ours, ref, model = logits_pair(hf_model, tmp_path)
    assert model.embed.weight.dtype == torch.bfloat16 and ours.dtype == torch.bfloat16
    assert rel_fro(ours, ref) <= 1e-2, f"{case}: bf16 relative error {rel_fro(ours, ref):.2e}"
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        truth = hf32(ids).logits
    assert rel_fro(ours, truth) <= 1.5 * rel_fro(ref, truth) + 1e-3


@pytest.mark.parametrize("case", ["qwen3_moe", "deepseek_v3"])
def test_fp16_checkpoint_logits(case, tmp_path):
    hf_model = build_hf(case, init=0.02).to(torch.float16)
    hf_model.save_pretrained(tmp_path)
    ours, ref, model = logits_pair(hf_model, tmp_path)
    assert model.embed.weight.dtype == torch.float16 and ours.dtype == torch.float16
    assert rel_fro(ours, ref) <= 1e-2, f"{case}: fp16 relative error {rel_fro(ours, ref):.2e}"


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3"])
def test_sharded_checkpoint(case, tmp_path):
    hf_model = build_hf(case)
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    ours, ref, _ = logits_pair(hf_model, tmp_path)
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe", "deepseek_v3", "glm4_moe"])
def test_transformers5_fused_expert_names(case, tmp_path):
    """Files written from transformers-5 module names (mlp.experts.gate_up_proj [E, 2F, D])."""
    from safetensors.torch import save_file

    hf_model = build_hf(case)
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    ours, ref, _ = logits_pair(hf_model, tmp_path)
    assert rel_err(ours, ref) <= 1e-4


def test_load_with_dtype_override(tmp_path):
    hf_model = build_hf("qwen3_moe")
    hf_model.save_pretrained(tmp_path)
    model = load(tmp_path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.blocks[0].ffn.router.weight.dtype == torch.float32  # routing stays fp32


def test_configs_exercise_features(tmp_path):
    """Guard against a parity test that passes because a feature is off."""
    hf_model = build_hf("deepseek_v3")
    hf_model.save_pretrained(tmp_path)
    m = load(tmp_path)
    cfg = m.config
    assert cfg.attention == "mla" and cfg.n_group == 4 and cfg.topk_group == 2 and cfg.first_dense_layers == 1
    assert not cfg.normalize_topk and cfg.routed_scaling_factor == 2.5 and cfg.shared_ffn == 32
    assert float(m.blocks[1].ffn.router.correction_bias.abs().sum()) > 0
    # The bias changes routing: with it zeroed, some token picks other experts.
    ids = torch.randint(0, VOCAB, (1, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = [r.expert_ids_TK.clone() for r in m.forward_aux(ids).router_outputs]
        for blk in m.blocks[1:]:
            blk.ffn.router.correction_bias.zero_()
        after = [r.expert_ids_TK for r in m.forward_aux(ids).router_outputs]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # Groups are limited: every token's experts come from at most topk_group groups.
    per_group = cfg.num_experts // cfg.n_group
    assert all(len(set((row // per_group).tolist())) <= cfg.topk_group for r in before for row in r)
    olmoe = load(_saved(build_hf("olmoe"), tmp_path / "o"))
    assert olmoe.config.clip_qkv == 0.3 and olmoe.config.qk_norm == "full"
    # Sliding-window attention equals full attention up to the window: the usable length is capped there.
    assert load(_saved(build_hf("mistral"), tmp_path / "m")).config.max_seq_len == 32
    glm = load(_saved(build_hf("glm4_moe"), tmp_path / "g")).config
    assert (glm.attention, glm.qkv_bias, glm.qk_norm, glm.router, glm.n_group, glm.first_dense_layers) == (
        "gqa", True, "head", "sigmoid_topk", 4, 1)
    assert glm.routed_scaling_factor == 2.5 and glm.normalize_topk and glm.shared_ffn == 32 and glm.head_dim == 12
    partial = load(_saved(build_hf("glm4_moe_partial"), tmp_path / "p"))
    assert partial.config.rope_scaling == {"rope_type": "default", "partial_rotary_factor": 0.5}
    assert partial.blocks[0].attn.rope.inv_freq.numel() == 4  # 8 of 16 dims rotated
    dots = load(_saved(build_hf("dots1"), tmp_path / "d")).config
    assert dots.qk_norm == "head" and dots.max_seq_len == 32 and dots.moe_layers == [1, 2]


def _saved(hf_model, folder):
    hf_model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2",
                                  "glm4_moe", "glm4_moe_partial", "dots1", "llama"])
def test_greedy_generation_matches_transformers(case, tmp_path):
    """32 greedy tokens: transformers `generate` vs moesaic's inference Engine (KV cache, incremental decode)."""
    from moesaic.inference.engine import Engine
    from moesaic.inference.sampler import SamplingParams

    hf_model = build_hf(case)
    hf_model.save_pretrained(tmp_path)
    prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf_model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                pad_token_id=0)[0, 7:].tolist()
    engine = Engine(load(tmp_path), max_batch=1, max_len=64)
    out = engine.generate(prompt[0].tolist(), SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    assert out[0].token_ids == ref
