"""Decode throughput: moesaic's engine vs Hugging Face transformers `generate` vs a dense twin.

Question: does a sparse model decode at the speed its *active* parameters allow, and how close to
the memory-bandwidth floor does the engine get?

For each MoE shape (coarse: 8 experts top-2; fine-grained: 64 experts top-8) and batch size
(1, 8, 32), in one run on the very same random weights:
  moesaic     the Engine (greedy, continuous batching; fp32, and bf16 / int8 weight-only at batch 1..32)
  hf          transformers' own `generate` (greedy, KV cache) on the model exported with
              moesaic.checkpoint.export (Mixtral / Qwen3-MoE) and loaded by transformers
  dense       a dense moesaic model with the same total parameters, run by the Engine
Decode time excludes the prefill: moesaic times its decode steps; for transformers a logits
processor stamps the clock at each step (the first stamp is right after the prefill forward).
The step time is the median over the decode steps (after two warm-up steps): the cores are shared.

Floor = bytes of weights one decode step reads (the unique experts the batch's tokens chose in
each MoE layer, counted with a hook during the moesaic run, + attention, norms, routers, LM head;
not the embedding table) / read bandwidth measured here (a large-array sum on all cores).
Efficiency = floor / measured step time.

    python benchmarks/decode.py                 # both shapes, batch 1 8 32 (~4 min on 2 busy cores)
    python benchmarks/decode.py --threads 1     # steadier on a shared machine (OpenMP spin-waits stall
                                                # when another job holds a core)
    python benchmarks/decode.py --quick         # tiny smoke run

OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE unless the environment sets it): with the
default spin-waiting, a 2-thread step on 2 cores shared with another job took 14x longer (302 vs 22 ms,
coarse shape, batch 1) because each parallel region waits for a descheduled spinning thread.
Float moesaic runs use `Engine(pack_weights=True)` (oneDNN-blocked weight copies; --no-pack
turns it off; fp32 one-row steps use the plain weights anyway, bf16 uses the copies at every batch).
THP_MEM_ALLOC_ENABLE=1 (unless the environment sets it): torch backs large tensors with transparent huge
pages (fewer TLB misses while streaming weights: batch-1 steps up to 1.1x faster here); the bandwidth
probe runs under the same setting, so the floor uses the faster huge-page bandwidth too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# must be set before torch (and its OpenMP runtime) loads; an explicit environment setting wins
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch's CPU allocator puts large allocations in transparent huge pages (oneDNN-blocked copies, activations,
# and the bandwidth probe below, so the floor uses the faster huge-page read bandwidth too)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from moesaic import ModelConfig, build_model  # noqa: E402
from moesaic.inference import Engine, SamplingParams  # noqa: E402
from moesaic.inference.quantize import unpack_weights  # noqa: E402

# int8 rows: (quantize scheme, quantize_linears, dtype of the rest). "w8a8" is llama.cpp's q8_0 setting: every
# linear but the routers int8 with int8 activations, norms / embedding / KV cache fp32; "int8" the weight-only
# int8 experts (`--quantize int8`) with the rest in bf16 (the "int8" row of session 3's tables); "int8-all"
# weight-only with the layout of "w8a8" (the same-process A/B of the activation quantization alone).
INT8 = {"w8a8": ("w8a8", True, torch.float32), "int8": ("int8", False, torch.bfloat16),
        "int8-all": ("int8", True, torch.float32)}
SHAPES = {  # the anchors: 4 layers, D=1024, vocab 8000
    "coarse-8x2": dict(vocab_size=8000, d_model=1024, n_layers=4, n_heads=16, n_kv_heads=4, max_seq_len=256,
                       num_experts=8, top_k=2, expert_ffn=2816, ffn=2816),
    "fine-64x8": dict(vocab_size=8000, d_model=1024, n_layers=4, n_heads=16, n_kv_heads=4, max_seq_len=256,
                      num_experts=64, top_k=8, expert_ffn=512, ffn=2816, qk_norm="head"),
}
HF_ARCH = {"coarse-8x2": "MixtralForCausalLM", "fine-64x8": "Qwen3MoeForCausalLM"}
QUICK = {"tiny-8x2": dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                          num_experts=8, top_k=2, expert_ffn=256, ffn=256)}
QUICK_ARCH = {"tiny-8x2": "MixtralForCausalLM"}


# ------------------------------------------------------------------ measurements
def read_bandwidth(gb: float = 1.0, reps: int = 5) -> float:
    """Bytes/s of a large fp32 sum on all threads (best of reps)."""
    a = torch.ones(int(gb * 2**30) // 4)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best


def matmul_rate(reps: int = 5) -> float:
    """FLOP/s of a compute-bound fp32 matmul ([256, 1024] x [1024, 4096]) on the torch threads (best of reps).
    Batched decode steps do 2 x batch x active-parameter FLOPs: at batch 32 that, not bandwidth, bounds them."""
    a, b = torch.randn(256, 1024), torch.randn(1024, 4096)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 256 * 1024 * 4096 / best


class ExpertCounter:
    """Forward hooks on the MoE layers: unique experts chosen per call, summed over layers."""

    def __init__(self, model) -> None:
        self.calls: list[list[int]] = []
        self._handles = [m.register_forward_hook(self._hook) for m in model.moe_layers()]
        self.per_step: list[int] = []
        self._cur: list[int] = []

    def _hook(self, module, args, out) -> None:
        ids = out[1].expert_ids_TK
        self._cur.append(int(torch.unique(ids[ids >= 0]).numel()))

    def end_step(self) -> None:
        self.per_step.append(sum(self._cur))
        self._cur = []

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def weight_bytes(model, unique_experts_per_step: float, dtype_bytes: float, expert_bytes: float | None = None) -> float:
    """Bytes one decode step reads: everything but the embedding and routed experts, + the chosen experts."""
    total = 0
    routed = 0
    per_expert = 0
    for name, p in model.named_parameters():
        if name.startswith("embed."):
            continue
        n = p.numel()
        if ".experts." in name and ".shared" not in name:
            routed += n
            continue
        total += n * dtype_bytes
    layers = model.moe_layers()
    if layers:
        per_expert = layers[0].experts.params_per_expert
    eb = dtype_bytes if expert_bytes is None else expert_bytes
    return total + unique_experts_per_step * per_expert * eb


def stored_bytes(model, unique_experts_per_step: float) -> float:
    """`weight_bytes` from the tensors as stored (int8 weights + their scales, float elsewhere)."""
    total, per_expert = 0.0, 0.0
    layers = model.moe_layers()
    scales = [(n, b) for n, b in model.named_buffers() if n.split(".")[-1] in ("scale", "s13", "s2")]
    for name, t in [*model.named_parameters(), *scales]:
        if name.startswith("embed."):
            continue
        nbytes = t.numel() * t.element_size()
        if ".experts." in name and ".shared" not in name:
            per_expert += nbytes / layers[0].experts.num_experts / len(layers)
        else:
            total += nbytes
    return total + unique_experts_per_step * per_expert


def run_moesaic(model, batch: int, prompt_len: int, new_tokens: int, pack: bool = True, **engine_kw) -> dict:
    engine_kw.setdefault("pack_weights", pack)
    eng = Engine(model, max_batch=batch, max_len=prompt_len + new_tokens + 2, **engine_kw)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    steps, counted = [], []
    # two identical greedy passes: the first timed, the second with the hooks that count the experts each step
    # chose (for the floor); hooks in the timed pass would add their own Python (~0.1 ms a step) to every step
    for timed in (True, False):
        counter = None if timed else ExpertCounter(model)
        for p in prompts:
            eng.submit(p, params)
        eng.step()  # admits everyone and prefills (one forward per request)
        if counter is not None:
            counter._cur = []
        while eng.has_unfinished():
            t = time.perf_counter()
            eng.step()
            if counter is None:
                steps.append(time.perf_counter() - t)
            else:
                counter.end_step()
        if counter is not None:
            counter.close()
            counted = counter.per_step
    unpack_weights(model)  # free the packed copies (the next run packs for itself if it wants them)
    warm = 2 if len(steps) > 4 else 0  # the first decode steps create kernels' primitives
    dt = statistics.median(steps[warm:])  # the median: other people's jobs share these cores
    uniq = sum(counted[warm:]) / max(1, len(counted[warm:]))
    return {"step_s": dt, "tokens_per_s": batch / dt, "unique_experts_per_step": uniq}


def build_hf(model, arch: str, dtype: torch.dtype):
    """Our weights in transformers: export with moesaic.checkpoint.export, load with from_pretrained."""
    from transformers import AutoModelForCausalLM

    from moesaic.checkpoint.export import export_hf

    tmp = Path(tempfile.mkdtemp(prefix="moesaic-bench-"))
    try:
        export_hf(model, tmp / "hf", arch=arch)
        hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=dtype).eval()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf


def run_hf(hf, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    stamp = Stamp()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens + 1,
                    min_new_tokens=new_tokens + 1, do_sample=False, pad_token_id=0, eos_token_id=None,
                    logits_processor=LogitsProcessorList([stamp]))
    gaps = [b - a for a, b in zip(stamp.times, stamp.times[1:])]
    warm = 2 if len(gaps) > 4 else 0
    dt = statistics.median(gaps[warm:])
    return {"step_s": dt, "tokens_per_s": batch / dt}


@torch.no_grad()
def hf_parity(model, hf, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, 12))
    ours = model(ids).float()
    theirs = hf(ids).logits.float()
    return float((ours - theirs).abs().max() / ours.abs().max())


# ------------------------------------------------------------------ driver
def bench_shape(name: str, shape: dict, arch: str, args, bw: float, flops: float) -> list[dict]:
    rows: list[dict] = []
    torch.manual_seed(0)
    cfg = ModelConfig(**shape)
    model = build_model(cfg).eval()
    pc = model.count_params()
    total, active = pc.total_with_embeddings, pc.active_with_embeddings
    print(f"\n== {name}: {total / 1e6:.0f}M params, {active / 1e6:.0f}M active per token "
          f"({cfg.num_experts} experts top-{cfg.top_k}, D={cfg.d_model}, F={cfg.expert_ffn}, L={cfg.n_layers})",
          flush=True)

    def add(system, precision, batch, res, floor_bytes, matmul_params=None):
        floor = floor_bytes / bw
        # fp32 matmul FLOPs (2 per active non-embedding parameter and token) at the measured matmul rate
        compute = 2 * batch * (matmul_params or active - pc.embedding) / flops
        row = dict(shape=name, system=system, precision=precision, batch=batch, tokens_per_s=res["tokens_per_s"],
                   step_ms=res["step_s"] * 1e3, floor_ms=floor * 1e3, efficiency=floor / res["step_s"],
                   compute_floor_ms=compute * 1e3, unique_experts_per_step=res.get("unique_experts_per_step"))
        rows.append(row)
        print(f"{name:11s} {system:8s} {precision:11s} B={batch:<3d} {row['tokens_per_s']:8.1f} tok/s  "
              f"step {row['step_ms']:7.2f} ms  floor {row['floor_ms']:6.2f} ms  eff {row['efficiency']:.2f}  "
              f"(fp32 FLOP floor {row['compute_floor_ms']:6.2f} ms)", flush=True)

    uniq: dict[int, float] = {}
    hf = None
    if not args.skip_hf:
        hf = build_hf(model, arch, torch.float32)
        print(f"   transformers {arch} experts_implementation={getattr(hf.config, '_experts_implementation', '?')} "
              f"max rel logit diff vs moesaic {hf_parity(model, hf, cfg.vocab_size):.1e}", flush=True)
    for b in args.batches:  # fp32 first (it also counts the unique experts per step)
        # --hf-pairs N: moesaic and transformers alternate N times (this VM's bandwidth drifts by up to 2x within
        # minutes, so runs minutes apart do not compare alike); each system's row is its median run
        ours, theirs = [], []
        for _ in range(args.hf_pairs if hf is not None else 1):
            ours.append(run_moesaic(model, b, args.prompt_len, args.new_tokens, pack=args.pack, backend=args.backend))
            if hf is not None:
                theirs.append(run_hf(hf, b, args.prompt_len, args.new_tokens, cfg.vocab_size))
        res = sorted(ours, key=lambda r: r["step_s"])[len(ours) // 2]
        uniq[b] = res["unique_experts_per_step"]
        add("moesaic", "fp32", b, res, weight_bytes(model, uniq[b], 4))
        if theirs:
            add("hf", "fp32", b, sorted(theirs, key=lambda r: r["step_s"])[len(theirs) // 2],
                weight_bytes(model, uniq[b], 4))
            if len(theirs) > 1:
                rows[-1]["paired_ratios"] = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(ours, theirs)]
                print(f"   moesaic / transformers fp32 B={b}, each pair: "
                      + " ".join(f"{r:.2f}x" for r in rows[-1]["paired_ratios"]), flush=True)
    if hf is not None:
        if "bf16" in args.precisions and 1 in uniq:  # transformers in bf16: batch 1 only
            hf = hf.to(torch.bfloat16)
            add("hf", "bf16", 1, run_hf(hf, 1, args.prompt_len, args.new_tokens, cfg.vocab_size),
                weight_bytes(model, uniq[1], 2))
        del hf
    if "bf16" in args.precisions:
        mb = copy.deepcopy(model).to(torch.bfloat16)
        for b in args.batches:
            add("moesaic", "bf16", b, run_moesaic(mb, b, args.prompt_len, args.new_tokens, pack=args.pack,
                                                  backend=args.backend),
                weight_bytes(mb, uniq[b], 2))
        del mb
    # the int8 variants interleaved --repeats times (each its median step time): a same-process A/B on this VM
    int8 = {p: copy.deepcopy(model).to(v[2]) for p, v in INT8.items() if p in args.precisions}
    for b in args.batches:
        runs: dict[str, list[dict]] = {p: [] for p in int8}
        for _ in range(args.repeats):
            for prec, mq in int8.items():
                scheme, linears, _ = INT8[prec]
                runs[prec].append(run_moesaic(mq, b, args.prompt_len, args.new_tokens, quantize=scheme,
                                              quantize_linears=linears))
        for prec, rs in runs.items():
            res = sorted(rs, key=lambda r: r["step_s"])[len(rs) // 2]
            if len(rs) > 1:
                print(f"   {prec} B={b} tok/s of each repeat: " + " ".join(f"{r['tokens_per_s']:.1f}" for r in rs))
            add("moesaic", prec, b, res, stored_bytes(int8[prec], uniq[b]))
    del int8
    del model
    if not args.skip_dense:
        dcfg = cfg.dense_twin("total")
        torch.manual_seed(1)
        dense = build_model(dcfg).eval()
        print(f"   dense twin: ffn={dcfg.ffn}, {dense.count_params().total_with_embeddings / 1e6:.0f}M params", flush=True)
        for b in args.batches:
            dpc = dense.count_params()
            add("dense", "fp32", b, run_moesaic(dense, b, args.prompt_len, args.new_tokens), weight_bytes(dense, 0, 4),
                matmul_params=dpc.active + dpc.lm_head)
        del dense
    for r in rows:
        r.update(total_params=total, active_params=active)
    return rows


def summary(rows: list[dict]) -> list[str]:
    out = []
    get = {(r["shape"], r["system"], r["precision"], r["batch"]): r for r in rows}
    for shape in sorted({r["shape"] for r in rows}):
        for b in sorted({r["batch"] for r in rows}):
            m, h, d = (get.get((shape, s, "fp32", b)) for s in ("moesaic", "hf", "dense"))
            if m is None:
                continue
            parts = [f"{shape} B={b}:"]
            if h:
                parts.append(f"moesaic/hf {m['tokens_per_s'] / h['tokens_per_s']:.2f}x")
                if h.get("paired_ratios"):
                    pr = sorted(h["paired_ratios"])
                    parts.append(f"(paired runs: median {pr[len(pr) // 2]:.2f}x, {pr[0]:.2f}-{pr[-1]:.2f}x)")
            if d:
                ratio = m["tokens_per_s"] / d["tokens_per_s"]
                ideal = m["total_params"] / m["active_params"]
                parts.append(f"moe/dense {ratio:.2f}x (total/active {ideal:.2f}; target >= {0.6 * ideal:.2f})")
            out.append(" ".join(parts))
    return out


def markdown_table(rows: list[dict]) -> str:
    """One line per (shape, system, precision): tokens/s and efficiency at each batch size."""
    batches = sorted({r["batch"] for r in rows})
    head = "| shape | system | precision | " + " | ".join(f"B={b} tok/s (eff)" for b in batches) + " |"
    lines = [head, "|" + "---|" * (3 + len(batches))]
    keys = []
    for r in rows:
        k = (r["shape"], r["system"], r["precision"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        cells = []
        for b in batches:
            r = next((r for r in rows if (r["shape"], r["system"], r["precision"]) == k and r["batch"] == b), None)
            cells.append(f"{r['tokens_per_s']:.1f} ({r['efficiency']:.2f})" if r else "-")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"of {list(SHAPES)}")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8", "w8a8"],
                    help=f"of fp32 bf16 {' '.join(INT8)}")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--backend", default=None, help="MoE kernels backend for moesaic (default: engine's choice)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: all cores; 1 is far steadier when other jobs share the cores)")
    ap.add_argument("--no-pack", dest="pack", action="store_false",
                    help="no oneDNN-blocked weight copies (the engine's default)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the int8 variants this many times, interleaved, and report each one's median run")
    ap.add_argument("--hf-pairs", type=int, default=1,
                    help="fp32: alternate moesaic and transformers runs this many times per batch (paired ratios)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a tiny shape, batch 1 and 4, few tokens")
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, archs = {k: SHAPES[k] for k in args.shapes}, HF_ARCH
    if args.quick:
        shapes, archs, args.batches, args.new_tokens, args.prompt_len = QUICK, QUICK_ARCH, [1, 4], 8, 8
    bw, flops = read_bandwidth(), matmul_rate()
    import transformers

    env = dict(torch=torch.__version__, transformers=transformers.__version__, python=sys.version.split()[0],
               cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               cpus=os.cpu_count(), read_bandwidth_GBps=bw / 1e9, fp32_matmul_GFLOPs=flops / 1e9,
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
               thp_mem_alloc_enable=os.environ.get("THP_MEM_ALLOC_ENABLE"),
               load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
    print(f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads "
          f"(OMP_WAIT_POLICY={env['omp_wait_policy']}, THP_MEM_ALLOC_ENABLE={env['thp_mem_alloc_enable']}), "
          f"read bandwidth {bw / 1e9:.1f} GB/s, fp32 matmul {flops / 1e9:.0f} GFLOP/s, load average "
          f"{env['load_average']}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens")
    rows: list[dict] = []
    for name, shape in shapes.items():
        rows += bench_shape(name, shape, archs[name], args, bw, flops)
    print()
    print(markdown_table(rows))
    print()
    for line in summary(rows):
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(env=env, args=vars(args), rows=rows), indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
