"""One H200 session for the grouped-GEMM variants (TMA loads, persistent grid): check, retune, measure.

    python benchmarks/gpu_tune_check.py OUTDIR [--budget-s 330]

Parts, each a subprocess under a timeout carved from the budget (a crash in one cannot take the others):
 1. warm   8 processes compile every large-T candidate GEMM config (bf16, row blocks 128 and 64) on a small
           problem with the benchmark shapes' specialization (filling Triton's disk cache for the rest)
           and check each against the reference, forward and (a few) training forward + backward.
           A config that fails or whose process dies is excluded from tuning.
 2. tune   the large-T benchmark shapes (fine-grained first), one at a time: the shipped config is
           timed first (the baseline, same process), then the candidates (launch.gemm_candidates with
           the variants), each checked against the reference backend at full size; winners go to
           OUTDIR/cache/triton/<device>.json. Per-shape old/new times in OUTDIR/tune.json.
 3. layer  benchmarks/moe_layer.py on the four shapes at T = 4096 and 16384 with the new configs
           (triton vs transformers eager/grouped_mm, torch._grouped_mm, sorted): OUTDIR/moe_layer_large_t.json
 4. merge  shipped configs + the new entries -> OUTDIR/<device>.json (to copy into kernels/triton/configs/)
 5. pytest -m gpu tests/test_triton*.py (tails included) with what is left of the budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# (name, T, D, F, E, K, row blocks to try), most needed first. Row block 64 where the rows per expert
# (T*K/E = 128-512) leave a bm-128 tiling 12-50% padding rows (softmax routing: counts spread ~sqrt(n)).
SHAPES = [
    ("Qwen3-30B-A3B", 4096, 2048, 768, 128, 8, (128, 64)), ("OLMoE-1B-7B", 4096, 2048, 1024, 64, 8, (128, 64)),
    ("DeepSeek-V3", 4096, 7168, 2048, 256, 8, (128, 64)), ("Qwen3-30B-A3B", 16384, 2048, 768, 128, 8, (128,)),
    ("OLMoE-1B-7B", 16384, 2048, 1024, 64, 8, (128,)), ("DeepSeek-V3", 16384, 7168, 2048, 256, 8, (128, 64)),
    ("Mixtral-8x7B", 4096, 4096, 14336, 8, 2, (128,)), ("Mixtral-8x7B", 16384, 4096, 14336, 8, 2, (128,))]
BMS = (128, 64)
N_WARM = 8


def _cands(bm: int):
    from moesaic.kernels.triton import autotune, launch

    tma, persistent = autotune.variants()
    return (launch.gemm_candidates(bm, "gemm1", tma, persistent), launch.gemm_candidates(bm, "gemm2", tma, persistent))


def warm(idx: int, n: int, out: Path) -> None:
    """Compile + check this worker's share of the candidates on a small problem (T 256, D 256, F 256,
    E 16, K 8: every int the kernels see is a multiple of 16 or not as in the fine-grained shapes)."""
    import torch

    from moesaic.kernels.reference import moe_experts_reference
    from moesaic.kernels.triton import autotune, ops
    from moesaic.kernels.triton.launch import MoEConfig

    jobs = [(bm, which, g, g1s[0], g2s[0]) for bm in BMS for g1s, g2s in [_cands(bm)]
            for which, gs in (("gemm1", g1s), ("gemm2", g2s)) for g in gs]
    dev = torch.device(os.environ.get("GPU_TUNE_CHECK_DEVICE", "cuda"))  # cpu: a dry run under TRITON_INTERPRET
    x, w13, w2, ids, w = autotune.random_problem(256, 256, 256, 16, 8, torch.bfloat16, dev, seed=1)
    ref = moe_experts_reference(x.float(), w13.float(), w2.float(), ids, w.float())
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    res = []
    for j, (bm, which, g, g1, g2) in enumerate(jobs):
        if j % n != idx:
            continue
        cfg = MoEConfig("grouped", bm, g if which == "gemm1" else g1, g if which == "gemm2" else g2)
        row = {"bm": bm, "which": which, "gemm": dataclasses.asdict(g), "ok": False, "done": False}
        res.append(row)
        out.write_text(json.dumps(res))  # before the run: a crash leaves this row not done
        try:
            y = ops.forward(x, w13, w2, ids, w, cfg)
            sync()
            row["rel_err"] = float((y.float() - ref).norm() / ref.norm())
            if g.tma or g.persistent:  # training forward (SAVE_H) + backward through the same config
                leaves = [v.clone().requires_grad_() for v in (x, w13, w2, w)]
                yt = ops.TritonMoEFunction.apply(leaves[0], leaves[1], leaves[2], ids, leaves[3], cfg, cfg)
                yt.float().square().sum().backward()
                sync()
                row["train_rel_err"] = float((yt.detach().float() - ref).norm() / ref.norm())
                row["grads_finite"] = all(bool(v.grad.isfinite().all()) for v in leaves)
            row["ok"] = row["rel_err"] < 2e-2 and row.get("train_rel_err", 0.0) < 2e-2 and row.get("grads_finite", True)
        except Exception as exc:
            row["error"] = repr(exc)[:300]
            sync()
        row["done"] = True
        out.write_text(json.dumps(res))


def tune(out: Path, budget_s: float, exclude_path: Path) -> None:
    import torch

    from moesaic.kernels.triton import autotune
    from moesaic.kernels.triton.launch import GemmConfig

    exclude: dict = {}  # bm -> GemmConfigs that failed the warm check
    for bm, d in json.loads(exclude_path.read_text()) if exclude_path.exists() else []:
        exclude.setdefault(bm, []).append(GemmConfig(**d))
    dev = torch.device("cuda")
    tag = autotune.device_tag(dev)
    print(f"# tune: variants (tma, persistent) = {autotune.variants()}, excluded {exclude}", flush=True)
    rows, t_end = [], time.monotonic() + budget_s
    for i, (name, t, d, f, e, k, bms) in enumerate(SHAPES):
        left = t_end - time.monotonic()
        if left < 5:
            print(f"# tune: budget spent, {name} T={t} and later not tuned")
            break
        key = autotune.shape_key(t, d, f, e, k, torch.bfloat16)
        shipped = autotune.lookup(key, tag)
        log: list = []
        t0 = time.monotonic()
        best, us = autotune.tune(t, d, f, e, k, torch.bfloat16, dev, bms=list(bms), baseline=shipped, check=True,
                                 budget_s=left / (len(SHAPES) - i) * 1.5, log=log, exclude=exclude)
        old = log[0]["us"] if shipped is not None and log else None
        autotune.write_entry(autotune.user_dir() / f"{tag}.json", key, best, us, torch.cuda.get_device_name(dev))
        stages = {}
        prob = autotune.random_problem(t, d, f, e, k, torch.bfloat16, dev)
        for label, cfg in (("old", shipped), ("new", best)):
            try:
                stages[label] = stage_times(prob, cfg) if cfg is not None and cfg.path == "grouped" else None
            except Exception as exc:
                stages[label] = repr(exc)[:200]
        del prob
        rows.append({"shape": name, "T": t, "key": key, "old_config": shipped and shipped.to_dict(), "old_us": old,
                     "new_config": best.to_dict(), "new_us": us, "stages": stages,
                     "seconds": time.monotonic() - t0, "log": log})
        out.write_text(json.dumps(rows, indent=1))
        bad = [r for r in log if r["error"] and "resources" not in r["error"].lower()]
        print(f"# tune {name} T={t}: shipped {old if old is None else round(old, 1)} us -> {us:.1f} us "
              f"({'same config' if best == shipped else best}); {len(log)} timed, {len(bad)} failed "
              f"in {time.monotonic() - t0:.0f}s; GEMMs old {stages['old']} new {stages['new']}", flush=True)
        for r in bad[:3]:
            print(f"#   failed {r['config']}: {r['error']}")
        torch.cuda.empty_cache()


def stage_times(prob, cfg) -> dict:
    """GPU time (us, CUDA-graph replays) and TFLOP/s of the two grouped GEMMs of cfg alone."""
    import torch
    import triton.testing

    from moesaic.kernels.triton import ops

    x, w13, w2, ids, w = prob
    (t, d), (e, _, f), k = x.shape, w2.shape, ids.shape[1]
    al = ops.align_for(ids, e, cfg)  # the tail-tile layout if cfg asks for it
    act, _ = ops.run_w13(x, w13, al, k, cfg.gemm1, False)
    o = torch.empty((t * k, d), dtype=x.dtype, device=x.device)
    fns = {"w13": lambda: ops.run_w13(x, w13, al, k, cfg.gemm1, False),
           "w2": lambda: ops.run_mm(act, w2, (w2.stride(0), w2.stride(2), w2.stride(1)), o, al, k, d, f, cfg.gemm2,
                                    a_gather=False, out_pair=True)}
    flops = {"w13": 4.0 * t * k * d * f, "w2": 2.0 * t * k * d * f}
    res = {}
    for name, fn in fns.items():
        fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        us = 1e3 * triton.testing.do_bench(g.replay, warmup=10, rep=40, return_mode="median")
        res[name] = {"us": round(us, 1), "tflops": round(flops[name] / us / 1e6, 1)}
    return res


def merged(out_dir: Path) -> Path | None:
    import torch

    from moesaic.kernels.triton import autotune

    tag = autotune.device_tag(torch.device("cuda"))
    new = autotune.user_dir() / f"{tag}.json"
    if not new.exists():
        return None
    shipped = autotune.PACKAGED_DIR / f"{tag}.json"
    table = json.loads(shipped.read_text()) if shipped.exists() else {"device": tag, "entries": {}}
    table["entries"].update(json.loads(new.read_text())["entries"])
    table["entries"] = dict(sorted(table["entries"].items()))
    path = out_dir / f"{tag}.json"
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def run(name: str, cmd: list[str], limit: float, out_dir: Path, env: dict) -> int | None:
    if limit < 15:
        print(f"== {name}: skipped ({limit:.0f}s of the budget left)", flush=True)
        return None
    print(f"== {name}: limit {limit:.0f}s", flush=True)
    t0 = time.monotonic()
    with open(out_dir / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    print(f"== {name}: rc={rc} in {time.monotonic() - t0:.0f}s", flush=True)
    return rc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--budget-s", type=float, default=330)
    p.add_argument("--warm", nargs=2, type=int, metavar=("I", "N"), help=argparse.SUPPRESS)
    p.add_argument("--tune", type=float, metavar="BUDGET_S", help=argparse.SUPPRESS)
    a = p.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MOESAIC_CACHE_DIR"] = str(out / "cache")
    if a.warm:
        return warm(a.warm[0], a.warm[1], out / f"warm_{a.warm[0]}.json")
    if a.tune is not None:
        return tune(out / "tune.json", a.tune, out / "exclude.json")
    start = time.monotonic()
    left = lambda: a.budget_s - (time.monotonic() - start)  # noqa: E731
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    me = [sys.executable, str(Path(__file__).resolve()), str(out)]
    subprocess.run([sys.executable, "-c", "import torch, triton, transformers; print('# torch', torch.__version__, "
                    "'triton', triton.__version__, 'transformers', transformers.__version__, "
                    "torch.cuda.get_device_name())"], env=env)

    # 1. warm + smoke: N processes in parallel
    t0 = time.monotonic()
    procs = [subprocess.Popen(me + ["--warm", str(i), str(N_WARM)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(out / f"warm_{i}.log", "w")) for i in range(N_WARM)]
    limit = min(60.0, left() * 0.2)
    for pr in procs:
        try:
            pr.wait(timeout=max(1.0, limit - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            pr.kill()
            pr.wait()
            pr.returncode = "timeout"
    rows = []
    for i, pr in enumerate(procs):
        f = out / f"warm_{i}.json"
        for r in json.loads(f.read_text()) if f.exists() else []:
            r["crashed"] = not r["done"] and pr.returncode != "timeout"  # died in it; cut off by time: unknown
            rows.append(r)
    bad = [r for r in rows if (r["done"] and not r["ok"]) or r["crashed"]]
    (out / "exclude.json").write_text(json.dumps([[r["bm"], r["gemm"]] for r in bad]))
    print(f"== warm: {len(rows)} configs compiled and checked in {time.monotonic() - t0:.0f}s, "
          f"{len(bad)} excluded, process rc {[pr.returncode for pr in procs]}", flush=True)
    for r in bad:
        print(f"#   excluded bm {r['bm']} {r['which']} {r['gemm']}: "
              f"{'process died in it' if r['crashed'] else r.get('error', r.get('rel_err'))}")

    # 2. tune, 3. the layer benchmark, 4. merged configs, 5. pytest
    tune_s = max(0.0, min(150.0, left() - 150))
    run("tune", me + ["--tune", str(tune_s)], tune_s + 30, out, env)
    if (out / "tune.json").exists():
        for r in json.loads((out / "tune.json").read_text()):
            print(f"# tune {r['shape']} T={r['T']}: {r['old_us'] and round(r['old_us'], 1)} -> {r['new_us']:.1f} us"
                  f" {r['new_config']}; GEMM stages old {r['stages'].get('old')} new {r['stages'].get('new')}")
    run("moe_layer", [sys.executable, "benchmarks/moe_layer.py", "--device", "cuda", "--shapes", "Qwen3-30B-A3B",
                      "OLMoE-1B-7B", "DeepSeek-V3", "Mixtral-8x7B", "--tokens", "4096", "16384", "--rep-ms", "30",
                      "--json", str(out / "moe_layer_large_t.json")], left() - 25, out, env)
    try:
        print(f"# merged configs: {merged(out)}")
    except Exception as exc:
        print(f"# merging the configs failed: {exc!r}")
    run("pytest_gpu", [sys.executable, "-m", "pytest", "-o", "addopts=", "-m", "gpu", "-q", "-x", "-p", "no:cacheprovider",
                       "tests/test_triton.py", "tests/test_triton_variants.py", "tests/test_triton_tails.py"],
        left(), out, env)
    summary(out)


def summary(out: Path) -> None:
    print("== summary")
    log = out / "pytest_gpu.log"
    if log.exists():
        print("# pytest:", (log.read_text().strip().splitlines() or ["(empty)"])[-1])
    f = out / "moe_layer_large_t.json"
    if f.exists():
        data = json.loads(f.read_text())
        print(f"# ceilings: copy {data['env']['copy_Bps'] / 1e9:.0f} GB/s, matmul {data['env']['matmul_flops'] / 1e12:.0f}"
              " TFLOP/s")
        print("| shape | T | floor us | triton us (eff) | hf grouped_mm us (eff) | torch._grouped_mm us (eff) | triton TFLOP/s |")
        print("|---|---|---|---|---|---|---|")
        for r in data["rows"]:
            cell = {n: (f"{m['time_s'] * 1e6:.0f} ({m['efficiency']:.2f})" if "time_s" in m else "ERR")
                    for n, m in r["impls"].items()}
            tf = r["impls"].get("triton", {}).get("tflops")
            print(f"| {r['shape']} | {r['T']} | {r['floor_s'] * 1e6:.0f} | {cell.get('triton', '-')} | "
                  f"{cell.get('hf_grouped_mm', '-')} | {cell.get('torch_grouped_mm', '-')} | "
                  f"{'-' if tf is None else round(tf)} |")


if __name__ == "__main__":
    main()
