"""MoE expert layer: time, TFLOP/s, GB/s and roofline efficiency of moesaic's backends and peers.

Question: how close does `moe_experts` get to the hardware floor, at decode (few tokens, bound by
reading the chosen experts' weights) and at prefill/training (many tokens, bound by matrix math)?

Floor = max(FLOPs / measured bf16 matmul rate, bytes of the unique experts touched / measured copy
bandwidth); efficiency = floor / time. FLOPs = 6 * routed pairs * D * F. Both ceilings are measured
in the same run (a large device-to-device copy counting bytes read + written; an 8192^3 bf16 matmul).
Routing: softmax over random logits, top-k. Times: triton.testing.do_bench median (L2 flushed
before each call) on CUDA; on CPU a plain wall-clock median.

Peers in the same run: transformers' MixtralExperts with experts implementation "eager" and
"grouped_mm" (built from a config, weights shared with ours), torch._grouped_mm called directly
(sort, gather, two grouped GEMMs, scatter-add), and moesaic's "sorted" backend. "triton+graph" is
our backend replayed from a CUDA graph, as the engine's decode step runs it: the graph holds 10 calls,
each with its own routing (like 10 layers: other experts, so no L2 reuse between calls), and time and
floor are per call. (A graph launch costs ~10 us of GPU time on the H200; the engine pays it once per
step, not per layer. Session 5 timed one-call graphs, which counted it per layer: Qwen3 T = 1 37 us.)

    python benchmarks/moe_layer.py                       # CUDA: all shapes, all T, JSON to benchmarks/results/
    python benchmarks/moe_layer.py --device cpu          # tiny shape on CPU (smoke run, no Triton)
    python benchmarks/moe_layer.py --train               # also forward+backward, triton vs sorted
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from moesaic import kernels
from moesaic.kernels.triton.autotune import random_problem, random_routing

SHAPES = {  # name: (D, F, E, K)
    "Mixtral-8x7B": (4096, 14336, 8, 2),
    "Qwen3-30B-A3B": (2048, 768, 128, 8),
    "OLMoE-1B-7B": (2048, 1024, 64, 8),
    "DeepSeek-V3": (7168, 2048, 256, 8),
    "tiny": (256, 512, 8, 2),
}
TOKENS = [1, 8, 64, 512, 4096, 16384]
GRAPH_CALLS = 10  # layer calls per CUDA graph for "triton+graph" (time and floor are per call)


def bench(fn, device: str, rep_ms: int = 100) -> float:
    """Median seconds per call."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1e-3
    fn()
    times = []
    t_end = time.perf_counter() + rep_ms * 1e-3
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(device: str) -> dict:
    """Measured copy bandwidth (bytes read + written per s) and bf16 matmul rate (FLOP/s)."""
    if device != "cuda":
        n = 2048
        a = torch.randn(n, n)
        t = bench(lambda: a @ a, device)
        buf = torch.randn(1 << 24)
        tc = bench(lambda: buf.clone(), device)
        return {"copy_Bps": 2 * buf.numel() * 4 / tc, "matmul_flops": 2 * n ** 3 / t, "matmul_dtype": "float32"}
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    tc = bench(lambda: dst.copy_(src), device)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    tm = bench(lambda: a @ b, device)
    return {"copy_Bps": 2 * (1 << 30) / tc, "matmul_flops": 2 * n ** 3 / tm, "matmul_dtype": "bfloat16"}


def hf_experts(w13, w2, k: int, impl: str):
    """transformers' MixtralExperts sharing our weights, with the given experts implementation."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    e, g, d = w13.shape
    cfg = MixtralConfig(hidden_size=d, intermediate_size=g // 2, num_local_experts=e, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    with torch.device("meta"):
        mod = MixtralExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    mod.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return lambda x, ids, w: mod(x, ids, w)


def torch_grouped_mm(x, w13, w2, ids, w):
    """The plain torch._grouped_mm pipeline: sort, gather, grouped GEMM, SwiGLU, grouped GEMM, scatter-add."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat)
    offs = torch.cumsum(torch.bincount(flat, minlength=w13.shape[0]), 0).to(torch.int32)
    tok = order // k
    h = torch._grouped_mm(x[tok], w13.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    o = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    o = o.float() * w.reshape(-1)[order, None].float()
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, o).to(x.dtype)


