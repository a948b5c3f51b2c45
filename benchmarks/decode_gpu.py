"""GPU decode: moesaic's Engine (CUDA graphs on / off) vs transformers `generate` on a Mixtral-shaped model.

Question (issues 4 and 6): is the engine's batch-1 decode on a Mixtral-shaped model that fits one
GPU >= 3x transformers' `generate` with its fastest experts implementation?

Model: the real Mixtral-8x7B dimensions (D 4096, 32 heads / 8 kv heads of 128, 8 experts of
F 14336, top-2, vocab 32000, rope theta 1e6) with fewer layers (--layers, default 8: 11.6 B
parameters, 23 GB in bf16) so that building it and running both systems fits a few minutes; every
per-layer cost scales with the layer count, only the LM head does not. Random weights, bf16, built
directly on the GPU. transformers' MixtralForCausalLM is built on the meta device and given the very
same tensors (moesaic's export key map, fused experts: no copy), and its logits are checked against
moesaic's first.

Systems, greedy, same prompts (--prompt-len random tokens), --new-tokens decoded:
  hf <impl>        transformers `generate` with each experts implementation it offers (eager,
                   grouped_mm, batched_mm); step = time between consecutive logits (a logits
                   processor synchronizes and stamps the clock), median over the steps after 2
  moesaic graphs   Engine(backend="triton", cuda_graphs=True): each decode step one graph replay
  moesaic eager    Engine(backend="triton", cuda_graphs=False)
Each system runs once untimed (compiles, tunes, captures), then timed.

Floor = bytes one decode step must read (the unique experts the batch's tokens chose in each layer,
counted in an untimed eager pass, + attention, norms, routers and the LM head; not the embedding
table and not the KV cache) / copy bandwidth measured in this run (a 1 GiB device copy, read +
written bytes); efficiency = floor / step time.

    python benchmarks/decode_gpu.py --out results/decode_gpu.json          # H200: ~2-3 min
    python benchmarks/decode_gpu.py --device cpu --quick                   # tiny smoke run on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

# the decode shapes' launch configs ship with the package (configs/NVIDIA_H200.json); tuning the untimed
# prefill shapes on first use would take tens of seconds, so misses use the heuristic unless asked
os.environ.setdefault("MOESAIC_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402
from hf_twin import hf_twin, parity, run_hf, set_impl, sync  # noqa: E402  (benchmarks/, the script's folder)

from moesaic import ModelConfig, build_model  # noqa: E402
from moesaic.inference import Engine, SamplingParams  # noqa: E402

MIXTRAL = dict(vocab_size=32000, d_model=4096, n_heads=32, n_kv_heads=8, ffn=14336, num_experts=8, top_k=2,
               expert_ffn=14336, rope_theta=1e6, norm_eps=1e-5, max_seq_len=4096)
QUICK = dict(vocab_size=512, d_model=128, n_heads=4, n_kv_heads=2, ffn=256, num_experts=8, top_k=2,
             expert_ffn=256, max_seq_len=512)
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def copy_bandwidth(dev: str) -> float:
    """Bytes read + written per second by a large device copy (do_bench median on CUDA, as moe_layer.py)."""
    n = (1 << 30) if dev == "cuda" else (1 << 26)
    src = torch.ones(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    if dev == "cuda":
        import triton.testing

        return 2 * n / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    best = float("inf")
    for _ in range(10):
        sync(dev)
        t = time.perf_counter()
        dst.copy_(src)
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n / best


def build(args) -> torch.nn.Module:
    shape = QUICK if args.quick else MIXTRAL
    cfg = ModelConfig(**shape, n_layers=args.layers)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)  # built directly in the target dtype, on the target device
    try:
        with torch.device(args.device):
            model = build_model(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    return model


def prompts(batch: int, n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for _ in range(batch)]


def run_engine(model, batch: int, args, mode: str) -> tuple[float, dict, list[list[int]]]:
    """Median seconds per decode step of the Engine (all rows decoding) in mode "eager", "graphs" or
    "graphs+compile", notes (graph stats; for graphs, the GPU time of one replay) and the tokens."""
    os.environ["MOESAIC_DECODE_COMPILE"] = "1" if mode == "graphs+compile" else "0"
    eng = Engine(model, max_batch=batch, max_len=args.prompt_len + args.new_tokens + 2, backend=args.backend,
                 cuda_graphs=mode != "eager")
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    steps: list[float] = []
    for _ in range(2):  # warm-up (compiles, tunes, captures every bucket), then timed
        reqs = [eng.submit(p, params) for p in prompts(batch, args.prompt_len, model.config.vocab_size)]
        eng.step()  # admit + prefill
        steps = []
        while eng.has_unfinished():
            t = time.perf_counter()
            eng.step()  # ends in a device->host copy of the logits: the step is done
            steps.append(time.perf_counter() - t)
    notes: dict = {}
    dg = eng.decode_graphs
    if mode != "eager":
        notes = dict(dg.stats, compiled=dg.compile) if dg is not None else {}
        if dg is None or dg.failed:
            notes["failed"] = "not capturable" if dg is None else dg.failed
        else:
            try:
                notes["graph_replay_ms"] = replay_ms(eng, batch, args.prompt_len + args.new_tokens - 1)
            except Exception as exc:  # a breakdown that fails must not cost the table
                notes["breakdown_error"] = repr(exc)[:200]
    del eng, dg
    gc.collect()
    os.environ["MOESAIC_DECODE_COMPILE"] = "0"
    sec = statistics.median(steps[:-1] if len(steps) > 2 else steps)  # the last step also releases
    return sec, notes, [r.output_ids for r in reqs]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of tokens generated before the first difference, over the requests (1.0: identical)."""
    same = 0
    for x, y in zip(a, b):
        same += next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
    return same / max(1, sum(len(x) for x in b))


