"""Checkpoints: `load` dispatches a folder to the native or the Hugging Face reader.

A folder whose config.json has "model_type" or "architectures" is a Hugging Face folder
(checkpoint.hf); otherwise it is a moesaic run folder (checkpoint.native).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def is_hf_folder(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON: {e}") from None
    return "model_type" in d or "architectures" in d


def load(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load a model (moesaic.model.Transformer, eval mode) from a run folder or a local HF folder."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder; pass a moesaic run folder or a Hugging Face model folder")
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json; is it a model folder?")
    if is_hf_folder(path):
        from moesaic.checkpoint.hf import load_hf

        return load_hf(path, device=device, dtype=dtype)
    from moesaic.checkpoint.native import load_native

    return load_native(path, device=device, dtype=dtype)