def graph_replay(fn):
    """Capture fn() in a CUDA graph (after warm-up on a side stream); return the replay callable.
    fn may make several calls (run_point's graph holds GRAPH_CALLS layer calls)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def implementations(device: str, w13, w2, k: int) -> dict:
    impls = {}
    try:
        impls["hf_eager"] = hf_experts(w13, w2, k, "eager")
        if device == "cuda":
            impls["hf_grouped_mm"] = hf_experts(w13, w2, k, "grouped_mm")
    except Exception as err:  # transformers missing or its API moved: report, keep going
        print(f"# transformers peers unavailable: {err!r}", file=sys.stderr)
    if device == "cuda" and hasattr(torch, "_grouped_mm"):
        impls["torch_grouped_mm"] = lambda x, ids, w: torch_grouped_mm(x, w13, w2, ids, w)
    for name in ("sorted", "triton"):
        if name in kernels.available_backends():
            impls[name] = (lambda x, ids, w, name=name: kernels.moe_experts(x, w13, w2, ids, w, backend=name))
    return impls


def run_point(name, shape, t, impls, w13, w2, ceil, device, dtype, rep_ms, graph_max_t, repeats=1) -> dict:
    """One grid point: every implementation checked against the reference, then timed; with repeats > 1 the
    implementations are timed in alternation, `repeats` rounds, and the median is reported (a GPU at its power
    cap drifts by several percent within a minute, which would otherwise favour whichever ran first)."""
    d, f, e, k = shape
    x, _, _, ids, w = random_problem(t, d, f, e, k, dtype, torch.device(device), seed=t)
    flops = 6.0 * t * k * d * f
    unique = int(torch.unique(ids).numel())
    wbytes = unique * 3 * d * f * w13.element_size()
    floor = max(flops / ceil["matmul_flops"], wbytes / ceil["copy_Bps"])
    ref = kernels.moe_experts(x, w13, w2, ids, w, backend="reference")
    row = {"shape": name, "T": t, "D": d, "F": f, "E": e, "K": k, "unique_experts": unique, "flops": flops,
           "weight_bytes": wbytes, "floor_s": floor, "impls": {}}
    todo = dict(impls)
    if device == "cuda" and "triton" in impls and t <= graph_max_t:
        todo["triton+graph"] = None
        # GRAPH_CALLS calls in one graph, as consecutive layers run in the engine's captured decode step (one
        # graph launch a step, not a layer); each routes differently (another layer's experts: no L2 reuse)
        routes = [(ids, w)] + [random_routing(t, e, k, torch.device(device), seed=7919 * t + i)
                               for i in range(1, GRAPH_CALLS)]
        g_floor = statistics.mean(max(flops / ceil["matmul_flops"], int(torch.unique(r[0]).numel()) * 3 * d * f
                                      * w13.element_size() / ceil["copy_Bps"]) for r in routes)
    ready = {}  # name -> (timed callable, calls per timed call, rel err)
    for iname, fn in todo.items():
        try:
            if iname == "triton+graph":
                ready[iname] = (graph_replay(lambda: [impls["triton"](x, r_ids, r_w) for r_ids, r_w in routes]),
                                GRAPH_CALLS, None)
                continue
            fn(x, ids, w)  # first call compiles/tunes; check the steady-state (fast-launch) output
            y = fn(x, ids, w)
            err = float((y.float() - ref.float()).norm() / ref.float().norm())
            ready[iname] = (lambda fn=fn: fn(x, ids, w), 1, err)
        except Exception as exc:  # e.g. out of memory in a peer: record and go on
            row["impls"][iname] = {"error": repr(exc)[:200]}
            torch.cuda.empty_cache() if device == "cuda" else None
    times: dict[str, list[float]] = {n: [] for n in ready}
    for _ in range(max(1, repeats)):
        for iname, (call, calls, _) in ready.items():
            if iname in row["impls"]:  # failed in an earlier round
                continue
            try:
                times[iname].append(bench(call, device, rep_ms) / calls)
            except Exception as exc:
                row["impls"][iname] = {"error": repr(exc)[:200]}
                torch.cuda.empty_cache() if device == "cuda" else None
    for iname, (_, _, err) in ready.items():
        if iname in row["impls"]:
            continue
        sec = statistics.median(times[iname])
        fl = g_floor if iname == "triton+graph" else floor
        row["impls"][iname] = {"time_s": sec, "tflops": flops / sec / 1e12, "GBps": wbytes / sec / 1e9,
                               "efficiency": fl / sec, "rel_err_vs_reference": err}
        if len(times[iname]) > 1:
            row["impls"][iname]["times_s"] = times[iname]
        if iname == "triton+graph":
            row["impls"][iname]["calls_per_graph"] = GRAPH_CALLS
    return row


def train_point(name, shape, t, w13, w2, device, dtype, rep_ms) -> dict:
    """Forward + backward of moe_experts (grads for x, w13, w2, weights): triton vs sorted."""
    d, f, e, k = shape
    x, _, _, ids, w = random_problem(t, d, f, e, k, dtype, torch.device(device), seed=t + 1)
    out = {"shape": name, "T": t}
    a13 = w13.detach().requires_grad_()
    a2 = w2.detach().requires_grad_()
    xg = x.requires_grad_()
    wg = w.requires_grad_()
    dy = torch.randn_like(x)
    grads = {}
    for backend in ("sorted", "triton"):
        def step(backend=backend):
            for p in (a13, a2, xg, wg):
                p.grad = None
            kernels.moe_experts(xg, a13, a2, ids, wg, backend=backend).backward(dy)
        try:
            step()
            # experts 0-1 of the weight grads only: full fp32 copies of DeepSeek-sized grads would not fit twice
            grads[backend] = [xg.grad.float(), a13.grad[:2].float(), a2.grad[:2].float(), wg.grad.float()]
            out[backend] = bench(step, device, rep_ms)
        except Exception as exc:
            out[backend] = repr(exc)[:200]
    if len(grads) == 2:
        out["grad_rel_err"] = [float((a - b).norm() / b.norm()) for a, b in zip(grads["triton"], grads["sorted"])]
    del grads
    for p in (a13, a2):
        p.grad = None
    return out


def profile_point(name, t, rep_ms) -> None:
    """Where the time goes for one point: per-stage GPU times and the host-side cost of one call."""
    import cProfile
    import pstats

    from moesaic.kernels.triton import autotune, ops
    from moesaic.kernels.triton.align import align

    d, f, e, k = SHAPES[name]
    x, w13, w2, ids, w = random_problem(t, d, f, e, k, torch.bfloat16, torch.device("cuda"), seed=t)
    cfg = autotune.get_config(t, d, f, e, k, x.dtype, x.device)
    print(f"# profile {name} T={t} config {cfg}")
    stages = {"full": lambda: kernels.moe_experts(x, w13, w2, ids, w, backend="triton"),
              "ops.forward": lambda: ops.forward(x, w13, w2, ids, w, cfg)}
    if cfg.path == "grouped":
        al = align(ids, e, cfg.bm)
        act, _ = ops.run_w13(x, w13, al, k, cfg.gemm1, False)
        o = torch.empty((t * k, d), dtype=x.dtype, device=x.device)
        stages["align"] = lambda: align(ids, e, cfg.bm)
        stages["w13"] = lambda: ops.run_w13(x, w13, al, k, cfg.gemm1, False)
        stages["w2"] = lambda: ops.run_mm(act, w2, (w2.stride(0), w2.stride(2), w2.stride(1)), o, al, k, d, f,
                                          cfg.gemm2, a_gather=False, out_pair=True)
        stages["combine"] = lambda: ops.run_combine(o, ids.reshape(-1), w.reshape(-1), t, d, k, x.dtype, e)
    for sname, fn in stages.items():
        print(f"#   {sname}: {bench(fn, 'cuda', rep_ms) * 1e6:.1f} us (GPU, events)")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        host = (time.perf_counter() - t0) / 50
        torch.cuda.synchronize()
        print(f"#   {sname}: {host * 1e6:.1f} us host enqueue per call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(100):
        stages["full"]()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def profile_train(name, t, rep_ms) -> None:
    """GPU time of each forward-with-save and backward stage of the triton backend."""
    from moesaic.kernels.triton import autotune, launch, ops

    d, f, e, k = SHAPES[name]
    x, w13, w2, ids, w = random_problem(t, d, f, e, k, torch.bfloat16, torch.device("cuda"), seed=t)
    cfg = autotune.get_config(t, d, f, e, k, x.dtype, x.device)
    cfg = cfg if cfg.path == "grouped" else launch.heuristic(max(t, 64), d, f, e, k)
    y, saved = ops.forward_grouped(x, w13, w2, ids, w, cfg, save=True)
    dy = torch.randn_like(y)
    stages = {
        "forward(save)": lambda: ops.forward_grouped(x, w13, w2, ids, w, cfg, save=True),
        "forward": lambda: ops.forward_grouped(x, w13, w2, ids, w, cfg, save=False),
        "backward dx": lambda: ops.backward_grouped(dy, x, w13, w2, ids, w, saved, (1, 0, 0, 0, 0)),
        "backward dx+dw13": lambda: ops.backward_grouped(dy, x, w13, w2, ids, w, saved, (1, 1, 0, 0, 0)),
        "backward dw2": lambda: ops.backward_grouped(dy, x, w13, w2, ids, w, saved, (0, 0, 1, 0, 0)),
        "backward dweights": lambda: ops.backward_grouped(dy, x, w13, w2, ids, w, saved, (0, 0, 0, 0, 1)),
    }
    print(f"# profile-train {name} T={t} config {cfg}")
    for sname, fn in stages.items():
        print(f"#   {sname}: {bench(fn, 'cuda', rep_ms) * 1e6:.1f} us")


MODEL_SHAPES = {  # whole-model training step: a few decoder layers at the real expert shapes
    "Mixtral-8x7B": dict(d_model=4096, n_heads=32, n_kv_heads=8, ffn=14336, num_experts=8, top_k=2,
                         expert_ffn=14336, n_layers=2),
    "Qwen3-30B-A3B": dict(d_model=2048, n_heads=32, n_kv_heads=4, ffn=6144, num_experts=128, top_k=8,
                          expert_ffn=768, n_layers=4),
}


def train_model_step(name: str, batch: int, seq: int, rep_ms: int) -> dict:
    """One optimizer step (forward, cross-entropy, backward, AdamW) of a bf16 moesaic Transformer,
    with the MoE layers on the sorted backend and on the triton backend."""
    from moesaic.config import ModelConfig
    from moesaic.model.transformer import Transformer

    cfg = ModelConfig.preset("tiny", vocab_size=32000, max_seq_len=seq, **MODEL_SHAPES[name])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built on the GPU in bf16: a CPU fp32 init took ~40 s
    try:
        with torch.device("cuda"):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(prev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # what a GPU trainer uses
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    out = {"shape": name, "layers": cfg.n_layers, "tokens": batch * seq}

    def step():
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for backend in ("sorted", "triton"):
        model.set_moe_backend(backend)
        step()
        out[backend] = bench(step, "cuda", rep_ms)
    out["speedup"] = out["sorted"] / out["triton"]
    return out


def print_table(rows, impl_names) -> None:
    print("\n| shape | T | floor us | " + " | ".join(f"{n} us (eff)" for n in impl_names)
          + " | triton TFLOP/s | triton GB/s | triton err |")
    print("|---|---|---|" + "---|" * len(impl_names) + "---|---|---|")
    for r in rows:
        cells = []
        for n in impl_names:
            m = r["impls"].get(n)
            cells.append("-" if m is None else ("ERR" if "error" in m else f"{m['time_s'] * 1e6:.1f} ({m['efficiency']:.2f})"))
        tr = r["impls"].get("triton", {})
        tail = ([f"{tr['tflops']:.0f}", f"{tr['GBps']:.0f}", f"{tr['rel_err_vs_reference']:.1e}"]
                if "time_s" in tr else ["-", "-", "-"])
        print(f"| {r['shape']} | {r['T']} | {r['floor_s'] * 1e6:.1f} | " + " | ".join(cells) + " | "
              + " | ".join(tail) + " |")


def summary(rows) -> dict:
    """Geometric-mean speedup of triton over each peer, and the worst triton efficiencies."""
    out = {}
    for peer in ("hf_grouped_mm", "hf_eager", "torch_grouped_mm", "sorted"):
        ratios = [r["impls"][peer]["time_s"] / r["impls"]["triton"]["time_s"] for r in rows
                  if "time_s" in r["impls"].get(peer, {}) and "time_s" in r["impls"].get("triton", {})]
        if ratios:
            out[f"geomean_speedup_vs_{peer}"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
            out[f"min_speedup_vs_{peer}"] = min(ratios)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--shapes", nargs="*", default=None, help=f"from {list(SHAPES)}")
    p.add_argument("--tokens", nargs="*", type=int, default=None)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--repeats", type=int, default=1,
                   help="time the implementations of each point in alternation this many rounds; report the median")
    p.add_argument("--graph-max-t", type=int, default=64, help="also time triton from a CUDA graph up to this T")
    p.add_argument("--train", action="store_true", help="also time forward+backward (triton vs sorted)")
    p.add_argument("--train-tokens", nargs="*", type=int, default=[4096])
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/moe_layer_<device>.json)")
    p.add_argument("--profile", nargs=2, metavar=("SHAPE", "T"), action="append", default=[],
                   help="print the stage breakdown and host overhead of one point, then exit")
    p.add_argument("--train-batch", type=int, default=16,
                   help="--train-model: sequences of 1,024 tokens per step (16: 16,384 tokens, a real training step)")
    p.add_argument("--train-model", nargs="*", default=None, metavar="SHAPE",
                   help=f"time a whole-model optimizer step, sorted vs triton (from {list(MODEL_SHAPES)}), then exit")
    p.add_argument("--profile-train", nargs=2, metavar=("SHAPE", "T"), action="append", default=[],
                   help="print the forward/backward stage times of one point, then exit")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"--repeats must be >= 1, got {a.repeats}")
    dev = a.device
    if a.train_model is not None:
        res = [train_model_step(n, a.train_batch, 1024, a.rep_ms) for n in (a.train_model or list(MODEL_SHAPES))]
        for r in res:
            print(f"# model step {r['shape']} ({r['layers']} layers, {r['tokens']} tokens): sorted "
                  f"{r['sorted'] * 1e3:.1f} ms, triton {r['triton'] * 1e3:.1f} ms, speedup {r['speedup']:.2f}x")
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return
    if a.profile or a.profile_train:
        for name, t in a.profile:
            profile_point(name, int(t), a.rep_ms)
        for name, t in a.profile_train:
            profile_train(name, int(t), a.rep_ms)
        return
    shapes = a.shapes or (["tiny"] if dev == "cpu" else [s for s in SHAPES if s != "tiny"])
    tokens = a.tokens or ([1, 8, 64, 512] if dev == "cpu" else TOKENS)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    ceil = ceilings(dev)
    print(f"# device {torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or 'cpu'}; "
          f"copy {ceil['copy_Bps'] / 1e9:.0f} GB/s, {ceil['matmul_dtype']} matmul "
          f"{ceil['matmul_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    rows, train_rows = [], []
    for name in shapes:
        d, f, e, k = SHAPES[name]
        _, w13, w2, _, _ = random_problem(1, d, f, e, k, dtype, torch.device(dev), seed=123)
        impls = implementations(dev, w13, w2, k)
        for t in tokens:
            t0 = time.time()
            rows.append(run_point(name, (d, f, e, k), t, impls, w13, w2, ceil, dev, dtype, a.rep_ms,
                                  a.graph_max_t, a.repeats))
            tri = rows[-1]["impls"].get("triton", {})
            errs = {n: (m["rel_err_vs_reference"] if "time_s" in m else m["error"][:60])
                    for n, m in rows[-1]["impls"].items() if n != "triton+graph"}
            print(f"# {name} T={t} done in {time.time() - t0:.1f}s; triton "
                  f"{tri.get('time_s', float('nan')) * 1e6:.1f} us eff {tri.get('efficiency', float('nan')):.2f}; "
                  f"rel err vs reference {errs}", flush=True)
        if a.train and "triton" in impls:
            for t in a.train_tokens:
                train_rows.append(train_point(name, (d, f, e, k), t, w13, w2, dev, dtype, a.rep_ms))
                print(f"# train {train_rows[-1]}", flush=True)
        del w13, w2, impls
        if dev == "cuda":
            torch.cuda.empty_cache()
        write_json(a.json, dev, ceil, rows, train_rows)  # after every shape: a cut-off run keeps its rows
    names = [n for n in ("hf_eager", "hf_grouped_mm", "torch_grouped_mm", "sorted", "triton", "triton+graph")
             if any(n in r["impls"] for r in rows)]
    print_table(rows, names)
    summ = summary(rows)
    for key, v in summ.items():
        print(f"# {key}: {v:.2f}")
    for tr in train_rows:
        if isinstance(tr.get("triton"), float) and isinstance(tr.get("sorted"), float):
            print(f"# train fwd+bwd {tr['shape']} T={tr['T']}: sorted {tr['sorted'] * 1e3:.2f} ms, triton "
                  f"{tr['triton'] * 1e3:.2f} ms, speedup {tr['sorted'] / tr['triton']:.2f}x, grad err {tr.get('grad_rel_err')}")
    write_json(a.json, dev, ceil, rows, train_rows)


def write_json(path_arg, dev, ceil, rows, train_rows) -> None:
    env = {"device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor(),
           "torch": torch.__version__, "python": platform.python_version(), **ceil}
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    path = Path(path_arg or f"benchmarks/results/moe_layer_{dev}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"env": env, "rows": rows, "train": train_rows, "summary": summary(rows)}, indent=1))
    os.replace(tmp, path)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
