"""Safetensors folders: a memory-mapped reader over one or many shards, and an atomic sharded writer.

Only safetensors are ever read. A folder that holds only pickle checkpoints (`pytorch_model.bin`, `*.pt`,
`*.pth`, `*.ckpt`) gets an error explaining why they are refused; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _pickle_error(folder: Path, found: list[str]) -> ValueError:
    return ValueError(
        f"{folder} holds only pickle checkpoint files ({', '.join(found[:4])}); moesaic reads safetensors only, "
        "because unpickling a file can execute arbitrary code. Convert it once in an environment you trust, e.g. "
        "`python -c \"from transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained('{folder}').save_pretrained('OUT', safe_serialization=True)\"` "
        "(this unpickles the files: do it only for a source you trust), then load OUT.")


def shard_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder: from the index when there is one, else model.safetensors
    (or the only *.safetensors file). Raises ValueError for pickle-only or empty folders."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
        names = sorted(set(weight_map.values()))
        for n in names:
            if Path(n).name != n or not n.endswith(".safetensors"):
                raise ValueError(f"{index} names shard {n!r}; shards must be *.safetensors files in the folder")
            if not (folder / n).exists():
                raise ValueError(f"{index} names shard {n!r}, which is missing from {folder}")
        return [folder / n for n in names]
    if (folder / SINGLE_NAME).exists():
        return [folder / SINGLE_NAME]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return [folder / found[0]]
    if len(found) > 1:
        raise ValueError(f"{folder} has several .safetensors files {found[:4]} but no {INDEX_NAME}")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_error(folder, pickles)
    raise ValueError(f"{folder} has no model weights: expected {SINGLE_NAME} or {INDEX_NAME} with shards")


class SafetensorsReader:
    """Read tensors by name from a folder's shards, memory-mapped (safetensors `safe_open`).

    Use as a context manager. `get(name)` returns a tensor backed by the mapped file (no copy until the
    caller converts or copies it); `names()` lists every tensor; `used` records which were read.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files = shard_files(self.folder)
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        self.used: set[str] = set()

    def __enter__(self) -> SafetensorsReader:
        from safetensors import safe_open

        for f in self.files:
            handle = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            for k in handle.keys():
                if k in self._where:
                    raise ValueError(f"tensor {k!r} appears in two shards of {self.folder}")
                self._where[k] = handle
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        self.used.add(name)
        return self._where[name].get_tensor(name)

    def dtypes(self) -> set[torch.dtype]:
        """dtypes of the floating-point tensors (reads headers only, via slices)."""
        out = set()
        for k, h in self._where.items():
            dt = _DTYPES.get(h.get_slice(k).get_dtype())
            if dt is not None:
                out.add(dt)
        return out


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _atomic_write_bytes(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to path through a temp file + fsync + rename."""
    path = Path(path)

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    _atomic_write_bytes(path, write)


def write_sharded(folder: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int = 5 * 1024**3, metadata: dict[str, str] | None = None) -> list[str]:
    """Write (name, tensor) pairs as model.safetensors, or as model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json once they pass `max_shard_bytes`. Tensors are consumed one shard at a time
    (only one shard is held in memory). Every file is written atomically. Returns the file names."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = []
    tmp_names: list[str] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    total = 0

    def flush() -> None:
        nonlocal current, size
        if not current:
            return
        name = f".shard-{len(tmp_names):05d}.partial.safetensors"
        _atomic_write_bytes(folder / name, lambda tmp, c=current: save_file(c, tmp, metadata=meta))
        shards.append({k: None for k in current})  # names only
        tmp_names.append(name)
        current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = t.detach().contiguous().cpu()
        size += nbytes
        total += nbytes
    flush()
    return _finish_shards(folder, shards, tmp_names, total)


def _finish_shards(folder: Path, shards: list[dict], tmp_names: list[str], total: int) -> list[str]:
    for stale in list(folder.glob("model-*-of-*.safetensors")) + [folder / INDEX_NAME, folder / SINGLE_NAME]:
        if stale.exists():
            stale.unlink()
    if len(tmp_names) == 1:
        os.replace(folder / tmp_names[0], folder / SINGLE_NAME)
        return [SINGLE_NAME]
    n = len(tmp_names)
    weight_map: dict[str, str] = {}
    final: list[str] = []
    for i, (names, tmp) in enumerate(zip(shards, tmp_names, strict=True)):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(folder / tmp, folder / fname)
        weight_map.update({k: fname for k in names})
        final.append(fname)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return final


