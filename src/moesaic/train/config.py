"""TrainConfig: everything a run needs besides the model config, validated field by field."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from moesaic.config import dataclass_from_dict

NONFINITE = ("skip", "stop")
DTYPES = ("auto", "fp32", "bf16")


def _check(cond: bool, name: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"TrainConfig.{name} must be {allowed}, got {value!r}")


@dataclass
class TrainConfig:
    """A training run. Token budget = steps * batch_size * seq_len.

    batch_size sequences per optimizer step are split into micro-batches of micro_batch_size
    (gradient accumulation); the result does not depend on the split (see train.balance).
    """

    preset: str = "small"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to change
    data: str = "builtin"
    vocab_size: int | None = None  # BPE vocabulary; None -> the preset's vocab_size
    val_fraction: float = 0.02
    steps: int = 1000
    batch_size: int = 16
    micro_batch_size: int | None = None  # None -> batch_size (no accumulation)
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    eval_every: int = 100  # 0: only at the end
    eval_windows: int = 64  # validation windows of seq_len tokens per evaluation
    save_every: int = 0  # 0: only at the end
    save_final: bool = True  # False: no checkpoint at the end either (throw-away runs, e.g. benchmarks)
    keep_checkpoints: int = 1
    log_every: int = 1
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bf16 autocast on CUDA with bf16 support, else fp32
    nonfinite: str = "skip"  # non-finite loss or gradient norm: skip the batch, or stop the run
    max_skipped: int = 10  # stop anyway after this many skipped batches in a row
    moe_backend: str = "auto"
    cuda_graph: str = "auto"  # capture the whole step as a CUDA graph where it can be (train/graphed.py); "off"
    progress: bool = True
    dense_twin: str | None = None  # "active" | "total": train the dense twin too, into <out>/dense-<match>

    def __post_init__(self) -> None:
        if self.micro_batch_size is None:
            self.micro_batch_size = self.batch_size
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size", "micro_batch_size", "seq_len", "log_every", "keep_checkpoints",
                     "eval_windows"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, name, "an integer >= 1", v)
        for name in ("warmup_steps", "eval_every", "save_every", "max_skipped"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, name, "an integer >= 0", v)
        _check(self.batch_size % self.micro_batch_size == 0, "micro_batch_size",
               f"a divisor of batch_size={self.batch_size}", self.micro_batch_size)
        _check(self.vocab_size is None or (isinstance(self.vocab_size, int) and self.vocab_size >= 257),
               "vocab_size", "None or an integer >= 257", self.vocab_size)
        _check(self.lr > 0, "lr", "> 0", self.lr)
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _check(0 <= self.beta1 < 1, "beta1", "in [0, 1)", self.beta1)
        _check(0 <= self.beta2 < 1, "beta2", "in [0, 1)", self.beta2)
        _check(self.grad_clip >= 0, "grad_clip", ">= 0 (0 disables)", self.grad_clip)
        _check(0 < self.val_fraction < 1, "val_fraction", "in (0, 1)", self.val_fraction)
        _check(self.nonfinite in NONFINITE, "nonfinite", f"one of {NONFINITE}", self.nonfinite)
        _check(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        _check(self.cuda_graph in ("off", "auto"), "cuda_graph", "'off' or 'auto'", self.cuda_graph)
        _check(self.dense_twin in (None, "active", "total"), "dense_twin", "None, 'active' or 'total'",
               self.dense_twin)

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> TrainConfig:
        d = self.to_dict()
        d.update(changes)
        return TrainConfig.from_dict(d)

    # fields that may differ between a run and its resumption without changing the result
    RESUME_FREE = ("steps", "eval_every", "save_every", "save_final", "keep_checkpoints", "log_every", "progress",
                   "device", "moe_backend", "cuda_graph", "eval_windows", "max_skipped", "nonfinite", "dense_twin")
