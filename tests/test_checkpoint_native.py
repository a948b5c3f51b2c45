"""Native checkpoints: round trip, tied embeddings stored once, atomic save under a simulated crash,
leftover temporary folders ignored, a damaged newest checkpoint falls back to the previous one."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moesaic
from moesaic.checkpoint import native
from moesaic.checkpoint.io import atomic_folder, write_text_atomic
from moesaic.config import ModelConfig
from moesaic.model import build_model
from moesaic.tokenizer import Tokenizer
from moesaic.train.config import TrainConfig
from moesaic.train.optim import build_optimizer


def byte_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}}
    tok = HF(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, eos_token_ids=[0])


def trained_pair(cfg: ModelConfig, steps: int = 2):
    model = build_model(cfg).train()
    opt = build_optimizer(model, TrainConfig(preset="tiny", lr=1e-2))
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (2, 9))
        out = model.forward_aux(ids[:, :-1])
        torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_save_then_load_round_trip(tmp_path):
    cfg = ModelConfig.preset("tiny", router="sigmoid_topk", bias_update_rate=0.01, aux_loss_coef=0.0)
    model, opt = trained_pair(cfg)
    with torch.no_grad():
        model.moe_layers()[0].router.correction_bias += torch.arange(cfg.num_experts, dtype=torch.float32)
    tok = byte_tokenizer()
    native.write_run_files(tmp_path, cfg, tok, "{}")
    ck = native.save_checkpoint(tmp_path, model, tok, opt, {"step": 2, "position": 8})
    assert ck.name == "step-00000002"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state"):
        assert (tmp_path / name).exists() and (ck / name).exists()
    assert "model_type" not in json.loads((tmp_path / "config.json").read_text())
    for folder in (tmp_path, ck):
        loaded = moesaic.load(folder)
        assert not loaded.training
        ids = torch.randint(0, cfg.vocab_size, (2, 7))
        torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)
        assert torch.equal(loaded.moe_layers()[0].router.correction_bias,
                           model.moe_layers()[0].router.correction_bias)
    # optimizer moments and RNG come back exactly
    m2 = build_model(cfg)
    o2 = build_optimizer(m2, TrainConfig(preset="tiny", lr=1e-2))
    torch.manual_seed(123)
    state = native.load_trainer_state(ck, m2, o2)
    assert state == {"step": 2, "position": 8}
    for (n, p), (_, p2) in zip(model.named_parameters(), m2.named_parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], o2.state[p2][k]), (n, k)


def test_tied_embeddings_are_stored_once(tmp_path):
    cfg = ModelConfig.preset("tiny", tie_embeddings=True)
    model, opt = trained_pair(cfg)
    native.save_checkpoint(tmp_path, model, byte_tokenizer(), opt, {"step": 1, "position": 0})
    (tmp_path / "config.json").write_text(cfg.to_json())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "embed.weight" in keys and "lm_head.weight" not in keys
    loaded = moesaic.load(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)


def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    cfg = ModelConfig.preset("tiny")
    model, opt = trained_pair(cfg)
    tok = byte_tokenizer()
    native.write_run_files(tmp_path, cfg, tok, "{}")
    native.save_checkpoint(tmp_path, model, tok, opt, {"step": 1, "position": 0})
    before = moesaic.load(tmp_path).state_dict()
    # a save that dies half-way: weights written into the temporary folder, then the process "crashes"
    with pytest.raises(RuntimeError, match="simulated crash"):
        with atomic_folder(tmp_path / "checkpoints" / "step-00000002") as tmp:
            native.write_model_files(tmp, model, tok)
            raise RuntimeError("simulated crash")
    assert [p.name for p in native.list_checkpoints(tmp_path)] == ["step-00000001"]
    # kill -9 leaves a temporary folder behind (no exception handler ran): readers ignore it
    ghost = tmp_path / "checkpoints" / ".tmp-step-00000003-abc"
    ghost.mkdir()
    (ghost / "model.safetensors").write_bytes(b"truncated")
    assert [p.name for p in native.list_checkpoints(tmp_path)] == ["step-00000001"]
    after = moesaic.load(tmp_path).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    native.save_checkpoint(tmp_path, model, tok, opt, {"step": 4, "position": 0})  # next save cleans up
    assert not ghost.exists()
    assert [p.name for p in native.list_checkpoints(tmp_path)] == ["step-00000004"]  # keep=1
    assert os.readlink(tmp_path / "model.safetensors") == "checkpoints/step-00000004/model.safetensors"


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path):
    cfg = ModelConfig.preset("tiny")
    model, opt = trained_pair(cfg)
    tok = byte_tokenizer()
    native.save_checkpoint(tmp_path, model, tok, opt, {"step": 1, "position": 4}, keep=2)
    native.save_checkpoint(tmp_path, model, tok, opt, {"step": 2, "position": 8}, keep=2)
    newest = tmp_path / "checkpoints" / "step-00000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    m2 = build_model(cfg)
    with pytest.warns(UserWarning, match="could not be loaded"):
        ck, state = native.newest_loadable(tmp_path, m2, build_optimizer(m2, TrainConfig(preset="tiny")))
    assert ck.name == "step-00000001" and state["position"] == 4


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        moesaic.load(tmp_path / "missing")
    (tmp_path / "config.json").write_text(ModelConfig.preset("tiny").to_json())
    with pytest.raises(ValueError, match="no complete checkpoint"):
        moesaic.load(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    model, opt = trained_pair(ModelConfig.preset("tiny"))
    native.save_checkpoint(other, model, byte_tokenizer(), opt, {"step": 1, "position": 0})
    (other / "config.json").write_text(ModelConfig.preset("tiny", d_model=128).to_json())
    with pytest.raises(ValueError, match="does not match its config.json|has shape"):
        moesaic.load(other)


def test_atomic_folder_refuses_to_overwrite_and_atomic_file_write(tmp_path):
    (tmp_path / "done").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        with atomic_folder(tmp_path / "done"):
            pass
    write_text_atomic(tmp_path / "a.txt", "one")
    write_text_atomic(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["a.txt", "done"]
