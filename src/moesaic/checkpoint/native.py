"""moesaic run folders: save (atomically), find the newest complete checkpoint, load model and trainer state.

Layout of a run folder:
    config.json  tokenizer.json  tokenizer_config.json  train_config.json  metrics.jsonl
    model.safetensors -> checkpoints/step-N/model.safetensors   (relative symlinks to the newest
    trainer_state     -> checkpoints/step-N/trainer_state        complete checkpoint)
    checkpoints/step-00000N/  config.json model.safetensors tokenizer*.json trainer_state/
        trainer_state/ = optimizer.safetensors + optimizer.json, rng.safetensors, state.json

Every checkpoint folder is complete on its own (`moesaic.load` accepts it as well as the run folder).
Weights and optimizer moments are safetensors; the rest is JSON; nothing is pickled. Tied embeddings
are stored once (lm_head.weight is omitted when config.tie_embeddings).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from moesaic.checkpoint.io import atomic_folder, remove_stale_tmp, replace_link, write_text_atomic
from moesaic.config import ModelConfig

CKPT_DIR = "checkpoints"


# ------------------------------------------------------------------ weights
def model_state(model) -> dict[str, torch.Tensor]:
    """The state dict to store: contiguous CPU tensors, tied head omitted."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def write_model_files(folder: Path, model, tokenizer=None) -> None:
    """config.json + model.safetensors (+ tokenizer files) into an existing folder."""
    from safetensors.torch import save_file

    (folder / "config.json").write_text(model.config.to_json() + "\n")
    save_file(model_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(folder)


def load_native(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A `Transformer` (eval mode) from a run folder or one of its checkpoint folders."""
    from safetensors.torch import load_file

    from moesaic.model import build_model

    path = Path(path)
    cfg = read_model_config(path)
    weights = path / "model.safetensors"
    if not weights.exists():
        raise ValueError(f"{path} has a config.json but no model.safetensors: the run saved no complete "
                         "checkpoint yet")
    model = build_model(cfg)  # real init: non-persistent buffers (RoPE) are computed, not stored
    sd = load_file(str(weights), device="cpu")
    _check_keys(model, sd, weights)
    model.load_state_dict(sd, strict=False)
    model = model.to(device=device or "cpu")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def read_model_config(folder: Path) -> ModelConfig:
    p = Path(folder) / "config.json"
    if not p.exists():
        raise ValueError(f"{folder} has no config.json; is it a moesaic run folder?")
    try:
        return ModelConfig.from_json(p)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{p} is not a valid moesaic model config: {e}") from None


def _check_keys(model, sd: dict[str, torch.Tensor], where: Path) -> None:
    want = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        want.pop("lm_head.weight", None)
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    if missing or extra:
        raise ValueError(f"{where} does not match its config.json: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in want.items():
        if tuple(v.shape) != tuple(sd[k].shape):
            raise ValueError(f"{where}: {k} has shape {tuple(sd[k].shape)}, config.json implies {tuple(v.shape)}")


# ---------------------------------------------------------- optimizer + RNG
# AdamW options that say how a step is computed, not what it computes: a run resumed on another device (or
# without a CUDA graph) keeps its own (a capturable or fused CUDA optimizer's flags would not fit a CPU run)
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _optimizer_tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for g in optimizer.param_groups:
        groups.append({**{k: (float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v)  # a graphed lr
                           for k, v in g.items() if k != "params"},
                       "params": [names[id(p)] for p in g["params"]]})
        for p in g["params"]:
            for key, val in optimizer.state.get(p, {}).items():
                t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
                tensors[f"{names[id(p)]}::{key}"] = t.detach().to("cpu").contiguous()
    return tensors, {"param_groups": groups}


def _load_optimizer(model, optimizer, folder: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = json.loads((folder / "optimizer.json").read_text())
    params = dict(model.named_parameters())
    order: dict[str, int] = {}
    groups = []
    for g in meta["param_groups"]:
        idx = []
        for n in g["params"]:
            if n not in params:
                raise ValueError(f"{folder}: optimizer state names parameter {n!r}, absent from the model")
            order.setdefault(n, len(order))
            idx.append(order[n])
        groups.append({**g, "params": idx})
    for g, now in zip(groups, optimizer.param_groups):  # hyperparameters from the checkpoint; how the step
        for key in IMPLEMENTATION_KEYS:                   # is computed (fused, capturable, ...) from this run
            if key in now:
                g[key] = now[key]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        n, field = key.split("::", 1)
        state.setdefault(order[n], {})[field] = t
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda_{i}"] = s
    return out


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------ save / find
def save_checkpoint(run_dir: str | Path, model, tokenizer, optimizer, state: dict[str, Any],
                    keep: int = 1) -> Path:
    """Write checkpoints/step-N atomically, point the run folder's links at it, then prune old ones.

    `state` must hold "step" (and whatever else the trainer needs back: data position, counters).
    Order matters for crash safety: the new folder is complete before any link moves, and old
    folders are deleted only after the links point at the new one.
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    ckpts = run_dir / CKPT_DIR
    remove_stale_tmp(ckpts)
    final = ckpts / f"step-{int(state['step']):08d}"
    if final.exists():  # the same step saved before (e.g. resumed exactly at a save point)
        return final
    with atomic_folder(final) as tmp:
        write_model_files(tmp, model, tokenizer)
        ts = tmp / "trainer_state"
        ts.mkdir()
        tensors, meta = _optimizer_tensors(model, optimizer)
        save_file(tensors, str(ts / "optimizer.safetensors"))
        (ts / "optimizer.json").write_text(json.dumps(meta, indent=1))
        save_file(_rng_tensors(), str(ts / "rng.safetensors"))
        (ts / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    replace_link(final / "model.safetensors", run_dir / "model.safetensors")
    replace_link(final / "trainer_state", run_dir / "trainer_state")
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are never listed)."""
    ckpts = Path(run_dir) / CKPT_DIR
    if not ckpts.is_dir():
        return []
    found = [p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "trainer_state" / "state.json").exists()]
    return sorted(found, key=lambda p: p.name)


def load_trainer_state(ckpt: str | Path, model, optimizer) -> dict[str, Any]:
    """Restore weights, optimizer moments and RNG states from a checkpoint folder; return state.json."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    sd = load_file(str(ckpt / "model.safetensors"))
    _check_keys(model, sd, ckpt / "model.safetensors")
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=False)
    ts = ckpt / "trainer_state"
    _load_optimizer(model, optimizer, ts)
    _restore_rng(load_file(str(ts / "rng.safetensors")))
    return json.loads((ts / "state.json").read_text())


def newest_loadable(run_dir: str | Path, model, optimizer) -> tuple[Path, dict[str, Any]] | None:
    """Restore from the newest checkpoint that loads; a damaged one is skipped with a warning."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            return ckpt, load_trainer_state(ckpt, model, optimizer)
        except Exception as e:  # a damaged file must not hide an older good checkpoint
            warnings.warn(f"checkpoint {ckpt} could not be loaded ({type(e).__name__}: {e}); trying an older one",
                          stacklevel=2)
    return None


def write_run_files(run_dir: Path, model_cfg: ModelConfig, tokenizer, train_cfg_json: str) -> None:
    """The run folder's constant files (atomic each): model config, tokenizer, training config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.json", model_cfg.to_json() + "\n")
    write_text_atomic(run_dir / "train_config.json", train_cfg_json + "\n")
    tokenizer.save(run_dir)
