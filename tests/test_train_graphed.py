"""The captured training step (train/graphed.py): its sync-free body against the eager step, on CPU; the
capture itself on CUDA (gpu-marked)."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from moesaic.config import ModelConfig
from moesaic.model import build_model
from moesaic.train.graphed import GraphedStep, device_step, unsupported_reason
from moesaic.train.step import forward_backward, split_batch, update_biases

CFG = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, ffn=64,
           num_experts=8, top_k=2, expert_ffn=16, num_shared_experts=1, shared_ffn=16, router="sigmoid_topk",
           aux_loss_coef=0.01, z_loss_coef=1e-3, bias_update_rate=1e-2, routed_scaling_factor=2.5)


def _pair():
    cfg = ModelConfig(**CFG)
    torch.manual_seed(0)
    a = build_model(cfg)
    b = build_model(cfg)
    b.load_state_dict(a.state_dict())
    return a, b


def _fused_adamw(model, lr=1e-2):
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, ValueError) as e:  # a torch without fused CPU AdamW
        pytest.skip(f"fused AdamW unavailable on CPU: {e}")


def _eager_step(model, opt, batch, clip=1.0):
    opt.zero_grad(set_to_none=True)
    st = forward_backward(model, split_batch(batch, batch.shape[0]))
    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    opt.step()
    update_biases(model, st.counts_LE)
    return st, gnorm


def test_device_step_equals_eager_step():
    eager, graphless = _pair()
    oe, og = _fused_adamw(eager), _fused_adamw(graphless)
    found = torch.zeros(())
    og.found_inf = found
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = torch.randint(0, CFG["vocab_size"], (4, 17), generator=g)
        st, gnorm = _eager_step(eager, oe, batch)
        og.zero_grad(set_to_none=True)
        out = device_step(graphless, batch[:, :-1], batch[:, 1:], contextlib.nullcontext, 1.0, og,
                          found)
        assert float(found) == 0.0
        assert float(out["lm"]) == pytest.approx(st.lm_loss, rel=1e-6)
        assert float(out["aux"]) == pytest.approx(st.aux_loss, rel=1e-6)
        assert float(out["z"]) == pytest.approx(st.z_loss, rel=1e-6)
        assert float(out["gnorm"]) == pytest.approx(gnorm, rel=1e-5)
        assert torch.equal(out["counts_LE"], torch.stack(st.counts_LE))
    for (n, p), q in zip(eager.named_parameters(), graphless.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    for (n, b), c in zip(eager.named_buffers(), graphless.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=n)


def test_device_step_leaves_everything_alone_on_a_nonfinite_loss():
    model, _ = _pair()
    opt = _fused_adamw(model)
    found = torch.zeros(())
    opt.found_inf = found
    batch = torch.randint(0, CFG["vocab_size"], (2, 9))
    opt.zero_grad(set_to_none=True)
    device_step(model, batch[:, :-1], batch[:, 1:], contextlib.nullcontext, 1.0, opt, found)
    name, p0 = [(n, p) for n, p in model.named_parameters() if "norm" in n][-1]  # every token passes it
    with torch.no_grad():
        p0.view(-1)[0] = float("nan")  # the forward turns non-finite
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    steps = [s["step"].clone() for s in opt.state.values()]
    opt.zero_grad(set_to_none=True)
    out = device_step(model, batch[:, :-1], batch[:, 1:], contextlib.nullcontext, 1.0, opt, found)
    assert float(found) == 1.0 and not math.isfinite(float(out["total"]))
    for n, t in [*model.named_parameters(), *model.named_buffers()]:  # weights, moments-driven updates, biases
        torch.testing.assert_close(t, before[n], rtol=0, atol=0, equal_nan=True, msg=n)
    assert [s["step"] for s in opt.state.values()] == steps


def test_unsupported_reasons_and_lr_tensor_in_checkpoint_json():
    from moesaic.checkpoint.native import _optimizer_tensors
    from moesaic.train.config import TrainConfig

    model, _ = _pair()
    tc = TrainConfig(preset="tiny", steps=2, batch_size=4, seq_len=16)
    assert "CUDA" in unsupported_reason(model, tc, torch.device("cpu"))
    acc = TrainConfig(preset="tiny", steps=2, batch_size=4, micro_batch_size=2, seq_len=16)
    assert "accumulation" in unsupported_reason(model, acc, torch.device("cuda"))
    srt = TrainConfig(preset="tiny", steps=2, batch_size=4, seq_len=16, moe_backend="sorted")
    assert "sorted" in unsupported_reason(model, srt, torch.device("cuda"))
    with pytest.raises(ValueError, match="cuda_graph"):
        TrainConfig(preset="tiny", cuda_graph="yes")
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(3e-3))
    _, meta = _optimizer_tensors(model, opt)
    assert json.loads(json.dumps(meta))["param_groups"][0]["lr"] == pytest.approx(3e-3)


def test_trainer_with_cuda_graph_auto_on_cpu_trains_eagerly(tmp_path):
    from moesaic.data.tokens import prepare_data
    from moesaic.train import TrainConfig, Trainer

    text = tmp_path / "corpus.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    tok, data, _ = prepare_data(str(text), 300, cache_dir=tmp_path / "cache")
    tc = TrainConfig(preset="tiny", data=str(text), steps=2, batch_size=2, seq_len=16, eval_every=0, eval_windows=1,
                     progress=False, cuda_graph="auto", device="cpu")
    lines: list[str] = []
    Trainer(ModelConfig(**CFG), tc, tmp_path / "run", tok, data, log=lines.append).fit()
    assert not any("CUDA graph" in s for s in lines)  # nothing to say on CPU
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"loss"') == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_step_matches_eager_steps_on_cuda():
    from moesaic.train.config import TrainConfig
    from moesaic.train.optim import build_optimizer

    cfg = ModelConfig(**{**CFG, "d_model": 128, "ffn": 256, "expert_ffn": 64, "shared_ffn": 64})
    torch.manual_seed(0)
    eager = build_model(cfg).cuda()
    graphed = build_model(cfg).cuda()
    graphed.load_state_dict(eager.state_dict())
    for m in (eager, graphed):
        m.set_moe_backend("triton")
    tc = TrainConfig(preset="tiny", steps=10, batch_size=4, seq_len=32, lr=3e-3, device="cuda")
    oe, og = build_optimizer(eager, tc), build_optimizer(graphed, tc)

    def ac():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (4, 33), device="cuda", generator=g) for _ in range(5)]
    step = GraphedStep(graphed, og, tc, ac, batches[0])
    for i, batch in enumerate(batches):
        for grp in oe.param_groups:
            grp["lr"] = 3e-3
        oe.zero_grad(set_to_none=True)
        st = forward_backward(eager, split_batch(batch, 4), ac)
        gn = float(torch.nn.utils.clip_grad_norm_(eager.parameters(), tc.grad_clip))
        oe.step()
        update_biases(eager, st.counts_LE)
        sg, gng = step.run(batch, 3e-3)
        assert sg.lm_loss == pytest.approx(st.lm_loss, rel=2e-2), i
        assert gng == pytest.approx(gn, rel=5e-2), i
    for (n, p), q in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(q, p, rtol=5e-2, atol=5e-3, msg=n)


def test_resume_keeps_this_runs_optimizer_implementation(tmp_path):
    """A checkpoint written by a graphed CUDA run (fused, capturable, tensor lr) loads into a CPU run's
    optimizer with the CPU run's own implementation flags and the checkpoint's hyperparameters."""
    from safetensors.torch import save_file

    from moesaic.checkpoint.native import _load_optimizer, _optimizer_tensors

    model, _ = _pair()
    saved_opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(2e-3), betas=(0.9, 0.95))
    saved_opt.param_groups[0].update(fused=True, capturable=True)
    tensors, meta = _optimizer_tensors(model, saved_opt)
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    (tmp_path / "optimizer.json").write_text(json.dumps(meta))
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, foreach=False)
    _load_optimizer(model, opt, tmp_path)
    g = opt.param_groups[0]
    assert g["lr"] == pytest.approx(2e-3) and tuple(g["betas"]) == (0.9, 0.95)
    assert not g["capturable"] and not g["fused"] and g["foreach"] is False
