"""Tail tiles on the H200: check every tail-tile candidate, time it against the shipped config, report.

    python benchmarks/gpu_tail_check.py OUTDIR [--budget-s 280] [--dry-run]

Question: does covering each expert's last < BM rows with small tail tiles (MoEConfig.tail_bm) instead of
padding them to a full BM block lift the large-T cells short of 0.7 of the roofline (Qwen3 / DeepSeek-V3
T = 4096)? Shapes: the four of moe_layer.py at T = 4096 and 16384. Per shape, candidates are the shipped
config with tail tiles (bm 128: tail 32 / 64, also with persistent GEMMs; bm 64: tail 16 / 32, also with
4-warp GEMMs) and uniform bm 64 for comparison.

 1. check  one process per shape, all at once (compiles in parallel, filling Triton's disk cache for step 2):
           every candidate at full size against the reference backend (rel. error < 2e-2). Each row is
           written before it runs, so a process that dies marks its candidate "crashed"; the shape is then
           checked again without it while the budget lasts.
 2. time   one process, shapes one after another: the shipped config and every candidate that passed, as
           CUDA-graph replays of the whole forward (like autotune); the GEMM stages of the shipped and the
           best config; floor = max(6 N D F / 714 TFLOP/s, unique experts' bytes / 4.24 TB/s).
 3. report a table (us, floor, efficiency, padding = extra rows computed / routed rows) and
           OUTDIR/tail_check.json (every candidate: config, us, error), OUTDIR/tail_winners.json (the
           winning entries in the configs format) and OUTDIR/<device>.json (the shipped table with them
           merged in, to copy into src/moesaic/kernels/triton/configs/ if the lead accepts them).
--dry-run: tiny shapes on the CPU under the Triton interpreter (wall-clock timing): tests the script itself.
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
sys.path.insert(0, str(ROOT / "benchmarks"))
SHAPES = [("Qwen3-30B-A3B", 2048, 768, 128, 8), ("DeepSeek-V3", 7168, 2048, 256, 8), ("OLMoE-1B-7B", 2048, 1024, 64, 8),
          ("Mixtral-8x7B", 4096, 14336, 8, 2)]
POINTS = [(s, t) for t in (4096, 16384) for s in SHAPES]
DRY = [(("tiny-fine", 64, 32, 16, 8), 200), (("tiny-coarse", 64, 48, 4, 2), 300)]
PEAK_FLOPS, PEAK_BPS = 714e12, 4.24e12
TOL = 2e-2


def points(dry: bool):
    return DRY if dry else POINTS


def shipped_config(t, d, f, e, k, dtype, dev):
    from moesaic.kernels.triton import autotune, launch

    tag = autotune.device_tag(dev) if dev.type == "cuda" else "NVIDIA_H200"
    return autotune.lookup(autotune.shape_key(t, d, f, e, k, dtype), tag) or launch.heuristic(t, d, f, e, k)


def candidates(base) -> dict:
    """label -> MoEConfig: tail-tile variants of the shipped config (and uniform bm 64 to compare)."""
    rep = dataclasses.replace
    pers = {g: rep(getattr(base, g), persistent=max(1, getattr(base, g).persistent)) for g in ("gemm1", "gemm2")}
    w4 = {g: rep(getattr(base, g), num_warps=4) for g in ("gemm1", "gemm2")}
    c = {"bm64": rep(base, bm=64, tail_bm=0)}
    for tail in (32, 64):
        c[f"bm128+t{tail}"] = rep(base, bm=128, tail_bm=tail)
        c[f"bm128+t{tail} persistent"] = rep(base, bm=128, tail_bm=tail, **pers)
    for tail in (16, 32):
        c[f"bm64+t{tail}"] = rep(base, bm=64, tail_bm=tail)
    c["bm64+t32 4 warps"] = rep(base, bm=64, tail_bm=32, **w4)
    return c


def problem(shape, t, dev):
    import torch

    from moesaic.kernels.triton import autotune

    _, d, f, e, k = shape
    return autotune.random_problem(t, d, f, e, k, torch.bfloat16, dev, seed=t)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check(idx: int, skip: list[str], out: Path, dev_name: str) -> None:
    """Step 1 for point idx: every candidate not in skip against the reference; rows to out as they go."""
    import torch

    from moesaic.kernels.reference import moe_experts_reference
    from moesaic.kernels.triton import moe_experts_triton

    dev = torch.device(dev_name)
    shape, t = points(dev.type == "cpu")[idx]
    args = problem(shape, t, dev)
    ref = moe_experts_reference(*args)
    rows = []
    for label, cfg in candidates(shipped_config(t, *shape[1:], torch.bfloat16, dev)).items():
        if label in skip:
            continue
        row = {"label": label, "config": cfg.to_dict(), "done": False}
        rows.append(row)
        out.write_text(json.dumps(rows))  # before the run: a process that dies leaves this row not done
        try:
            row["rel_err"] = rel(moe_experts_triton(*args, config=cfg), ref)
            row["ok"] = row["rel_err"] < TOL
        except Exception as exc:  # out of resources, a compile error: recorded, never fatal
            row["ok"], row["error"] = False, repr(exc)[:300]
        row["done"] = True
        out.write_text(json.dumps(rows))
        if "error" in row and ("CUDA error" in row["error"] or "illegal" in row["error"]):
            os._exit(3)  # the context is broken: the parent reruns the rest of this shape in a fresh process


def time_us(fn, dev) -> float:
    """Median GPU time of fn as CUDA-graph replays (wall clock on the CPU dry run)."""
    import torch

    if dev.type == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    import triton.testing

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return 1e3 * triton.testing.do_bench(g.replay, warmup=10, rep=60, return_mode="median")


def padding(ids, e: int, cfg) -> float:
    """Extra rows the config's layout computes, over the routed rows (tail tiles: padded to tail_bm only)."""
    import torch

    flat = ids.reshape(-1)
    counts = torch.bincount(flat[flat >= 0], minlength=e).double()
    blk = cfg.tail_bm or cfg.bm
    return float(((counts / blk).ceil() * blk).sum() / counts.sum() - 1)


