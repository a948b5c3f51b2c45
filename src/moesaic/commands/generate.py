"""`moesaic generate MODEL --prompt TEXT` and `moesaic chat MODEL`.

`generate` prints only the generated text on stdout (diagnostics go to stderr), so it pipes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

PACK_HELP = ("keep oneDNN-blocked copies of the float weights (faster bf16 decode; a second copy in memory); "
             "default: when the weights are bf16 and the copy fits easily in free memory")
_DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _engine(model_dir: Path, dtype: str, quantize: str | None, quantize_linears: bool, backend: str | None,
            max_batch: int = 1, max_len: int | None = None, pack_weights: bool | None = None):
    import os

    # torch's CPU allocator then backs large tensors (weights as loaded, oneDNN-blocked copies) with transparent
    # huge pages; it reads this once, at the process's first tensor allocation (none happened before loading)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch

    from moesaic.checkpoint import load
    from moesaic.inference import Engine
    from moesaic.tokenizer import Tokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if quantize not in (None, "int8", "w8a8"):
        raise ValueError(f"--quantize must be int8 or w8a8 (or left out), got {quantize!r}")
    name = _DTYPES[dtype]
    if name is None:  # bf16 where the CPU has native bf16 dot products, else fp32
        name = "bfloat16" if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else "float32"
    model = load(model_dir, dtype=getattr(torch, name))
    tok = Tokenizer.from_folder(model_dir)
    return Engine(model, tok, max_batch=max_batch, max_len=max_len, backend=backend, quantize=quantize,
                  quantize_linears=quantize_linears, pack_weights=pack_weights)


_QUANT_HELP = ("int8: int8 expert weights (one scale per output channel), float activations; w8a8: the same "
               "weights x int8 activations quantized per block of 32 (as llama.cpp's q8_0)")


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, experts_per_token):
    from moesaic.inference import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed, stop=list(stop or []),
                          experts_per_token=experts_per_token)


def generate(model: Path = typer.Argument(..., help="model folder (moesaic run folder or Hugging Face folder)"),
             prompt: str = typer.Option(..., "--prompt", "-p", help="prompt text ('-' reads stdin)"),
             max_tokens: int = typer.Option(64, help="new tokens at most"),
             temperature: float = typer.Option(0.0, help="0 = greedy"),
             top_p: float = typer.Option(1.0), top_k: int = typer.Option(0, help="0 = off"),
             min_p: float = typer.Option(0.0), repetition_penalty: float = typer.Option(1.0),
             seed: int | None = typer.Option(None, help="sampling seed (reproducible output)"),
             stop: list[str] = typer.Option(None, "--stop", help="stop string (repeatable)"),
             stream: bool = typer.Option(False, help="print text as it is generated"),
             experts_per_token: int | None = typer.Option(None, help="routed experts per token (default: trained)"),
             quantize: str | None = typer.Option(None, help=_QUANT_HELP),
             quantize_linears: bool = typer.Option(False, help="with --quantize, also attention/dense/LM head"),
             dtype: str = typer.Option("auto", help="auto (bf16 where the CPU has it), float32, bfloat16"),
             backend: str | None = typer.Option(None, help="MoE kernels backend (default: auto)"),
             pack_weights: bool | None = typer.Option(None, "--pack-weights/--no-pack-weights", help=PACK_HELP),
             chat: bool = typer.Option(False, help="wrap the prompt in the model's chat template")) -> None:
    """Generate a continuation of PROMPT; only the generated text goes to stdout."""
    if prompt == "-":
        prompt = sys.stdin.read()
    eng = _engine(model, dtype, quantize, quantize_linears, backend, pack_weights=pack_weights)
    params = _params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop,
                     experts_per_token)
    text_or_ids = _chat_ids(eng.tokenizer, [{"role": "user", "content": prompt}]) if chat else prompt
    t0 = time.perf_counter()
    if stream:
        for delta in eng.stream(text_or_ids, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        n = None
    else:
        (out,) = eng.generate([text_or_ids], params)
        sys.stdout.write(out.text + "\n")
        n = len(out.token_ids)
    dt = time.perf_counter() - t0
    rate = f", {n / dt:.1f} tokens/s" if n else ""
    typer.echo(f"[{dt:.2f} s{rate}; active params/token {eng.active_params_per_token(experts_per_token) / 1e6:.2f}M]",
               err=True)


def _chat_ids(tokenizer, messages: list[dict[str, str]]):
    """Prompt for a conversation: token ids of the model's chat template when it has one (the template
    writes its own special tokens, so none are added), else a plain "role: content" transcript."""
    apply = getattr(tokenizer, "apply_chat_template", None)
    if apply is not None and tokenizer.chat_template:
        return tokenizer.encode(apply(messages, add_generation_prompt=True))
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def chat(model: Path = typer.Argument(..., help="model folder (moesaic run folder or Hugging Face folder)"),
         max_tokens: int = typer.Option(256), temperature: float = typer.Option(0.7),
         top_p: float = typer.Option(0.95), seed: int | None = typer.Option(None),
         system: str | None = typer.Option(None, help="system message"),
         experts_per_token: int | None = typer.Option(None),
         quantize: str | None = typer.Option(None, help=_QUANT_HELP),
         dtype: str = typer.Option("auto", help="auto, float32, bfloat16"),
         pack_weights: bool | None = typer.Option(None, "--pack-weights/--no-pack-weights", help=PACK_HELP)) -> None:
    """Interactive chat (uses the chat template when the model has one). An empty line or EOF quits."""
    eng = _engine(model, dtype, quantize, False, None, pack_weights=pack_weights)
    params = _params(max_tokens, temperature, top_p, 0, 0.0, 1.0, seed, [], experts_per_token)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for delta in eng.stream(_chat_ids(eng.tokenizer, messages), params):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
