"""Does the sparse model earn its keep? MoE recipes vs their dense-active twin, same data, same tokens.

Every model here has (almost) the same ACTIVE parameters per token (same trunk; the routed + shared
experts a token touches add up to the twin's dense FFN width), so per-token training and inference
FLOPs match; the MoEs hold more TOTAL parameters. Each (model, lr, seed) is one job: a subprocess
training with moesaic.train.Trainer and evaluating on fixed validation windows along the way. Jobs
run concurrently (small models leave an H200 mostly idle), spread over the visible GPUs.

Writes <out>/train_quality.json (every curve), prints a table: final validation loss per model (best lr
of the sweep, mean over seeds) and the fraction of steps each MoE needs to reach the dense twin's final
validation loss. With matplotlib, also <out>/train_quality.png (val loss vs step and vs training FLOPs).

    python benchmarks/train_quality.py --device cuda --steps 1500 --batch-size 32 --seq-len 512 \
        --lrs 1.5e-3,3e-3 --seeds 0 --data builtin:large --max-chars 150000000 --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TRUNK = dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512)
# active FFN width per token = 2048 for every MoE below (routed top_k * expert_ffn + shared_ffn)
RECIPES = {
    "mixtral": dict(num_experts=8, top_k=2, expert_ffn=1024, aux_loss_coef=0.01),
    "fine-shared": dict(num_experts=32, top_k=6, expert_ffn=256, num_shared_experts=1, shared_ffn=512,
                        aux_loss_coef=0.01, z_loss_coef=1e-3),
    "fine-sigmoid": dict(num_experts=32, top_k=6, expert_ffn=256, num_shared_experts=1, shared_ffn=512,
                         router="sigmoid_topk", aux_loss_coef=0.0, bias_update_rate=1e-3,
                         routed_scaling_factor=2.5),
}


def model_config(name: str):
    from moesaic.config import ModelConfig

    if name == "dense":
        return ModelConfig(**TRUNK, num_experts=8, top_k=2, expert_ffn=1024).dense_twin("active")
    return ModelConfig(**TRUNK, **RECIPES[name])


def run_job(job: dict) -> dict:
    """One training run; returns its curve."""
    from moesaic.data.tokens import prepare_data
    from moesaic.train import TrainConfig, Trainer
    from moesaic.train.metrics import read_metrics

    cfg = model_config(job["model"])
    tc = TrainConfig(preset="tiny", data=job["data"], steps=job["steps"], batch_size=job["batch_size"],
                     seq_len=job["seq_len"], lr=job["lr"], warmup_steps=max(1, job["steps"] // 20),
                     eval_every=max(1, job["steps"] // 10), eval_windows=job["eval_windows"], seed=job["seed"],
                     device=job["device"], progress=False, moe_backend=job["backend"])
    tok, data, _ = prepare_data(job["data"], cfg.vocab_size, max_chars=job["max_chars"])
    out = Path(job["out"])
    t0 = time.perf_counter()
    summary = Trainer(cfg, tc, out, tok, data, log=lambda s: None).fit()
    rows = read_metrics(out)
    from moesaic.model import build_model

    pc = build_model(cfg).count_params()
    return {**job, "seconds": time.perf_counter() - t0, "final_val": summary["val_loss"],
            "active": pc.active, "total": pc.total, "train_tokens": int(len(data.train)),
            "flops_per_token": 6 * (pc.active_with_embeddings - pc.embedding),
            "val_curve": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
            "loss_curve": [(r["step"], r["loss"]) for r in rows if "loss" in r][:: max(1, job["steps"] // 200)],
            "imbalance_last": next((r["imbalance"] for r in reversed(rows) if "imbalance" in r), None)}


def steps_to_reach(curve: list, target: float) -> int | None:
    """First evaluated step whose validation loss is <= target (None if never)."""
    for step, v in curve:
        if v <= target:
            return step
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dense,mixtral,fine-shared,fine-sigmoid")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lrs", default="3e-3")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--max-chars", type=int, default=None)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--parallel", type=int, default=4, help="jobs at a time")
    ap.add_argument("--out", default="/tmp/train_quality", help="table, JSON and plot")
    ap.add_argument("--work", default="/tmp/train_quality_runs", help="run folders (checkpoints) and job logs")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.job:
        job = json.loads(a.job)
        Path(job["result"]).write_text(json.dumps(run_job(job)))
        return
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    from moesaic.data.tokens import prepare_data

    t0 = time.perf_counter()
    prepare_data(a.data, 8192, max_chars=a.max_chars)  # once, into the shared cache
    print(f"data ready in {time.perf_counter() - t0:.0f}s", flush=True)
    jobs = [dict(model=m, lr=float(lr), seed=int(s), steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                 data=a.data, max_chars=a.max_chars, eval_windows=a.eval_windows, device=a.device,
                 backend=a.backend, out=str(work / f"{m}-lr{lr}-s{s}"), result=str(work / f"{m}-lr{lr}-s{s}.json"))
            for m in a.models.split(",") for lr in a.lrs.split(",") for s in a.seeds.split(",")]
    results = run_all(jobs, a.parallel)
    (out / "train_quality.json").write_text(json.dumps(results, indent=1))
    report(results, out)


def run_all(jobs: list[dict], parallel: int) -> list[dict]:
    import torch

    n_gpu = max(1, torch.cuda.device_count())
    pending, running, done = list(jobs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(len(done + running) % n_gpu)) \
                if torch.cuda.is_available() else dict(os.environ)
            log = open(job["result"] + ".log", "w")
            running.append((job, subprocess.Popen([sys.executable, __file__, "--job", json.dumps(job)], env=env,
                                                  stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(1)
        for job, p in list(running):
            if p.poll() is not None:
                running.remove((job, p))
                if p.returncode == 0:
                    done.append(json.loads(Path(job["result"]).read_text()))
                    print(f"done {Path(job['out']).name}: val {done[-1]['final_val']:.4f} "
                          f"({done[-1]['seconds']:.0f}s)", flush=True)
                else:
                    print(f"FAILED {Path(job['out']).name}:\n" + Path(job["result"] + ".log").read_text()[-2000:])
    return done


def report(results: list[dict], out: Path) -> None:
    import statistics

    best: dict[str, dict] = {}
    for m in sorted({r["model"] for r in results}):
        by_lr: dict[float, list] = {}
        for r in results:
            if r["model"] == m:
                by_lr.setdefault(r["lr"], []).append(r)
        lr, runs = min(by_lr.items(), key=lambda kv: statistics.mean(r["final_val"] for r in kv[1]))
        best[m] = {"lr": lr, "runs": runs, "val": statistics.mean(r["final_val"] for r in runs)}
    dense = best.get("dense")
    print(f"\n{'model':14s} {'active':>8s} {'total':>8s} {'best lr':>8s} {'val loss':>9s} {'steps to dense final':>22s}")
    for m, b in best.items():
        r0 = b["runs"][0]
        reach = ""
        if dense is not None and m != "dense":
            fr = [steps_to_reach(r["val_curve"], dense["val"]) for r in b["runs"]]
            reach = ", ".join("never" if s is None else f"{s / r0['steps']:.0%}" for s in fr)
        print(f"{m:14s} {r0['active'] / 1e6:7.1f}M {r0['total'] / 1e6:7.1f}M {b['lr']:8.1e} {b['val']:9.4f} "
              f"{reach:>22s}")
    (out / "train_quality_summary.json").write_text(json.dumps(
        {m: {"lr": b["lr"], "val": b["val"]} for m, b in best.items()}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, b in best.items():
        for r in b["runs"]:
            s, v = zip(*r["val_curve"])
            axes[0].plot(s, v, label=f"{m} s{r['seed']}")
            toks = [x * r["batch_size"] * r["seq_len"] for x in s]
            axes[1].plot([t * r["flops_per_token"] for t in toks], v, label=f"{m} s{r['seed']}")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training FLOPs (6 x active non-embedding params x tokens)")
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "train_quality.png", dpi=110)


if __name__ == "__main__":
    main()
