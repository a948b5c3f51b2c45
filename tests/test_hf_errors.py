"""Bad Hugging Face folders get errors that name the tensor and the architecture; nothing is unpickled or imported."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from moesaic.checkpoint import load  # noqa: E402
from moesaic.checkpoint.archs import ArchError  # noqa: E402
from test_hf_parity import VOCAB, build_hf  # noqa: E402


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    build_hf("mixtral").save_pretrained(d)
    return d


def _copy(src, dst, *, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if config:
        cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(src / "model.safetensors"))
    if tensors is not None:
        state = tensors(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_unknown_architecture(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path / "x", config={"architectures": ["FooForCausalLM"], "model_type": "foo"})
    with pytest.raises(ArchError, match=r"'FooForCausalLM' is not supported .*MixtralForCausalLM"):
        load(d)
    d2 = _copy(mixtral_dir, tmp_path / "y", config={"architectures": ["GptOssForCausalLM"]})
    with pytest.raises(ArchError, match="attention sinks"):
        load(d2)


def test_missing_tensor(mixtral_dir, tmp_path):
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    d = _copy(mixtral_dir, tmp_path / "x", tensors=lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(ArchError, match=rf"MixtralForCausalLM: tensor '{key}' is missing"):
        load(d)


def test_extra_tensor(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path / "x", tensors=lambda s: {**s, "model.layers.0.mystery.weight": torch.ones(2)})
    with pytest.raises(ArchError, match=r"MixtralForCausalLM: unexpected tensor\(s\) \['model.layers.0.mystery"):
        load(d)


def test_shape_mismatch(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path / "x", config={"intermediate_size": 20})
    with pytest.raises(ArchError, match=r"MixtralForCausalLM: tensor 'model.layers.0.block_sparse_moe.experts.0.w1"
                                        r".weight' has shape \(24, 32\), expected \(20, 32\)"):
        load(d)


def test_quantized_checkpoint_refused(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path / "x", config={"quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ArchError, match="quantized checkpoints \\(fp8\\)"):
        load(d)


class _Bomb:
    """Unpickling this writes a marker file: proof that nothing was unpickled if the file is absent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_only_folder_is_refused_without_unpickling(mixtral_dir, tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "config.json").write_text((mixtral_dir / "config.json").read_text())
    marker = tmp_path / "UNPICKLED"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Bomb(str(marker))))
    with pytest.raises(ValueError, match="pickle .* can execute arbitrary code"):
        load(d)
    assert not marker.exists()


def test_code_in_the_folder_is_never_imported(mixtral_dir, tmp_path):
    marker = tmp_path / "IMPORTED"
    d = _copy(mixtral_dir, tmp_path / "x", config={"auto_map": {"AutoModelForCausalLM": "evil.EvilModel"}})
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass EvilModel: pass\n")
    model = load(d)
    assert type(model).__name__ == "Transformer" and not marker.exists()


def test_deepseek_mtp_layers_are_skipped(tmp_path):
    hf = build_hf("deepseek_v3")
    hf.save_pretrained(tmp_path / "a")

    def add_mtp(s):
        n = hf.config.num_hidden_layers
        return {**s, f"model.layers.{n}.eh_proj.weight": torch.ones(4, 8),
                f"model.layers.{n}.enorm.weight": torch.ones(32)}

    d = _copy(tmp_path / "a", tmp_path / "b", tensors=add_mtp)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.allclose(load(d)(ids), hf(ids).logits, atol=1e-5)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    with pytest.raises(ArchError, match="MixtralForCausalLM: config.json lacks '"):
        load(tmp_path)