@torch.inference_mode()  # the engine's static inputs are inference tensors; weights need no grad
def replay_ms(eng: Engine, batch: int, keys: int) -> float:
    """GPU time of one decode step: the last bucket's graph replayed (CUDA events, do_bench median) with
    real rows at position 0 of slots 0..B-1 (lengths reset before each replay: slots never fill)."""
    import triton.testing

    from moesaic.inference.graphs import keys_bucket

    got = eng.decode_graphs.captured(batch, keys_bucket(keys, eng.cache.max_len))  # the last bucket used
    if got is None:
        raise RuntimeError("the last key bucket was not captured")
    graph, inputs = got
    lengths = eng.cache.lengths
    inputs[0].random_(0, eng.vocab)
    inputs[1].copy_(torch.arange(batch))
    inputs[2].fill_(1)

    def step():
        lengths.zero_()
        graph.replay()

    ms = triton.testing.do_bench(step, warmup=20, rep=200, return_mode="median")
    lengths.zero_()
    return ms


@torch.inference_mode()  # the engine's static inputs are inference tensors; weights need no grad
def moe_ms(model, batch: int, args) -> float:
    """GPU time of the step's MoE experts: one layer's Triton forward on `batch` tokens (softmax routing)
    replayed from a CUDA graph (do_bench median), times the MoE layers."""
    import triton.testing

    from moesaic import kernels
    from moesaic.kernels.triton.autotune import random_problem

    cfg, layer = model.config, model.moe_layers()[0]
    x, _, _, ids, w = random_problem(batch, cfg.d_model, 8, cfg.num_experts, cfg.top_k, args.dtype,
                                     torch.device("cuda"), seed=batch)
    w13, w2 = layer.experts.w13, layer.experts.w2

    def moe():
        return kernels.moe_experts(x, w13, w2, ids, w, backend="triton")

    moe()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        moe()
    return triton.testing.do_bench(g.replay, warmup=20, rep=200, return_mode="median") * len(model.moe_layers())


