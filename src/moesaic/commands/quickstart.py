"""`moesaic quickstart` (what `make run` runs): train a small MoE and its dense-active twin on the built-in
corpus, same data and token budget, then report parameters, validation losses, decode speed and a sample.

Re-running reuses a finished run folder (and resumes an interrupted one) instead of retraining.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

QUICK = dict(preset="small", data="builtin", steps=150, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=15,
             eval_every=50, eval_windows=96, save_every=50, dense_twin="active", seed=0)


def quickstart(out: Path = typer.Option(Path("runs/quickstart"), help="run folder"),
               steps: int = typer.Option(QUICK["steps"], help="optimizer steps for each model"),
               device: str = typer.Option("auto", help="auto | cpu | cuda"),
               seed: int = typer.Option(0)) -> None:
    """Train the `small` MoE and its dense-active twin briefly, then print the comparison."""
    from moesaic.train.config import TrainConfig
    from moesaic.train.loop import TrainingStopped
    from moesaic.train.run import train_run

    con = Console(stderr=True)
    cfg = TrainConfig(**{**QUICK, "steps": steps, "seed": seed, "device": device})
    con.print(f"[bold]moesaic quickstart[/]: {steps} steps x {cfg.tokens_per_step:,} tokens for the MoE and "
              f"for its dense-active twin -> {out}")
    try:
        res = train_run(cfg, out, resume=True, log=lambda s: con.print(s))
    except TrainingStopped as e:
        raise typer.Exit(f"error: {e}") from None
    report(res, con)


def report(res, con: Console) -> None:
    from moesaic.checkpoint.native import load_native
    from moesaic.model import build_model
    from moesaic.tokenizer import Tokenizer

    moe, dense = load_native(res.out), load_native(res.twin.out)
    total_twin = build_model(res.model_config.dense_twin("total")).eval()
    pm, pd, pt = moe.count_params(), dense.count_params(), total_twin.count_params()
    t = Table(title=f"quickstart: {res.summary['tokens']:,} training tokens per model")
    for c in ("model", "total", "active/token", "val loss", "decode tok/s"):
        t.add_column(c, justify="right" if c != "model" else "left")
    speeds = [decode_speed(m) for m in (moe, dense, total_twin)]
    t.add_row("MoE (small)", _m(pm.total), _m(pm.active), f"{res.summary['val_loss']:.4f}", f"{speeds[0]:.0f}")
    t.add_row("dense, same active", _m(pd.total), _m(pd.active), f"{res.twin.summary['val_loss']:.4f}",
              f"{speeds[1]:.0f}")
    t.add_row("dense, same total*", _m(pt.total), _m(pt.active), "-", f"{speeds[2]:.0f}")
    t.caption = "* untrained, for decode speed only; parameters exclude embedding and LM head"
    Console().print(t)
    gap = res.twin.summary["val_loss"] - res.summary["val_loss"]
    who = "the MoE" if gap > 0 else "the dense twin"
    Console().print(f"Validation loss: {who} is ahead by {abs(gap):.4f} nats at equal active parameters and "
                    "equal tokens.")
    tok = Tokenizer.from_folder(res.out)
    Console().print("[bold]sample[/] (MoE, temperature 0.8):\n" + sample(moe, tok, "def ", 60))
    Console().print("\n[bold]next[/]:\n" + "\n".join(next_commands(res.out)))


def next_commands(run: Path) -> list[str]:
    """Commands to try next, only those this installation has."""
    from moesaic.cli import COMMANDS

    cmds = {"generate": f"  moesaic generate {run} --prompt 'import os' --max-tokens 64 --temperature 0.8",
            "chat": f"  moesaic chat {run}",
            "serve": f"  moesaic serve {run}        # OpenAI-compatible HTTP server",
            "analyze": f"  moesaic analyze {run}      # which experts serve which tokens"}
    lines = [c for name, c in cmds.items() if name in COMMANDS]
    lines.append("  moesaic train --preset small --steps 2000 --out runs/mine --dense-twin active"
                 "   # metrics: runs/mine/metrics.jsonl")
    return lines


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


@torch.no_grad()
def _decode(model, ids: list[int], new_tokens: int, temperature: float, gen: torch.Generator) -> list[int]:
    from moesaic.model.cache import StaticCache

    cache = StaticCache.for_model(model.config, 1, len(ids) + new_tokens)
    logits = model(torch.tensor([ids]), cache=cache)[:, -1]
    out = []
    for _ in range(new_tokens):
        if temperature > 0:
            nxt = torch.multinomial((logits.float() / temperature).softmax(-1), 1, generator=gen)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        out.append(int(nxt))
        logits = model(nxt, cache=cache)[:, -1]
    return out


def decode_speed(model, prompt_len: int = 16, new_tokens: int = 48) -> float:
    """Tokens per second of batch-1 greedy decoding through the inference engine (`moesaic.Engine`, what
    `moesaic generate` and the server run), after one warm-up; the engine works on a copy, so `model` is left
    as it was (the engine switches modules and weight layouts in place)."""
    import copy

    from moesaic.inference import Engine, SamplingParams

    eng = Engine(copy.deepcopy(model), None, max_batch=1, max_len=prompt_len + new_tokens + 8)
    ids = [list(range(1, prompt_len + 1))]
    eng.generate(ids, SamplingParams(max_tokens=4, temperature=0.0))
    t0 = time.perf_counter()
    out = eng.generate(ids, SamplingParams(max_tokens=new_tokens, temperature=0.0))
    return len(out[0].token_ids) / (time.perf_counter() - t0)


def sample(model, tokenizer, prompt: str, new_tokens: int, temperature: float = 0.8) -> str:
    gen = torch.Generator().manual_seed(0)
    ids = _decode(model, tokenizer.encode(prompt), new_tokens, temperature, gen)
    return prompt + tokenizer.decode(ids)