def time_all(out: Path, dev_name: str) -> None:
    """Step 2: the shipped config and the checked candidates of every point, one point at a time."""
    import torch

    from moesaic.kernels.triton import ops

    dev = torch.device(dev_name)
    checked = json.loads((out / "checked.json").read_text())
    res = []
    for idx, (shape, t) in enumerate(points(dev.type == "cpu")):
        name, d, f, e, k = shape
        args = problem(shape, t, dev)
        base = shipped_config(t, d, f, e, k, torch.bfloat16, dev)
        cands = {"shipped": base, **{lb: c for lb, c in candidates(base).items() if lb in checked.get(str(idx), [])}}
        flops = 6.0 * t * k * d * f
        floor = max(flops / PEAK_FLOPS, int(torch.unique(args[3]).numel()) * 3 * d * f * 2 / PEAK_BPS) * 1e6
        row = {"shape": name, "T": t, "D": d, "F": f, "E": e, "K": k, "floor_us": floor, "cands": []}
        res.append(row)
        for label, cfg in cands.items():
            c = {"label": label, "config": cfg.to_dict(), "padding": padding(args[3], e, cfg)}
            try:
                c["us"] = time_us(lambda cfg=cfg, args=args: ops.forward_grouped(*args, cfg, save=False), dev)
                c["eff"] = floor / c["us"]
            except Exception as exc:  # recorded, the next candidate still runs
                c["error"] = repr(exc)[:300]
            row["cands"].append(c)
            (out / "tail_check.json").write_text(json.dumps(res, indent=1))
        timed = [c for c in row["cands"] if "us" in c]
        row["best"] = min(timed, key=lambda c: c["us"])["label"] if timed else None
        if dev.type == "cuda" and row["best"]:
            from gpu_tune_check import stage_times

            for label in {"shipped", row["best"]}:
                try:
                    row.setdefault("stages", {})[label] = stage_times(args, cands[label])
                except Exception as exc:
                    row.setdefault("stages", {})[label] = repr(exc)[:200]
        (out / "tail_check.json").write_text(json.dumps(res, indent=1))
        del args
        torch.cuda.empty_cache() if dev.type == "cuda" else None


