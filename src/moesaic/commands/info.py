"""`moesaic info` and the interim quickstart: build a preset, run a forward pass, count parameters."""

from __future__ import annotations

import time

import torch
import typer
from rich.console import Console
from rich.table import Table

from moesaic import kernels
from moesaic.config import PRESETS, ModelConfig
from moesaic.model import build_model

console = Console(stderr=True)


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def info(preset: str = typer.Option("small", help=f"one of {sorted(PRESETS)}"),
         seq_len: int = typer.Option(64, help="tokens in the smoke-test forward pass"),
         seed: int = typer.Option(0)) -> None:
    """Build a model from a preset, run one forward pass, print total vs active parameters per token."""
    try:
        cfg = ModelConfig.preset(preset)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--preset") from None
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, min(seq_len, cfg.max_seq_len)))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.forward_aux(ids)
    dt = time.perf_counter() - t0
    pc = model.count_params()
    table = Table(title=f"moesaic preset '{preset}'")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("layers (MoE)", f"{cfg.n_layers} ({len(cfg.moe_layers)})")
    table.add_row("experts / top-k / shared", f"{cfg.num_experts} / {cfg.top_k} / {cfg.num_shared_experts}")
    table.add_row("router", cfg.router if cfg.is_moe else "-")
    table.add_row("total params (non-embedding)", _fmt(pc.total))
    table.add_row("active params per token", _fmt(pc.active))
    table.add_row("active / total", f"{pc.active / pc.total:.1%}")
    table.add_row("embedding + LM head", _fmt(pc.embedding + pc.lm_head))
    table.add_row("forward", f"{ids.shape[1]} tokens, logits {tuple(out.logits.shape)}, {dt * 1e3:.1f} ms")
    if out.router_outputs:
        imb = max(r.load_imbalance for r in out.router_outputs)
        table.add_row("expert load max/mean (worst layer)", f"{imb:.2f}")
    table.add_row("MoE backends here", ", ".join(kernels.available_backends()))
    Console().print(table)


def quickstart() -> None:
    """What `make run` runs (interim: until training lands, a forward pass of the `small` preset)."""
    info(preset="small", seq_len=64, seed=0)
