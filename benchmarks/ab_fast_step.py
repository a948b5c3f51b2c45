"""Same-process interleaved A/B of batch-1 CPU decode: the fast step (`inference.fast_step`: the whole step as one
recorded C program) against the module-by-module step it replaces.

    python benchmarks/ab_fast_step.py [--shapes fine-64x8 coarse-8x2] [--precisions fp32 bf16 w8a8] [--rounds 6]

decode.py's shapes and precisions (w8a8: every linear but the routers W8A8, the rest fp32, like its w8a8 row), one
engine per (shape, precision) at max_batch=1 and 2 threads. Each round generates --new-tokens greedy tokens after a
16-token prompt twice: with the engine's FastStep, then without it (the order alternates between rounds). Reports
the median decode-step time of each path over all its rounds' steps (after each run's first two), the ratio,
whether the greedy tokens agree, and how often the C router left the choice to torch. OMP_WAIT_POLICY=PASSIVE and
THP_MEM_ALLOC_ENABLE=1 unless the environment sets them (as decode.py).

--against-split BYTES: the "plain" side is a second fast step whose one-row linears split over the C worker only from
BYTES of weight (8388608: the module path's rule, the LM head only) instead of the module path.
--against-no-adapt: the "plain" side is a second fast step that always runs the two-thread program (no
`inference.split_tuner`). --against-no-steal: the "plain" side is the same fast step with `cpu_pool.set_steal(False)` (the caller always waits
for the C worker to run its half). --busy: a competing process spins on one core throughout (another job on the VM).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from decode import INT8, SHAPES  # noqa: E402

from moesaic import Engine, ModelConfig, SamplingParams, build_model  # noqa: E402
from moesaic.kernels import cpu_pool  # noqa: E402


def timed_run(eng: Engine, prompt: list[int], n: int) -> tuple[list[float], list[int]]:
    req = eng.submit(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    eng.step()  # prefill
    steps = []
    while eng.has_unfinished():
        t = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t)
    return steps[2:], req.output_ids


def ab(shape: str, prec: str, rounds: int, new_tokens: int, against_split: int | None = None,
       against_no_steal: bool = False, against_no_adapt: bool = False) -> dict:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SHAPES[shape])).eval()
    kw = {}
    if prec == "bf16":
        model = model.to(torch.bfloat16)
    elif prec in INT8:
        scheme, linears, dt = INT8[prec]
        model, kw = model.to(dt), dict(quantize=scheme, quantize_linears=linears)
    eng = Engine(model, max_batch=1, max_len=16 + new_tokens + 2, **kw)
    fast = eng.fast_step
    if fast is None:
        from moesaic.inference.fast_step import why_not

        raise SystemExit(f"{shape} {prec}: no fast step ({why_not(eng.model, eng.cache)})")
    from moesaic.inference.fast_step import FastStep

    other = None if against_split is None else FastStep(eng.model, eng.cache, split_min_bytes=against_split)
    if against_no_steal:
        other = fast
    if against_no_adapt:
        other = FastStep(eng.model, eng.cache)
        other.adapt = False
    prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    times: dict[bool, list[float]] = {True: [], False: []}
    toks: dict[bool, list[int]] = {}
    for i in range(rounds):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            eng.fast_step = fast if on else other
            if against_no_steal:
                cpu_pool.set_steal(on)
            s, toks[on] = timed_run(eng, prompt, new_tokens)
            times[on] += s
    eng.fast_step = fast
    old, new = statistics.median(times[False]), statistics.median(times[True])
    row = dict(shape=shape, precision=prec, plain_ms=old * 1e3, fast_ms=new * 1e3, plain_tok_s=1 / old,
               fast_tok_s=1 / new, speedup=old / new, tokens_equal=toks[True] == toks[False],
               router_fallbacks_per_step=fast.router_fallbacks / max(1, len(times[True]) + 2 * rounds))
    print(f"{shape:11s} {prec:5s} plain {row['plain_ms']:6.2f} ms ({row['plain_tok_s']:6.1f} tok/s)  fast "
          f"{row['fast_ms']:6.2f} ms ({row['fast_tok_s']:6.1f} tok/s)  {row['speedup']:.3f}x  tokens equal "
          f"{row['tokens_equal']}  router fallbacks/step {row['router_fallbacks_per_step']:.2f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["fine-64x8"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "w8a8"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--against-split", type=int, default=None)
    ap.add_argument("--against-no-steal", action="store_true")
    ap.add_argument("--against-no-adapt", action="store_true")
    ap.add_argument("--busy", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        for shape in args.shapes:
            for prec in args.precisions:
                ab(shape, prec, args.rounds, args.new_tokens, args.against_split, args.against_no_steal,
                   args.against_no_adapt)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
