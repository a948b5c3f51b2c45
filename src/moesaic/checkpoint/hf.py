"""Load a local Hugging Face model folder into a moesaic `Transformer` (and write one back: export.py).

Plan of `load_hf`:
 1. read config.json; pick the architecture from moesaic's registry (never from code in the folder);
    refuse quantized checkpoints and pickle-only folders;
 2. build the model skeleton on the meta device (no memory, no random init), give it real storage once;
 3. for every key-map entry, copy the memory-mapped safetensors tensor(s) straight into the destination
    parameter (experts are written expert by expert into the stacked w13/w2, so no second copy exists);
 4. check: every checkpoint tensor was used or is known-ignorable, every model tensor was filled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moesaic.checkpoint.archs import Arch, ArchError, resolve
from moesaic.checkpoint.archs.base import Cat, Copy, Entry, Experts
from moesaic.checkpoint.safetensors_io import SafetensorsReader
from moesaic.config import ModelConfig
from moesaic.model import Transformer
from moesaic.model.rope import RotaryEmbedding, rope_inv_freq

# Kept in fp32 whatever the model dtype (routing decisions are precision-sensitive; DeepSeek stores them fp32).
FP32_SUFFIXES = (".router.weight", ".router.correction_bias")
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_hf_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "config.json"
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None


def hf_to_config(d: dict[str, Any]) -> tuple[Arch, ModelConfig]:
    """(architecture, ModelConfig) for a config.json dict."""
    arch = resolve(d)
    if d.get("quantization_config"):
        method = d["quantization_config"].get("quant_method", "?")
        raise ArchError(f"{arch.name}: quantized checkpoints ({method}) are not supported; "
                        "use a bf16/fp16/fp32 copy of the weights")
    return arch, arch.to_config(d)


def load_hf(path: str | Path, device: str | torch.device | None = None,
            dtype: torch.dtype | None = None) -> Transformer:
    """A `Transformer` in eval mode with the weights of a local HF folder (see module docstring)."""
    path = Path(path)
    hf_cfg = read_hf_config(path)
    arch, cfg = hf_to_config(hf_cfg)
    with SafetensorsReader(path) as reader:
        dtype = dtype or _default_dtype(reader, hf_cfg)
        model = _empty_model(cfg, torch.device(device or "cpu"), dtype)
        entries = arch.entries(cfg, set(reader.names()))
        targets = dict(model.state_dict(keep_vars=True))
        if cfg.tie_embeddings:
            targets.pop("lm_head.weight", None)
        filled: set[str] = set()
        for entry in entries:
            if entry.ours not in targets:
                raise ArchError(f"{arch.name}: key map names {entry.ours!r}, which the moesaic model lacks")
            _fill(reader, entry, targets[entry.ours].data, arch)
            filled.add(entry.ours)
        _check_complete(reader, arch, cfg, set(targets) - filled)
    return model.eval()


def _default_dtype(reader: SafetensorsReader, d: dict[str, Any]) -> torch.dtype:
    """The checkpoint's own floating dtype (config 'dtype'/'torch_dtype', else the stored tensors')."""
    name = d.get("dtype") or d.get("torch_dtype")
    if name in _DTYPE_NAMES:
        return _DTYPE_NAMES[name]
    found = reader.dtypes() - {torch.float64}
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if dt in found:
            return dt
    return torch.float32


def _empty_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Uninitialised storage in the right dtype; routers fp32; RoPE tables recomputed (they are not weights)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives each module its own storage: tie again
        model.lm_head.weight = model.embed.weight
    for name, p in model.named_parameters():
        if name.endswith(FP32_SUFFIXES):
            p.data = torch.empty(p.shape, dtype=torch.float32, device=device)
    for mod in model.modules():
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if isinstance(mod, RotaryEmbedding) and bname == "inv_freq":
                mod.inv_freq = rope_inv_freq(2 * buf.numel(), cfg.rope_theta, cfg.rope_scaling)[0].to(device)
            elif bname == "correction_bias":
                setattr(mod, bname, torch.zeros(buf.shape, dtype=torch.float32, device=device))
            elif bname in mod._non_persistent_buffers_set:
                raise RuntimeError(f"load_hf does not know how to rebuild buffer {type(mod).__name__}.{bname}")
    return model


def _source(reader: SafetensorsReader, key: str, shape: tuple[int, ...], arch: Arch) -> torch.Tensor:
    if key not in reader:
        raise ArchError(f"{arch.name}: tensor {key!r} is missing from the checkpoint")
    t = reader.get(key)
    if tuple(t.shape) != tuple(shape):
        raise ArchError(f"{arch.name}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                        "from config.json")
    return t


def _fill(reader: SafetensorsReader, entry: Entry, dest: torch.Tensor, arch: Arch) -> None:
    """Copy the entry's HF tensor(s) into dest (converting dtype/device on the way)."""
    with torch.no_grad():
        if isinstance(entry, Copy):
            dest.copy_(_source(reader, entry.key, tuple(dest.shape), arch))
        elif isinstance(entry, Cat):
            for part, key in zip(dest.chunk(len(entry.keys), dim=0), entry.keys, strict=True):
                part.copy_(_source(reader, key, tuple(part.shape), arch))
        elif isinstance(entry, Experts):
            if entry.fused in reader:
                dest.copy_(_source(reader, entry.fused, tuple(dest.shape), arch))
                return
            k = len(entry.per_expert)
            for e in range(entry.n):
                for part, fmt in zip(dest[e].chunk(k, dim=0), entry.per_expert, strict=True):
                    part.copy_(_source(reader, fmt.format(e=e), tuple(part.shape), arch))
        else:  # pragma: no cover - the Entry union is closed
            raise TypeError(entry)


def _check_complete(reader: SafetensorsReader, arch: Arch, cfg: ModelConfig, unfilled: set[str]) -> None:
    extra = sorted(k for k in reader.names() if k not in reader.used and not arch.ignored(k, cfg))
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ArchError(f"{arch.name}: unexpected tensor(s) {extra[:5]}{more} in the checkpoint; config.json "
                        "does not describe them")
    if unfilled:
        raise ArchError(f"{arch.name}: the key map leaves moesaic tensor(s) {sorted(unfilled)[:5]} unfilled")
