import json

import pytest

from moesaic import PRESETS, ModelConfig, build_model


def test_json_round_trip_every_preset(tmp_path):
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        path = tmp_path / f"{name}.json"
        cfg.to_json(path)
        assert ModelConfig.from_json(path) == cfg
        assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("field,value,needle", [
    ("top_k", 9, "top_k"),
    ("router", "hash", "router"),
    ("n_kv_heads", 3, "n_kv_heads"),
    ("capacity_factor", -1.0, "capacity_factor"),
    ("n_group", 3, "n_group"),
    ("d_model", 0, "d_model"),
    ("aux_loss_coef", -0.1, "aux_loss_coef"),
])
def test_validation_names_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig.preset("tiny", **{field: value})


def test_unknown_field_and_preset_are_clear_errors():
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"d_model": 64, "bogus": 1})
    with pytest.raises(ValueError, match="available presets"):
        ModelConfig.preset("nope")


def test_switch_requires_top1():
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig.preset("tiny", router="switch", top_k=2)


def test_moe_layer_pattern():
    cfg = ModelConfig.preset("tiny", n_layers=6, first_dense_layers=1, moe_every=2, mlp_only_layers=[4])
    # after 1 dense layer, every 2nd layer is MoE (2, 4, ...) except forced-dense 4
    assert cfg.moe_layers == [2]
    cfg = ModelConfig.preset("tiny", n_layers=4, moe_every=2)  # Qwen2-MoE decoder_sparse_step=2
    assert cfg.moe_layers == [1, 3]


@pytest.mark.parametrize("match", ["active", "total"])
def test_dense_twin_matches_parameter_count(match):
    cfg = ModelConfig.preset("small")
    twin = cfg.dense_twin(match)
    assert not twin.is_moe and twin.d_model == cfg.d_model and twin.n_layers == cfg.n_layers
    moe_pc = build_model(cfg.replace(vocab_size=64)).count_params()
    dense_pc = build_model(twin.replace(vocab_size=64)).count_params()
    target = moe_pc.active if match == "active" else moe_pc.total
    # the dense FFN is rounded to a multiple of 8: within 1% of the target
    assert abs(dense_pc.total - target) / target < 0.01
    assert dense_pc.active == dense_pc.total


def test_dense_twin_bad_match():
    with pytest.raises(ValueError, match="active"):
        ModelConfig.preset("tiny").dense_twin("half")
