"""`moesaic train`: typed options -> TrainConfig -> train.run.train_run. No training logic lives here."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moesaic.config import PRESETS


def parse_overrides(items: list[str] | None) -> dict:
    """["num_experts=32", "router=sigmoid_topk"] -> {"num_experts": 32, "router": "sigmoid_topk"} (JSON values)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set num_experts=32")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v  # a bare string such as sigmoid_topk
    return out


def train(
    preset: str = typer.Option("small", help=f"model preset, one of {sorted(PRESETS)}"),
    data: str = typer.Option("builtin", help="builtin | builtin:large | a text file, folder or .jsonl file"),
    steps: int = typer.Option(1000, help="optimizer steps"),
    out: Path = typer.Option(..., help="run folder (checkpoints, metrics.jsonl, config, tokenizer)"),
    resume: bool = typer.Option(False, help="continue from the newest complete checkpoint in --out"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(16, help="sequences per optimizer step"),
    micro_batch_size: int = typer.Option(None, help="sequences per forward (gradient accumulation); default all"),
    seq_len: int = typer.Option(256, help="tokens per sequence"),
    lr: float = typer.Option(3e-3, help="peak learning rate (AdamW)"),
    warmup: int = typer.Option(50, help="linear warmup steps (then cosine decay)"),
    weight_decay: float = typer.Option(0.1),
    grad_clip: float = typer.Option(1.0, help="max gradient norm (0 disables)"),
    vocab_size: int = typer.Option(None, help="BPE vocabulary (default: the preset's)"),
    save_every: int = typer.Option(250, help="checkpoint every N steps (always at the end; 0: only then)"),
    eval_every: int = typer.Option(100, help="validation loss every N steps (always at the end)"),
    keep: int = typer.Option(1, help="complete checkpoints to keep"),
    dense_twin: str = typer.Option(None, help="also train the dense twin with the same 'active' or 'total' "
                                              "parameters, same data and tokens, into OUT/dense-<match>"),
    init_from: Path = typer.Option(None, help="a dense run folder to upcycle into an MoE"),
    num_experts: int = typer.Option(None, help="experts per layer when upcycling (--init-from)"),
    top_k: int = typer.Option(2, help="experts per token when upcycling"),
    upcycle_noise: float = typer.Option(0.0, help="relative Gaussian noise added to upcycled expert copies"),
    set_: list[str] = typer.Option(None, "--set", help="override a model config field: --set num_experts=32"),
    device: str = typer.Option("auto", help="auto (cuda when available) | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto (bf16 autocast on CUDA) | fp32 | bf16"),
    nonfinite: str = typer.Option("skip", help="on a non-finite loss or gradient: skip the batch, or stop"),
    cuda_graph: str = typer.Option("auto", help="auto: replay each optimizer step as one CUDA graph where "
                                                 "it can be captured (CUDA, triton experts, no accumulation); off"),
    progress: bool = typer.Option(True, help="show the progress bar"),
) -> None:
    """Train an MoE (or dense) language model; --resume continues exactly where a run stopped."""
    from moesaic.train.config import TrainConfig
    from moesaic.train.run import train_run

    cfg = TrainConfig(preset=preset, model_overrides=parse_overrides(set_), data=data, vocab_size=vocab_size,
                      steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=seq_len,
                      lr=lr, warmup_steps=warmup, weight_decay=weight_decay, grad_clip=grad_clip, seed=seed,
                      eval_every=eval_every, save_every=save_every, keep_checkpoints=keep, device=device,
                      dtype=dtype, nonfinite=nonfinite, progress=progress, dense_twin=dense_twin,
                      cuda_graph=cuda_graph)
    from moesaic.train.loop import TrainingStopped

    try:
        res = train_run(cfg, out, resume=resume, init_from=init_from, num_experts=num_experts, top_k=top_k,
                        upcycle_noise=upcycle_noise, log=lambda s: typer.echo(s, err=True))
    except TrainingStopped as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3) from None
    for r in [res] + ([res.twin] if res.twin else []):
        v = r.summary["val_loss"]
        typer.echo(f"{r.out}: {r.summary['steps']} steps, {r.summary['tokens']:,} tokens, "
                   f"val_loss {v:.4f}" if v is not None else f"{r.out}: done")
