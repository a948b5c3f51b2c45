"""Export a moesaic model as a Hugging Face folder that `transformers.AutoModelForCausalLM` loads.

Plan of `export_hf`:
 1. pick the architecture that expresses the config (Mixtral-style for plain softmax top-k, Qwen2-MoE /
    Qwen3-MoE / OLMoE / DeepSeek-V3 (MLA) / GLM-4-MoE (sigmoid routing, GQA) where their features fit,
    Llama / Qwen2 / Qwen3 for dense models);
    a model none can express gets an error listing, per architecture, the feature that blocks it;
 2. write everything into a temporary sibling folder: config.json, generation_config.json,
    safetensors with per-expert names (sharded past `max_shard_bytes`), tokenizer files when given;
 3. rename the folder onto OUT (nothing half-written is ever visible under OUT).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moesaic.checkpoint.archs import Arch, for_export
from moesaic.checkpoint.archs.base import split_for_export
from moesaic.checkpoint.safetensors_io import atomic_write_text, write_sharded
from moesaic.model import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
_DTYPE_STR = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_tensors(model: Transformer, arch: Arch, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of the model under `arch`'s key map (per-expert names), one at a time."""
    cfg = model.config
    state = model.state_dict()
    pairs = (p for entry in arch.entries(cfg, None) for p in split_for_export(entry, state[entry.ours]))
    for name, t in itertools.chain(pairs, arch.export_extra(cfg)):
        t = arch.export_adjust(cfg, name, t.detach())
        if dtype is not None and t.is_floating_point() and not arch.keep_fp32(name):
            t = t.to(dtype)
        yield name, t.contiguous()


def hf_config_dict(model: Transformer, arch: Arch, dtype: torch.dtype,
                   eos_token_ids: list[int] | None = None, bos_token_id: int | None = None) -> dict[str, Any]:
    d = arch.to_hf(model.config)
    d["dtype"] = _DTYPE_STR.get(dtype, "float32")
    # Explicit None: otherwise transformers fills in the architecture's default ids (e.g. OLMoE's eos 50279).
    d.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if eos_token_ids:
        d["eos_token_id"] = eos_token_ids[0] if len(eos_token_ids) == 1 else list(eos_token_ids)
    if bos_token_id is not None:
        d["bos_token_id"] = bos_token_id
    return d


def export_hf(model: Transformer, out: str | Path, *, arch: str | None = None, tokenizer_dir: str | Path | None = None,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False) -> Arch:
    """Write `model` as a Hugging Face folder at `out` (see module docstring). Returns the architecture used."""
    out = Path(out)
    chosen = for_export(model.config, arch)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose a new folder (or pass overwrite=True)")
    dtype = dtype or model.embed.weight.dtype
    eos, bos = _token_ids(tokenizer_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        write_sharded(tmp, hf_tensors(model, chosen, dtype), max_shard_bytes=max_shard_bytes)
        atomic_write_text(tmp / "config.json",
                          json.dumps(hf_config_dict(model, chosen, dtype, eos, bos), indent=2) + "\n")
        gen: dict[str, Any] = {"_from_model_config": False}
        if eos:
            gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        if bos is not None:
            gen["bos_token_id"] = bos
        atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).exists():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return chosen


def _token_ids(tokenizer_dir: str | Path | None) -> tuple[list[int], int | None]:
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").exists():
        return [], None
    from moesaic.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tokenizer_dir)
    return list(tok.eos_token_ids), tok.bos_token_id
