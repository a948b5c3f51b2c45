"""The quickstart's decode-speed probe runs the inference engine on a copy: the model it is given stays as it was."""

from __future__ import annotations

import torch

from moesaic import ModelConfig, build_model
from moesaic.commands.quickstart import decode_speed


def test_decode_speed_uses_a_copy_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                    num_experts=4, top_k=2, expert_ffn=16, ffn=32)).eval()
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids)
    speed = decode_speed(model, prompt_len=4, new_tokens=6)
    assert speed > 0
    assert [type(m) for m in model.modules()] == classes  # no module switched to the engine's C classes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(model(ids), before)
