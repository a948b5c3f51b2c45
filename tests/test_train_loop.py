"""The Trainer end to end on a tiny corpus: run folder and metrics, dense twin, upcycling, bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moesaic
from moesaic.cli import app
from moesaic.config import ModelConfig
from moesaic.data.corpus import builtin_files
from moesaic.data.tokens import prepare_data
from moesaic.model import build_model
from moesaic.train import TrainConfig, Trainer, TrainingStopped
from moesaic.train.hardware import check_fits
from moesaic.train.run import train_run
from moesaic.train.upcycle import upcycle, upcycled_config


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    files = sorted((p for p in builtin_files() if 2000 < p.stat().st_size < 12000), key=lambda p: p.name)[:20]
    for i, p in enumerate(files):
        shutil.copy(p, d / f"{i:03d}_{p.name}")
    return d


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    c = tmp_path_factory.getbasetemp() / "moesaic-cache"
    monkeypatch.setenv("MOESAIC_CACHE", str(c))
    return c


def quick(corpus_dir, **kw) -> TrainConfig:
    base = dict(preset="tiny", data=str(corpus_dir), steps=4, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1,
                eval_every=2, eval_windows=4, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_run_folder_metrics_and_load(corpus_dir, cache, tmp_path):
    res = train_run(quick(corpus_dir, progress=True), tmp_path / "run", log=lambda s: None)  # bar on, no TTY
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    for r in steps:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "imbalance", "dropped", "aux_loss"} <= set(r)
    assert steps[-1]["tokens"] == 4 * 4 * 32
    assert res.summary["val_loss"] == evals[-1]["val_loss"]
    model = moesaic.load(tmp_path / "run")
    assert model.config == res.model_config and not model.training
    again = train_run(quick(corpus_dir), tmp_path / "run", resume=True, log=lambda s: None)  # already done
    assert again.summary["steps"] == 4
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == len(rows)


def test_dense_twin_same_tokens_same_active_params(corpus_dir, cache, tmp_path):
    res = train_run(quick(corpus_dir, dense_twin="active", steps=2), tmp_path / "run", log=lambda s: None)
    twin = moesaic.load(res.twin.out)
    moe = moesaic.load(res.out)
    assert not twin.config.is_moe and res.twin.summary["tokens"] == res.summary["tokens"]
    ratio = twin.count_params().active / moe.count_params().active
    assert 0.95 < ratio < 1.05


def test_upcycled_moe_computes_the_dense_function_at_step_zero():
    dense_cfg = ModelConfig.preset("tiny", num_experts=0, ffn=96)
    dense = build_model(dense_cfg).eval()
    moe_cfg = upcycled_config(dense_cfg, num_experts=4, top_k=2)
    moe = upcycle(dense, moe_cfg, noise=0.0).eval()
    ids = torch.randint(0, dense_cfg.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids), dense(ids), rtol=1e-5, atol=1e-5)
        noisy = upcycle(dense, moe_cfg, noise=0.05).eval()
        assert not torch.allclose(noisy(ids), dense(ids), atol=1e-5)
    assert moe.count_params().total > dense.count_params().total
    with pytest.raises(ValueError, match="already an MoE"):
        upcycled_config(moe_cfg, 8)


def test_init_from_dense_run_via_cli(corpus_dir, cache, tmp_path):
    runner = CliRunner()
    common = ["--preset", "tiny", "--data", str(corpus_dir), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
              "--no-progress", "--device", "cpu"]
    r = runner.invoke(app, ["train", *common, "--set", "num_experts=0", "--out", str(tmp_path / "dense")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", *common, "--init-from", str(tmp_path / "dense"), "--num-experts", "4",
                            "--out", str(tmp_path / "moe")])
    assert r.exit_code == 0, r.output
    moe = moesaic.load(tmp_path / "moe")
    assert moe.config.num_experts == 4 and moe.config.expert_ffn == moesaic.load(tmp_path / "dense").config.ffn
    assert (tmp_path / "moe" / "tokenizer.json").read_text() == (tmp_path / "dense" / "tokenizer.json").read_text()


def _nan_model(cfg):
    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():
        m.embed.weight.fill_(float("nan"))
    return m


def test_nonfinite_loss_skips_or_stops_without_touching_weights(corpus_dir, cache, tmp_path):
    tc = quick(corpus_dir, nonfinite="skip", max_skipped=2, steps=5)
    cfg = ModelConfig.preset("tiny")
    tok, data, _ = prepare_data(tc.data, cfg.vocab_size)
    model = _nan_model(cfg)
    w_before = model.blocks[0].attn.wq.weight.detach().clone()
    tr = Trainer(cfg, tc, tmp_path / "skip", tok, data, init_model=model, log=lambda s: None)
    with pytest.raises(TrainingStopped, match="3 batches in a row skipped"):
        tr.fit()
    assert torch.equal(model.blocks[0].attn.wq.weight, w_before)
    assert not (tmp_path / "skip" / "checkpoints").exists()
    tr = Trainer(cfg, tc.replace(nonfinite="stop"), tmp_path / "stop", tok, data, init_model=_nan_model(cfg),
                 log=lambda s: None)
    with pytest.raises(TrainingStopped, match="non-finite loss"):
        tr.fit()


def test_bad_input_is_a_clear_error(corpus_dir, cache, tmp_path):
    huge = ModelConfig.preset("tiny", d_model=16384, n_heads=64, vocab_size=2_000_000, num_experts=64, expert_ffn=8192)
    with pytest.raises(ValueError, match="GiB"):
        check_fits(huge, 64, 4096, torch.device("cpu"))
    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainConfig(batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="nonfinite"):
        TrainConfig(nonfinite="ignore")
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no such file" in str(r.exception)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        from moesaic.commands.train import parse_overrides
        parse_overrides(["num_experts"])