def unique_experts(model, batch: int, args) -> float:
    """Unique experts per decode step summed over layers (an untimed eager pass; hooks read the routing)."""
    eng = Engine(model, max_batch=batch, max_len=args.prompt_len + 18, backend=args.backend, cuda_graphs=False)
    for p in prompts(batch, args.prompt_len, model.config.vocab_size):
        eng.submit(p, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    eng.step()  # prefill: not counted
    cur: list[int] = []

    def hook(_mod, _args, out) -> None:
        ids = out[1].expert_ids_TK
        cur.append(int(torch.unique(ids[ids >= 0]).numel()))

    hooks = [m.register_forward_hook(hook) for m in model.moe_layers()]
    per_step = []
    while eng.has_unfinished():
        eng.step()
        per_step.append(sum(cur))
        cur.clear()
    for h in hooks:
        h.remove()
    return statistics.mean(per_step)


def step_bytes(model, unique: float, nbytes: int) -> float:
    """Weight bytes one decode step reads: every parameter but the embedding table (unless tied to the
    LM head) and the routed experts, plus the `unique` experts chosen."""
    routed = [m.experts for m in model.moe_layers()]
    skip = {id(p) for e in routed for p in (e.w13, e.w2)}
    if not model.config.tie_embeddings:
        skip.add(id(model.embed.weight))
    rest = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return (rest + unique * (routed[0].params_per_expert if routed else 0)) * nbytes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hf-impls", nargs="*", default=list(HF_IMPLS))
    ap.add_argument("--compile-batches", type=int, nargs="*", default=[1],
                    help="also time the Engine with its graphed step torch.compiled first (last; slow to build)")
    ap.add_argument("--quick", action="store_true", help="tiny shape (2 layers, D 128): a smoke run")
    ap.add_argument("--out", default="benchmarks/results/decode_gpu.json")
    args = ap.parse_args(argv)
    dev = args.device
    args.dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    args.backend = "triton" if dev == "cuda" else None
    if args.quick:
        args.layers, args.new_tokens, args.prompt_len = 2, 8, 8
    t0 = time.time()
    bw = copy_bandwidth(dev)
    model = build(args)
    pc = model.count_params()
    import transformers

    env = dict(device=torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, transformers=transformers.__version__, copy_bandwidth_GBps=bw / 1e9,
               layers=args.layers, params=pc.total_with_embeddings, active_params=pc.active_with_embeddings)
    print(f"# {env['device']}: torch {env['torch']}, transformers {env['transformers']}, copy {bw / 1e12:.2f} TB/s; "
          f"{'tiny' if args.quick else 'Mixtral-8x7B'}-shaped model with {args.layers} layers "
          f"({pc.total_with_embeddings / 1e9:.2f} B params, {pc.active_with_embeddings / 1e9:.2f} B active), "
          f"{str(args.dtype)[6:]}, built in {time.time() - t0:.0f} s; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens", flush=True)
    rows: list[dict] = []
    dbytes = torch.finfo(args.dtype).bits // 8
    uniq = {b: unique_experts(model, b, args) for b in args.batches}
    hf = None
    try:
        hf = hf_twin(model)
        env["hf_max_rel_logit_diff"] = parity(model, hf, model.config.vocab_size, dev)
        env["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
        print(f"# transformers twin shares the weights (attention {env['hf_attn_implementation']}); "
              f"max |logit diff| / max |logit| = {env['hf_max_rel_logit_diff']:.1e}", flush=True)
    except Exception as exc:  # report and still time moesaic
        print(f"# transformers twin unavailable: {exc!r}"[:300], flush=True)

    def add(system: str, mode: str, b: int, sec: float, extra: dict | None = None) -> None:
        floor = step_bytes(model, uniq[b], dbytes) / bw
        rows.append(dict(system=system, mode=mode, batch=b, step_ms=sec * 1e3, tokens_per_s=b / sec,
                         floor_ms=floor * 1e3, efficiency=floor / sec, unique_experts_per_step=uniq[b],
                         **(extra or {})))
        more = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in (extra or {}).items()}
        print(f"{system:8s} {mode:11s} B={b:<2d} {b / sec:8.1f} tok/s  step {sec * 1e3:7.2f} ms  "
              f"floor {floor * 1e3:6.2f} ms  eff {floor / sec:.2f}  {more or ''}", flush=True)

    toks: dict[tuple[str, int], list[list[int]]] = {}
    for b in args.batches:
        for mode in (("eager", "graphs") if dev == "cuda" else ("eager",)):
            sec, notes, toks[mode, b] = run_engine(model, b, args, mode)
            if "graph_replay_ms" in notes:
                notes["moe_ms"] = moe_ms(model, b, args)
            if mode != "eager":  # greedy tokens equal to the eager engine's until the first (near-tie) flip
                notes["same_tokens_as_eager"] = agreement(toks[mode, b], toks["eager", b])
            add("moesaic", mode, b, sec, notes)
            save(args, env, rows)
        for impl in args.hf_impls if hf is not None else ():
            try:
                set_impl(hf, impl)
                ids = torch.tensor(prompts(b, args.prompt_len, model.config.vocab_size), device=dev)
                add("hf", impl, b, run_hf(hf, ids, args.new_tokens))
            except Exception as exc:  # e.g. batched_mm out of memory: record, go on
                print(f"hf {impl} B={b}: {exc!r}"[:200], flush=True)
                rows.append(dict(system="hf", mode=impl, batch=b, error=repr(exc)[:200]))
                if dev == "cuda":
                    torch.cuda.empty_cache()
            save(args, env, rows)
    for line in summarize(rows, args.batches)["lines"]:  # now too, in case compiling runs out of time
        print(f"# {line}", flush=True)
    for b in args.compile_batches if dev == "cuda" else ():  # last: compiling takes a while, may fail
        sec, notes, out = run_engine(model, b, args, "graphs+compile")
        if "graph_replay_ms" in notes:
            notes["moe_ms"] = moe_ms(model, b, args)
        if ("eager", b) in toks:
            notes["same_tokens_as_eager"] = agreement(out, toks["eager", b])
        add("moesaic", "graphs+compile", b, sec, notes)
        save(args, env, rows)
    summary = summarize(rows, args.batches)
    print("\n| system | mode | B | tok/s | step ms | floor ms | efficiency |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" not in r:
            print(f"| {r['system']} | {r['mode']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | "
                  f"{r['floor_ms']:.2f} | {r['efficiency']:.2f} |")
    for line in summary["lines"]:
        print(f"# {line}")
    save(args, env, rows, summary)
    print(f"# wrote {args.out} ({time.time() - t0:.0f} s in all)")


def save(args, env: dict, rows: list[dict], summary: dict | None = None) -> None:
    """JSON after every row (a run cut short by its time limit keeps what it measured)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    a = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()}
    tmp.write_text(json.dumps(dict(env=env, args=a, rows=rows, summary=summary), indent=1) + "\n")
    os.replace(tmp, out)


def summarize(rows: list[dict], batches: list[int]) -> dict:
    """Per batch: moesaic's best mode over transformers' fastest experts implementation."""
    out: dict = {"lines": []}
    for b in batches:
        ok = [r for r in rows if r["batch"] == b and "error" not in r]
        ours = max((r for r in ok if r["system"] == "moesaic"), key=lambda r: r["tokens_per_s"], default=None)
        best = max((r for r in ok if r["system"] == "hf"), key=lambda r: r["tokens_per_s"], default=None)
        if ours is None or best is None:
            continue
        x = ours["tokens_per_s"] / best["tokens_per_s"]
        out[f"B{b}_speedup_vs_hf_best"] = x
        out["lines"].append(f"B={b}: moesaic {ours['mode']} {ours['tokens_per_s']:.1f} tok/s vs transformers "
                            f"{best['mode']} {best['tokens_per_s']:.1f} tok/s: {x:.2f}x (target >= 3x at B=1)"
                            + (f"; its greedy tokens equal the eager engine's for {ours['same_tokens_as_eager']:.0%}"
                               " of the run" if "same_tokens_as_eager" in ours else ""))
    for r in rows:
        if "graph_replay_ms" in r and "moe_ms" in r:
            out["lines"].append(
                f"B={r['batch']} {r['mode']}: step {r['step_ms']:.2f} ms = GPU replay {r['graph_replay_ms']:.2f} ms "
                f"(MoE experts {r['moe_ms']:.2f}, the rest {r['graph_replay_ms'] - r['moe_ms']:.2f}) + host "
                f"{r['step_ms'] - r['graph_replay_ms']:.2f} ms; floor {r['floor_ms']:.2f} ms")
    return out


if __name__ == "__main__":
    main()
