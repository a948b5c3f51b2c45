"""A whole run from settings: data + tokenizer, model (fresh, or upcycled from a dense run), the loop,
and optionally the dense twin trained on the same data and token budget. Used by `moesaic train` and
`moesaic quickstart`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moesaic.config import ModelConfig
from moesaic.train.config import TrainConfig


@dataclass
class RunResult:
    out: Path
    model_config: ModelConfig
    summary: dict[str, Any]
    twin: RunResult | None = None
    corpus_info: dict[str, Any] = field(default_factory=dict)


def model_config_for(cfg: TrainConfig) -> ModelConfig:
    """The preset with its overrides; vocab_size follows TrainConfig.vocab_size when set."""
    overrides = dict(cfg.model_overrides)
    if cfg.vocab_size is not None:
        overrides["vocab_size"] = cfg.vocab_size
    return ModelConfig.preset(cfg.preset, **overrides)


def train_run(cfg: TrainConfig, out: str | Path, resume: bool = False, init_from: str | Path | None = None,
              num_experts: int | None = None, top_k: int = 2, upcycle_noise: float = 0.0,
              cache_dir: str | Path | None = None, log=print) -> RunResult:
    """Prepare data, train (or resume) into `out`, then the dense twin into `out/dense-<match>` if asked."""
    from moesaic.data.tokens import prepare_data
    from moesaic.train.loop import Trainer

    out = Path(out)
    init_model, tokenizer = None, None
    if init_from is not None:
        model_cfg, init_model, tokenizer = _upcycled(cfg, init_from, num_experts, top_k, upcycle_noise)
    else:
        if num_experts is not None:
            raise ValueError("--num-experts only applies with --init-from (upcycling); use --set num_experts=N "
                             "to change a preset")
        model_cfg = model_config_for(cfg)
    log(f"data: {cfg.data} (tokenizer vocab {model_cfg.vocab_size})")
    tokenizer, data, corpus = prepare_data(cfg.data, model_cfg.vocab_size, cfg.val_fraction, cache_dir, tokenizer)
    info = {"train_tokens": int(len(data.train)), "val_tokens": int(len(data.val)),
            "train_docs": len(corpus.train), "val_docs": len(corpus.val), "skipped_files": len(corpus.skipped)}
    log(f"data: {info['train_docs']} train / {info['val_docs']} val documents, {info['train_tokens']:,} / "
        f"{info['val_tokens']:,} tokens; {info['skipped_files']} file(s) skipped")
    trainer = Trainer(model_cfg, cfg, out, tokenizer, data, resume=resume, init_model=init_model, log=log)
    result = RunResult(out, model_cfg, trainer.fit(), corpus_info=info)
    if cfg.dense_twin is not None:
        twin_cfg = model_cfg.dense_twin(cfg.dense_twin)
        twin_out = out / f"dense-{cfg.dense_twin}"
        twin = Trainer(twin_cfg, cfg.replace(dense_twin=None), twin_out, tokenizer, data, resume=resume, log=log)
        result.twin = RunResult(twin_out, twin_cfg, twin.fit(), corpus_info=info)
    return result


def _upcycled(cfg: TrainConfig, init_from, num_experts, top_k, noise):
    from moesaic.checkpoint.native import load_native
    from moesaic.tokenizer import Tokenizer
    from moesaic.train.upcycle import upcycle, upcycled_config

    if num_experts is None:
        raise ValueError("--init-from needs --num-experts N (how many copies of each dense FFN)")
    dense = load_native(init_from)
    moe_cfg = upcycled_config(dense.config, num_experts, top_k, **cfg.model_overrides)
    return moe_cfg, upcycle(dense, moe_cfg, noise=noise, seed=cfg.seed), Tokenizer.from_folder(init_from)
