"""Export round trip: moesaic model -> HF folder -> transformers (same logits) -> moesaic.load (same logits)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moesaic import ModelConfig, build_model  # noqa: E402
from moesaic.checkpoint import load  # noqa: E402
from moesaic.checkpoint.archs import ArchError, for_export  # noqa: E402
from moesaic.checkpoint.export import export_hf  # noqa: E402

TRUNK = dict(vocab_size=80, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64, ffn=48)
CASES: dict[str, tuple[str, str, dict]] = {  # id -> (expected architecture, preset, fields)
    "mixtral": ("MixtralForCausalLM", "tiny", dict(rope_theta=1e6)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "", dict(**TRUNK, num_experts=6, top_k=2, expert_ffn=16, qk_norm="head",
                                                  normalize_topk=False, mlp_only_layers=[1], tie_embeddings=True)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "", dict(**TRUNK, num_experts=4, top_k=2, expert_ffn=16,
                                                  num_shared_experts=1, shared_ffn=24, shared_expert_gate=True,
                                                  qkv_bias=True, first_dense_layers=1, head_dim=12,
                                                  rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # The default recipe: sigmoid routing + correction bias, normalised top-k x 2.5, one ungated shared expert, GQA.
    "small_preset": ("Glm4MoeForCausalLM", "small", dict(n_layers=2, d_model=64, vocab_size=80, ffn=64, expert_ffn=32,
                                                         router="sigmoid_topk", bias_update_rate=1e-3,
                                                         routed_scaling_factor=2.5)),
    "small_softmax": ("Qwen2MoeForCausalLM", "small", dict(n_layers=2, d_model=64, vocab_size=80, ffn=64, expert_ffn=32,
                                                           router="softmax_topk", bias_update_rate=0.0,
                                                           routed_scaling_factor=1.0)),  # ungated shared expert
    "deepseek_mini_gqa": ("Glm4MoeForCausalLM", "deepseek-mini", dict(n_layers=3, d_model=64, vocab_size=80, ffn=64,
                                                                      expert_ffn=16, attention="gqa", n_kv_heads=4)),
    "glm4_moe": ("Glm4MoeForCausalLM", "", dict(**TRUNK, num_experts=8, top_k=3, expert_ffn=16, num_shared_experts=2,
                                                shared_ffn=32, first_dense_layers=1, router="sigmoid_topk", n_group=4,
                                                topk_group=2, normalize_topk=False, routed_scaling_factor=1.5,
                                                qkv_bias=True, qk_norm="head", head_dim=12)),
    "olmoe": ("OlmoeForCausalLM", "", dict(**TRUNK, num_experts=4, top_k=2, expert_ffn=16, qk_norm="full",
                                           clip_qkv=0.2, normalize_topk=False)),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "", dict(**{**TRUNK, "n_kv_heads": 4}, attention="mla", q_lora_rank=12,
                                                      kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4,
                                                      v_head_dim=8, rope_interleave=True, num_experts=8, top_k=3,
                                                      expert_ffn=16, num_shared_experts=2, shared_ffn=32,
                                                      first_dense_layers=1, router="sigmoid_topk", n_group=4,
                                                      topk_group=2, normalize_topk=True, routed_scaling_factor=1.5)),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "", dict(**{**TRUNK, "n_kv_heads": 4}, attention="mla", q_lora_rank=None,
                                                      kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4,
                                                      v_head_dim=8, rope_interleave=True, num_experts=6, top_k=2,
                                                      expert_ffn=16, num_shared_experts=1, shared_ffn=16,
                                                      normalize_topk=False, routed_scaling_factor=2.0)),
    "glm4_moe_partial": ("Glm4MoeForCausalLM", "", dict(**TRUNK, num_experts=6, top_k=2, expert_ffn=16,
                                                        num_shared_experts=1, router="sigmoid_topk", qkv_bias=True,
                                                        rope_scaling={"rope_type": "default",
                                                                      "partial_rotary_factor": 0.5})),
    "llama": ("LlamaForCausalLM", "", dict(**TRUNK, num_experts=0)),
    "qwen2": ("Qwen2ForCausalLM", "", dict(**TRUNK, num_experts=0, qkv_bias=True)),
    "qwen3": ("Qwen3ForCausalLM", "", dict(**TRUNK, num_experts=0, qk_norm="head", head_dim=16)),
}


def make_model(case: str, seed: int = 0, **changes):
    _, preset, kw = CASES[case]
    cfg = ModelConfig.preset(preset, **kw) if preset else ModelConfig(**kw)
    if changes:
        cfg = cfg.replace(**changes)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # larger weights than the training init: routing and norms matter
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(4.0)
            else:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("correction_bias"):
                b.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_transformers(case, tmp_path):
    arch = CASES[case][0]
    model = make_model(case)
    assert for_export(model.config).name == arch
    check_round_trip(model, arch, tmp_path)


def test_forced_dots1_round_trip(tmp_path):
    """dots1 expresses a subset of GLM-4-MoE (no qkv bias, q/k norm required): written only when asked for."""
    model = make_model("glm4_moe", qkv_bias=False)
    check_round_trip(model, "Dots1ForCausalLM", tmp_path, forced=True)
    with pytest.raises(ArchError, match="cannot export as Dots1ForCausalLM: .*qkv_bias=True"):
        export_hf(make_model("glm4_moe"), tmp_path / "x", arch="Dots1ForCausalLM")


def check_round_trip(model, arch: str, tmp_path, forced: bool = False) -> None:
    """export_hf -> transformers loads it with no missing/unexpected keys, same logits; moesaic.load too."""
    chosen = export_hf(model, tmp_path / "hf", arch=arch if forced else None)
    assert chosen.name == arch
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["architectures"] == [arch]
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(hf_model).__name__ == arch
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, ref = model(ids), hf_model.eval()(ids).logits
        back = load(tmp_path / "hf")(ids)
    scale = float(ref.abs().max())
    assert float((ours - ref).abs().max()) <= 1e-4 * scale, f"{arch}: {float((ours - ref).abs().max()):.2e}"
    assert torch.equal(back, ours) or float((back - ours).abs().max()) <= 1e-6 * scale


def test_sharded_bf16_export(tmp_path):
    model = make_model("qwen2_moe")
    export_hf(model, tmp_path / "hf", dtype=torch.bfloat16, max_shard_bytes=30_000)
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.startswith("model-000") for f in files) > 2
    assert not any(f.startswith(".") for f in files)
    back = load(tmp_path / "hf")
    assert back.embed.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 80, (1, 9))
    with torch.no_grad():
        ref = model.to(torch.bfloat16)(ids).float()
        assert float((back(ids).float() - ref).norm() / ref.norm()) <= 1e-2


@pytest.mark.parametrize("preset, fields, blocker", [
    ("deepseek-mini", dict(shared_expert_gate=True), "GLM-4-MoE needs ungated shared experts"),  # sigmoid + gate
    ("deepseek-mini", dict(qk_norm="full"), "qk_norm='full' (needs 'none')"),  # OLMoE's norm with sigmoid routing
    ("switch-mini", {}, "capacity_factor"),                                        # token dropping
    ("tiny", dict(num_experts=0, rope_scaling={"partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
])
def test_inexpressible_models_name_the_blocker(preset, fields, blocker, tmp_path):
    model = build_model(ModelConfig.preset(preset, n_layers=2, d_model=64, vocab_size=64, **fields))
    with pytest.raises(ArchError, match="no transformers architecture") as e:
        export_hf(model, tmp_path / "hf")
    assert blocker in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_forced_arch_and_existing_folder(tmp_path):
    model = make_model("llama")
    with pytest.raises(ArchError, match="cannot export as MixtralForCausalLM: .*num_experts=0"):
        export_hf(model, tmp_path / "a", arch="MixtralForCausalLM")
    olmoe_wide = make_model("olmoe").config.replace(head_dim=16)
    with pytest.raises(ArchError, match="OlmoeForCausalLM: .*head_dim=16 != d_model / n_heads"):
        export_hf(build_model(olmoe_wide), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_hf(model, tmp_path / "b")
    assert (tmp_path / "b" / "keep.txt").exists()


def test_cli_export_of_a_run_folder(tmp_path):
    from moesaic.checkpoint.native import write_model_files

    model = make_model("mixtral")
    run = tmp_path / "run"
    run.mkdir()
    write_model_files(run, model)
    cmd = [sys.executable, "-m", "moesaic.cli", "export", str(run), str(tmp_path / "hf"), "--format", "hf"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "MixtralForCausalLM" in res.stdout
    ids = torch.randint(0, model.config.vocab_size, (1, 11))
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "hf")(ids), model(ids), atol=1e-6)
    bad = subprocess.run(cmd[:-1] + ["onnx"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--format must be one of" in bad.stderr


def test_export_carries_tokenizer_and_eos(tmp_path):
    from moesaic.checkpoint.native import write_model_files
    from moesaic.tokenizer import Tokenizer
    from test_tokenizer_chat import CHATML, MESSAGES, make_folder

    tok = Tokenizer.from_folder(make_folder(tmp_path / "tok", CHATML))
    model = make_model("mixtral")  # vocab 512 >= the tokenizer's 300
    run = tmp_path / "run"
    run.mkdir()
    write_model_files(run, model, tok)
    export_hf(load(run), tmp_path / "hf", tokenizer_dir=run)
    eos = tok.token_to_id("</s>")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == eos
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == eos
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    want = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_folder(tmp_path / "hf").apply_chat_template(MESSAGES) == want
    assert ref.encode(want, add_special_tokens=False) == tok.encode_chat(MESSAGES)


@pytest.mark.parametrize("case", ["deepseek_v3_noqlora_yarn", "glm4_moe_plain_yarn", "dots1", "llama", "qwen2",
                                  "qwen2_moe_step2", "mistral"])
def test_hf_to_moesaic_to_hf(case, tmp_path):
    """A loaded HF model exported again (RoPE scaling, tying, sparse steps, windows) loads with the same logits."""
    from test_hf_parity import VOCAB, build_hf

    hf = build_hf(case)
    hf.save_pretrained(tmp_path / "a")
    chosen = export_hf(load(tmp_path / "a"), tmp_path / "b")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    assert type(again).__name__ == chosen.name
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, out = hf(ids).logits, again(ids).logits
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("case", ["deepseek_v3", "glm4_moe"])
def test_bf16_export_keeps_deepseek_routing_fp32(case, tmp_path):
    """As transformers keeps DeepSeek's / GLM's gate weight and correction bias fp32, so does the exported file."""
    from safetensors import safe_open

    model = make_model(case)
    export_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    back = load(tmp_path / "hf")
    for i in (1, 2):
        assert torch.equal(back.blocks[i].ffn.router.weight, model.blocks[i].ffn.router.weight)
        assert torch.equal(back.blocks[i].ffn.router.correction_bias, model.blocks[i].ffn.router.correction_bias)
