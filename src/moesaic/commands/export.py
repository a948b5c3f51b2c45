"""`moesaic export RUN_FOLDER OUT --format hf`: write a moesaic model as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import typer

FORMATS = ("hf",)
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def export(run_folder: Path = typer.Argument(..., help="moesaic run folder (or checkpoint / HF folder)"),
           out: Path = typer.Argument(..., help="folder to create"),
           format: str = typer.Option("hf", "--format", help=f"output format: one of {FORMATS}"),
           arch: str | None = typer.Option(None, help="force an architecture, e.g. Qwen3MoeForCausalLM "
                                                      "(default: the first that expresses the model)"),
           dtype: str | None = typer.Option(None, help="weights dtype: float32, bfloat16 or float16 "
                                                       "(default: the model's)"),
           max_shard_gb: float = typer.Option(5.0, help="shard the safetensors past this size (GB)"),
           overwrite: bool = typer.Option(False, help="replace OUT if it exists")) -> None:
    """Export a model so `transformers.AutoModelForCausalLM.from_pretrained(OUT)` gives the same logits."""
    import torch

    from moesaic.checkpoint import load
    from moesaic.checkpoint.export import export_hf

    if format not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {format!r}")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb must be > 0, got {max_shard_gb}")
    model = load(run_folder)
    chosen = export_hf(model, out, arch=arch, tokenizer_dir=run_folder,
                       dtype=getattr(torch, _DTYPES[dtype]) if dtype else None,
                       max_shard_bytes=int(max_shard_gb * 1024**3), overwrite=overwrite)
    typer.echo(f"wrote {out} as {chosen.name}")
