"""Device and precision choice, and a memory estimate made before anything big is allocated."""

from __future__ import annotations

import contextlib
import functools

import torch

from moesaic.config import ModelConfig
from moesaic.memory import available_memory


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else must name a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported for training")
    return dev


def autocast_for(device: torch.device, dtype: str):
    """A zero-argument context factory: bf16 autocast when asked (auto: CUDA with bf16 support), else none."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not use_bf16:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def estimate_train_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int) -> int:
    """Rough upper estimate of training memory: fp32 weights + grads + AdamW moments + activations."""
    d, layers = cfg.d_model, cfg.n_layers
    ffn_total = sum(cfg.ffn_params_per_layer(i, active=False) for i in range(layers))
    attn = layers * d * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + layers * cfg.n_heads * cfg.head_dim * d
    params = ffn_total + attn + 2 * cfg.vocab_size * d
    tokens = micro_batch * seq_len
    hidden = max(cfg.ffn, (cfg.top_k * cfg.expert_ffn + cfg.shared_ffn) if cfg.is_moe else 0)
    per_token = layers * (24 * d + 4 * hidden + cfg.n_heads * seq_len) + 3 * cfg.vocab_size
    return 16 * params + 4 * tokens * per_token


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_memory()


def check_fits(cfg: ModelConfig, micro_batch: int, seq_len: int, device: torch.device) -> None:
    """Raise a ValueError before allocating when the run clearly cannot fit in memory."""
    need = estimate_train_bytes(cfg, micro_batch, seq_len)
    have = available_bytes(device)
    if have is not None and need > 0.9 * have:
        raise ValueError(f"training this config needs about {need / 2**30:.1f} GiB on {device}, "
                         f"{have / 2**30:.1f} GiB is available; lower --micro-batch-size or --seq-len, "
                         "or choose a smaller preset")