def report(out: Path, dev_name: str) -> None:
    """Step 3: the table, the winning entries and the merged configs table."""
    import torch

    from moesaic.kernels.triton import autotune
    from moesaic.kernels.triton.launch import MoEConfig

    f = out / "tail_check.json"
    res = json.loads(f.read_text()) if f.exists() else []
    print("| shape | T | floor us | shipped us (eff, pad) | best candidate | its us (eff, pad) | speedup |")
    print("|---|---|---|---|---|---|---|")
    winners = {}
    for r in res:
        by = {c["label"]: c for c in r["cands"]}
        s, b = by.get("shipped", {}), by.get(r.get("best") or "", {})
        tails = [c for c in r["cands"] if "us" in c and c["label"] != "shipped"]
        bt = min(tails, key=lambda c: c["us"]) if tails else {}
        cell = lambda c: f"{c['us']:.0f} ({c['eff']:.2f}, {c['padding']:.1%})" if "us" in c else "ERR"  # noqa: E731
        print(f"| {r['shape']} | {r['T']} | {r['floor_us']:.0f} | {cell(s)} | {bt.get('label', '-')} | "
              f"{cell(bt) if bt else '-'} | {s['us'] / bt['us']:.2f}x |" if bt and "us" in s else
              f"| {r['shape']} | {r['T']} | {r['floor_us']:.0f} | {cell(s)} | - | - | - |")
        if b and b["label"] != "shipped":
            key = autotune.shape_key(r["T"], r["D"], r["F"], r["E"], r["K"], torch.bfloat16)
            winners[key] = {**b["config"], "time_us": round(b["us"], 2)}
        print(f"#   {r['shape']} T={r['T']}: " + ", ".join(f"{c['label']} {c['us']:.0f}" for c in r["cands"] if "us" in c))
        for c in r["cands"]:
            if "error" in c:
                print(f"#   {r['shape']} T={r['T']} {c['label']}: {c['error']}")
        for label, st in (r.get("stages") or {}).items():
            print(f"#   {r['shape']} T={r['T']} GEMM stages of {label}: {st}")
    tag = autotune.device_tag(torch.device(dev_name)) if dev_name == "cuda" else "NVIDIA_H200"
    name = torch.cuda.get_device_name() if dev_name == "cuda" else tag
    (out / "tail_winners.json").write_text(json.dumps({"device": name, "entries": winners}, indent=1) + "\n")
    shipped = autotune.PACKAGED_DIR / f"{tag}.json"
    table = json.loads(shipped.read_text()) if shipped.exists() else {"device": tag, "entries": {}}
    table["entries"] = dict(sorted({**table["entries"], **winners}.items()))
    for entry in table["entries"].values():
        MoEConfig.from_dict(entry)  # every entry loads
    (out / f"{tag}.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"# {len(winners)} shapes where a tail-tile config won: {out / 'tail_winners.json'}; merged table: "
          f"{out / (tag + '.json')}")


def run_checks(out: Path, me: list, env: dict, deadline: float, n: int) -> dict:
    """Step 1 in parallel processes, rerun without a candidate that killed its process; -> {idx: ok labels}."""
    skip = {i: [] for i in range(n)}
    ok, todo = {}, list(range(n))
    while todo and time.monotonic() < deadline - 10:
        procs = {i: subprocess.Popen(me + ["--check", str(i), json.dumps(skip[i])], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(out / f"check_{i}.log", "a")) for i in todo}
        again = []
        for i, pr in procs.items():
            try:
                pr.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait()
            f = out / f"check_{i}.json"
            rows = json.loads(f.read_text()) if f.exists() else []
            ok.setdefault(i, []).extend(r["label"] for r in rows if r.get("ok"))
            for r in rows:
                print(f"# check {i} {r['label']}: {r.get('rel_err', r.get('error', 'crashed' if not r['done'] else ''))}")
            if rows and pr.returncode not in (0, -9):  # died (not our timeout kill): rerun only the unchecked rest
                skip[i] += [r["label"] for r in rows]
                again.append(i)
        todo = again
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--budget-s", type=float, default=280)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--check", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--time", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if a.dry_run or os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    if a.check:
        return check(int(a.check[0]), json.loads(a.check[1]), out / f"check_{a.check[0]}.json", dev)
    if a.time:
        return time_all(out, dev)
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1", "MOESAIC_CACHE_DIR": str(out / "cache")}
    if dev == "cpu":
        env["TRITON_INTERPRET"] = "1"
    me = [sys.executable, str(Path(__file__).resolve()), str(out)] + (["--dry-run"] if a.dry_run else [])
    n = len(points(dev == "cpu"))
    ok = run_checks(out, me, env, start + a.budget_s * 0.45, n)
    (out / "checked.json").write_text(json.dumps({str(i): v for i, v in ok.items()}))
    print(f"== check: {sum(map(len, ok.values()))} candidates passed in {time.monotonic() - start:.0f}s", flush=True)
    try:
        rc = subprocess.run(me + ["--time"], cwd=ROOT, env=env, timeout=max(10.0, a.budget_s - (time.monotonic() - start)),
                            stdout=open(out / "time.log", "w"), stderr=subprocess.STDOUT).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    print(f"== time: rc={rc} at {time.monotonic() - start:.0f}s (log: {out / 'time.log'})", flush=True)
    report(out, dev)


if __name__ == "__main__":
    main()
