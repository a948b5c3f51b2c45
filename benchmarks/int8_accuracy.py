"""How far do the int8 schemes move a model's outputs? W8A8 (int8 activations too, `--quantize int8`) vs int8
weight-only vs the fp32 model, on the decode benchmark's shapes (random weights) and optionally a trained checkpoint.

For each model and each of 4 random prompts: the fp32 model greedily continues the 32-token prompt by 64 tokens
(the engine, fp32). On that 96-token sequence (teacher forcing, one full forward) each variant's logits are compared
with fp32's at the 64 continuation positions: max abs error, that / max |fp32 logit| ("rel"), the median over
positions of each position's max abs error, and how many positions keep fp32's top-1 token ("top-1"). Then each
variant generates its own 64 greedy tokens from the prompt (the engine, batch 1: the decode kernels); "greedy"
counts the positions equal to fp32's, "prefixes" how many match before the first difference, per prompt. On
random weights the routers' scores are near ties: one flipped expert choice moves a position's logits far more
than the rounding itself (the max errors); the median says what rounding alone does. Variants: int8 weight-only experts + linears, and W8A8 with activation blocks of 32 / 64 / 128 / 256
inputs (32 is what `--quantize int8` uses, as llama.cpp's q8_0). Everything but the int8 weights stays fp32.

    python benchmarks/int8_accuracy.py                                   # the two benchmark shapes (~2 min)
    python benchmarks/int8_accuracy.py --model runs/quickstart/checkpoints/step-00000150   # + a trained model
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from decode import SHAPES  # noqa: E402

from moesaic import ModelConfig, build_model  # noqa: E402
from moesaic.inference import Engine, SamplingParams  # noqa: E402
from moesaic.inference.quantize import quantize_model  # noqa: E402
from moesaic.kernels import cpu_q8  # noqa: E402
from moesaic.kernels.quant import Int8Experts, Int8Linear  # noqa: E402


def variant(model, name: str):
    """A quantized copy: "weight-only", or "w8a8-B" (activation block B)."""
    m = copy.deepcopy(model)
    if name == "weight-only":
        return quantize_model(m, "int8", linears=True)
    quantize_model(m, "w8a8", linears=True)
    block = int(name.split("-")[1])
    for mod in m.modules():
        if isinstance(mod, (Int8Experts, Int8Linear)):
            mod.act_block = block
    return m


def greedy(model, prompt: list[int], n: int) -> list[int]:
    eng = Engine(model, max_batch=1, max_len=len(prompt) + n + 2, huge_pages=False)
    return eng.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].token_ids


@torch.no_grad()
def measure(label: str, model, prompt_len: int, new: int, variants: list[str], prompts: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    cases = []  # (prompt, fp32 greedy tokens, fp32 logits at the continuation positions)
    for _ in range(prompts):
        prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist()
        toks = greedy(copy.deepcopy(model), prompt, new)
        cases.append((prompt, toks, model(torch.tensor([prompt + toks]))[0, prompt_len - 1:-1].float()))
    rows = []
    for name in variants:
        q = variant(model, name)
        errs, top1, same, prefixes, peak = [], 0, 0, [], 0.0
        for prompt, ref_toks, ref in cases:
            got = q(torch.tensor([prompt + ref_toks]))[0, prompt_len - 1:-1].float()
            errs.append((got - ref).abs().amax(-1))
            peak = max(peak, float(ref.abs().max()))
            top1 += int((got.argmax(-1) == ref.argmax(-1)).sum())
            toks = greedy(q, prompt, new)
            eq = [a == b for a, b in zip(toks, ref_toks)]
            same += sum(eq)
            prefixes.append(next((i for i, s in enumerate(eq) if not s), len(eq)))
        err = torch.cat(errs)
        row = dict(model=label, variant=name, max_abs=float(err.max()), rel=float(err.max()) / peak,
                   median_abs=float(err.median()), top1=top1, greedy=same, prefixes=prefixes,
                   positions=new * prompts)
        rows.append(row)
        print(f"{label:13s} {name:11s} max abs {row['max_abs']:.2e}  rel {row['rel']:.2e}  median (per position "
              f"max) {row['median_abs']:.2e}  top-1 {top1}/{new * prompts}  greedy {same}/{new * prompts} "
              f"(prefixes {prefixes})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--model", default=None, help="also a trained moesaic / Hugging Face checkpoint folder")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/int8_accuracy.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not cpu_q8.available():
        print("no AVX-512 VNNI here: W8A8 falls back to weight-only, nothing to compare", file=sys.stderr)
    variants = ["weight-only", "w8a8-32", "w8a8-64", "w8a8-128", "w8a8-256"]
    rows = []
    for name in args.shapes:
        torch.manual_seed(0)
        rows += measure(name, build_model(ModelConfig(**SHAPES[name])).eval(), args.prompt_len, args.new_tokens,
                        variants, args.prompts)
    if args.model:
        from moesaic.checkpoint import load

        rows += measure(Path(args.model).name, load(args.model, dtype=torch.float32).eval(), args.prompt_len,
                        args.new_tokens, variants, args.prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(torch=torch.__version__, rows=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
