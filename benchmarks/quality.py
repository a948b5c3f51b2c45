r"""Does the sparse model earn its keep? The default MoE vs its dense-active twin, same data, same tokens.

Models (`--models`, comma-separated), all on the trunk of `--preset` (default `small`):
  moe           the preset itself: the project's default MoE
  dense         its dense-active twin (`ModelConfig.dense_twin("active")`): same trunk, one dense FFN with
                the FFN parameters a token of `moe` touches, so per-token training/decode FLOPs match
  mixtral       8 experts top-2 of width A/2, softmax, renormalised, aux 0.01 (transformers' Mixtral recipe)
  fine-shared   32 experts top-6 of width A/8 + a shared expert of width A/4, softmax, aux 0.01, z 1e-3
  fine-sigmoid  the fine-shared shapes with a sigmoid router, loss-free bias (rate 1e-3, no aux loss),
                weights normalised then x2.5 (DeepSeek-V3-style routing)
  softmax-aux       the preset's own expert shapes, routed by softmax top-k with aux loss 0.01 and z-loss 1e-3
  sigmoid-lossfree  the preset's own expert shapes, routed like fine-sigmoid
where A = top_k * expert_ffn + shared_ffn of the preset (the active FFN width), so every recipe has the
same active size as `moe` and `dense`. `--preset h200` is the trunk of the H200 runs in docs/training.md
(d=512, 8 layers, A=2048); its `moe` is the default recipe: 128 experts top-6 of width 256 + a shared
expert of width 512, sigmoid router, loss-free balancing, weights normalised then x2.5.

`--budget-fractions 0.7` also trains every MoE for 70 % of the steps with its own, shorter cosine schedule
(named `moe@0.7` in the table): a run's loss midway through a longer cosine schedule is not what the same
model reaches when its schedule ends at that step (Hoffmann et al. 2022, "Chinchilla", found a cosine cycle
longer than the run costs loss at every intermediate step),
so "the MoE reaches the dense final loss in 70 % of the steps" is measured both ways: the first crossing
on the full-length curve, and the final loss of a run given 70 % of the steps. With `--merge` of a finished
sweep, only the budget runs train:
    python benchmarks/quality.py ... --lrs 7e-4 --budget-fractions 0.65,0.7 --merge quality_h200.json

Each (model, lr, seed) is one job: a subprocess training with moesaic.train.Trainer on the same data, the
same windows in the same order and the same token budget, evaluating on fixed validation windows every
`--eval-every` steps. Jobs run `--parallel` at a time (spread over the visible GPUs on CUDA). For every
model the learning rate is the one of the `--lrs` sweep with the lowest final validation loss averaged
over the seeds (with `--sweep-seed S`: of seed S alone, the other seeds then run at that lr only); the table then compares each MoE with `dense` seed by seed: the first evaluated step at
which the MoE's validation loss is <= the dense twin's final validation loss of the same seed ("never"
if it does not get there within the budget).

Writes the JSON (`--json`, every curve, the choice of lr, the table) and, with matplotlib, a PNG next
to it (validation loss vs steps and vs training FLOPs, one line per model/seed at its chosen lr).

    # CPU, quickstart scale (benchmarks/results/quality_cpu.json)
    python benchmarks/quality.py --device cpu --parallel 2 --threads 1 --steps 100 --batch-size 16 \
        --seq-len 128 --lrs 2e-3,4e-3 --seeds 0,1,2 --eval-every 10 --eval-windows 32 \
        --json benchmarks/results/quality_cpu.json
    # H200, 4 GPUs (benchmarks/results/quality_h200.json; docs/training.md); lr swept on seed 0 only
    python benchmarks/quality.py --preset h200 --device cuda --steps 6400 --batch-size 32 --seq-len 512 \
        --lrs 7e-4,1e-3,1.5e-3,2e-3 --seeds 0,1,2 --sweep-seed 0 --eval-every 200 --eval-windows 128 \
        --data builtin:large --max-chars 520000000 --models moe,dense --parallel 8 --threads 2 \
        --json /tmp/res/quality_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Local trunk of the H200 runs (docs/training.md); its own MoE has the `small` preset's recipe, scaled.
# Its own MoE is the project's default recipe (docs/training.md, "The default recipe"), at active FFN width 2048:
# 128 experts top-6 of width 256 + a shared expert of width 512, sigmoid router with loss-free balancing.
BENCH_PRESETS = {
    "h200": dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512, ffn=2048,
                 num_experts=128, top_k=6, expert_ffn=256, num_shared_experts=1, shared_ffn=512,
                 router="sigmoid_topk", aux_loss_coef=0.0, z_loss_coef=0.0, bias_update_rate=1e-2,
                 routed_scaling_factor=2.5),
}
MOE_FIELDS = ("num_experts", "top_k", "expert_ffn", "num_shared_experts", "shared_ffn", "router", "aux_loss_coef",
              "z_loss_coef", "bias_update_rate", "routed_scaling_factor", "normalize_topk", "n_group", "topk_group",
              "first_dense_layers", "capacity_factor")


# How tokens are routed and balanced, apart from the expert shapes (every other routing field is reset to
# ModelConfig's default by `model_config`)
ROUTING = {"softmax-aux": dict(router="softmax_topk", aux_loss_coef=0.01, z_loss_coef=1e-3, bias_update_rate=0.0,
                               routed_scaling_factor=1.0, normalize_topk=True),
           "sigmoid-lossfree": dict(router="sigmoid_topk", aux_loss_coef=0.0, z_loss_coef=0.0, bias_update_rate=1e-3,
                                    routed_scaling_factor=2.5, normalize_topk=True)}


def recipes(active_ffn: int) -> dict[str, dict]:
    """MoE recipes with active FFN width `active_ffn` (routed top_k * width + shared width)."""
    a = active_ffn
    if a % 8:
        raise ValueError(f"the preset's active FFN width must be a multiple of 8 for the recipes, got {a}")
    fine = dict(num_experts=32, top_k=6, expert_ffn=a // 8, num_shared_experts=1, shared_ffn=a // 4)
    return {
        "mixtral": dict(num_experts=8, top_k=2, expert_ffn=a // 2, num_shared_experts=0, shared_ffn=0,
                        aux_loss_coef=0.01, z_loss_coef=0.0),
        "fine-shared": dict(fine, **ROUTING["softmax-aux"]),
        "fine-sigmoid": dict(fine, **ROUTING["sigmoid-lossfree"]),
    }


def base_config(preset: str):
    from moesaic.config import ModelConfig

    if preset in BENCH_PRESETS:
        return ModelConfig(**BENCH_PRESETS[preset])
    cfg = ModelConfig.preset(preset)
    if not cfg.is_moe:
        raise ValueError(f"--preset {preset!r} is dense; the benchmark needs an MoE preset")
    return cfg


def model_config(preset: str, name: str):
    """The ModelConfig of model `name` (see the module docstring) on the trunk of `preset`.

    `name:field=value,field=value` is model `name` with ModelConfig fields overridden (an ablation), e.g.
    `moe:num_experts=32,routed_scaling_factor=1.0`."""
    if ":" in name:
        head, _, spec = name.partition(":")
        overrides = {}
        for item in filter(None, spec.split(",")):
            field, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"model {name!r}: expected field=value after ':', got {item!r}")
            try:
                overrides[field.strip()] = json.loads(value)
            except json.JSONDecodeError:
                overrides[field.strip()] = value.strip()  # a bare string, e.g. router=softmax_topk
        return model_config(preset, head).replace(**overrides)
    base = base_config(preset)
    if name == "moe":
        return base
    if name == "dense":
        return base.dense_twin("active")
    if name in ROUTING:  # the preset's own expert shapes, routed another way
        return base.replace(**ROUTING[name])
    table = recipes(base.top_k * base.expert_ffn + base.shared_ffn)
    if name not in table:
        raise ValueError(f"unknown model {name!r}; choose from {['moe', 'dense', *table, *ROUTING]}")
    plain = {f: getattr(type(base)(), f) for f in MOE_FIELDS}  # reset routing to ModelConfig's defaults
    return base.replace(**{**plain, **table[name]})


def run_job(job: dict) -> dict:
    """One training run; returns its curve and sizes."""
    import torch

    from moesaic.data.tokens import prepare_data
    from moesaic.model import build_model
    from moesaic.train import TrainConfig, Trainer
    from moesaic.train.metrics import read_metrics

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    cfg = model_config(job["preset"], job.get("recipe", job["model"]))
    tc = TrainConfig(preset="tiny", data=job["data"], steps=job["steps"], batch_size=job["batch_size"],
                     seq_len=job["seq_len"], lr=job["lr"], warmup_steps=job["warmup_steps"],
                     eval_every=job["eval_every"], eval_windows=job["eval_windows"], seed=job["seed"],
                     device=job["device"], progress=False, moe_backend=job["backend"],
                     save_final=bool(job.get("keep_runs")), cuda_graph=job.get("cuda_graph", "auto"))  # an unkept checkpoint is only disk traffic
    tok, data, _ = prepare_data(job["data"], cfg.vocab_size, max_chars=job["max_chars"],
                                cache_dir=job.get("cache_dir"))
    out = Path(job["out"])
    if out.exists():  # a leftover of an earlier benchmark run: the work folder is scratch space
        shutil.rmtree(out)
    t0 = time.perf_counter()
    messages: list[str] = []
    trainer = Trainer(cfg, tc, out, tok, data, log=messages.append)
    summary = trainer.fit()
    seconds = time.perf_counter() - t0
    rows = read_metrics(out)
    pc = build_model(cfg).count_params()
    if not job.get("keep_runs"):
        shutil.rmtree(out)
    every = max(1, job["steps"] // 200)
    speeds = sorted(r["tokens_per_s"] for r in rows[len(rows) // 2:] if "tokens_per_s" in r)  # past warm-up
    return {**job, "seconds": seconds, "final_val": summary["val_loss"], "active": pc.active, "total": pc.total,
            "train_tokens": int(len(data.train)), "tokens_per_step": tc.tokens_per_step,
            "flops_per_token": 6 * (pc.active + (pc.lm_head or pc.embedding)),  # a tied head still multiplies
            "val_curve": [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r],
            "loss_curve": [[r["step"], r["loss"]] for r in rows if "loss" in r][::every],
            "tokens_per_s_median": speeds[len(speeds) // 2] if speeds else None,
            "cuda_graph_used": trainer.graphed is not None,
            "trainer_log": [m for m in messages if "graph" in m.lower()][:5],
            "imbalance_last": next((r["imbalance"] for r in reversed(rows) if "imbalance" in r), None)}


def steps_to_reach(curve: list, target: float) -> int | None:
    """First evaluated step whose validation loss is <= target (None if never)."""
    for step, v in curve:
        if v is not None and v <= target:
            return int(step)
    return None


def steps_to_reach_interp(curve: list, target: float) -> float | None:
    """The step where the validation curve crosses target, linearly interpolated between evaluations."""
    prev = None
    for step, v in curve:
        if v is None:
            continue
        if v <= target:
            if prev is None or prev[1] == v:
                return float(step)
            (s0, v0) = prev
            return s0 + (v0 - target) / (v0 - v) * (step - s0)
        prev = (step, v)
    return None


def pick_lrs(results: list[dict], sweep_seed: int | None = None) -> dict[str, dict[float, float]]:
    """Per model, the sweep: lr -> final val loss, averaged over the seeds (or of seed `sweep_seed` alone)."""
    sweeps: dict[str, dict[float, float]] = {}
    for m in dict.fromkeys(r["model"] for r in results):
        by_lr: dict[float, list] = {}
        for r in results:
            if r["model"] == m and (sweep_seed is None or r["seed"] == sweep_seed):
                by_lr.setdefault(r["lr"], []).append(r["final_val"])
        sweeps[m] = {lr: statistics.mean(v) for lr, v in by_lr.items()}
    return sweeps


def summarize(results: list[dict], sweep_seed: int | None = None) -> dict:
    """Per model: the lr of the sweep with the lowest mean final val loss (of seed `sweep_seed` alone when
    given), its runs; per MoE and seed: the steps it needs to reach the dense twin's final val loss of the
    same seed."""
    best: dict[str, dict] = {}
    sweeps = pick_lrs(results, sweep_seed)
    for m in dict.fromkeys(r["model"] for r in results):
        by_lr: dict[float, list] = {}
        for r in results:
            if r["model"] == m:
                by_lr.setdefault(r["lr"], []).append(r)
        sweep = sweeps[m]
        lr = min(sweep, key=sweep.get)
        runs = sorted(by_lr[lr], key=lambda r: r["seed"])
        vals = [r["final_val"] for r in runs]
        best[m] = {"lr": lr, "sweep": {str(k): v for k, v in sweep.items()}, "val_mean": statistics.mean(vals),
                   "val_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                   "val_per_seed": {str(r["seed"]): r["final_val"] for r in runs},
                   "active": runs[0]["active"], "total": runs[0]["total"], "steps": runs[0]["steps"],
                   "seconds_mean": statistics.mean(r["seconds"] for r in runs), "reach": []}
    dense = best.get("dense")
    if dense is not None:
        dense_runs = {r["seed"]: r for r in results if r["model"] == "dense" and r["lr"] == dense["lr"]}
        full = dense["steps"]
        for m, b in best.items():
            if m == "dense":
                continue
            for r in results:
                if r["model"] != m or r["lr"] != b["lr"]:
                    continue
                target = dense_runs[r["seed"]]["final_val"] if r["seed"] in dense_runs else dense["val_mean"]
                s = steps_to_reach(r["val_curve"], target)
                si = steps_to_reach_interp(r["val_curve"], target)
                b["reach"].append({"seed": r["seed"], "target": target, "step": s, "final": r["final_val"],
                                   "fraction": None if s is None else s / full,
                                   "fraction_interpolated": None if si is None else si / full})
            b["reach"].sort(key=lambda x: x["seed"])
    return best


def format_table(best: dict) -> str:
    w = max([13, *(len(m) for m in best)])
    head = (f"{'model':{w}s} {'total':>7s} {'active':>7s} {'lr':>7s} {'val loss (mean +- sd)':>22s} "
            f"{'per seed':>26s}  steps to reach dense final (per seed)")
    lines = [head, "-" * len(head)]
    for m, b in best.items():
        per_seed = " ".join(f"{v:.4f}" for v in b["val_per_seed"].values())
        full = best["dense"]["steps"] if "dense" in best else b["steps"]
        reach = ", ".join(f"s{x['seed']}: never" if x["step"] is None else
                          f"s{x['seed']}: {x['step']}/{full} ({x['fraction']:.0%}; interp. "
                          f"{x.get('fraction_interpolated') or x['fraction']:.1%})" for x in b["reach"])
        lines.append(f"{m:{w}s} {b['total'] / 1e6:6.2f}M {b['active'] / 1e6:6.2f}M {b['lr']:7.1e} "
                     f"{b['val_mean']:13.4f} +- {b['val_std']:.4f} {per_seed:>26s}  {reach or '-'}")
    return "\n".join(lines)


def write_plot(results: list[dict], best: dict, png: Path) -> bool:
    """Validation loss vs step and vs training FLOPs, one line per model/seed at the model's chosen lr."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    seeds = sorted({r["seed"] for r in results})
    for i, (m, b) in enumerate(best.items()):
        for r in sorted((r for r in results if r["model"] == m and r["lr"] == b["lr"]), key=lambda r: r["seed"]):
            s, v = zip(*r["val_curve"])
            kw = dict(color=colors[i % len(colors)], ls=styles[seeds.index(r["seed"]) % len(styles)],
                      marker=".", ms=4, lw=1.3, label=f"{m} (lr {b['lr']:.2g}) seed {r['seed']}")
            axes[0].plot(s, v, **kw)
            axes[1].plot([x * r["tokens_per_step"] * r["flops_per_token"] for x in s], v, **kw)
    if "dense" in best:
        for ax in axes:
            ax.axhline(best["dense"]["val_mean"], color="gray", lw=0.8, ls=(0, (1, 3)))
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("training FLOPs (6 x active params incl. LM head x tokens)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=1)
    r0 = results[0]
    fig.suptitle(f"preset {r0['preset']}: {r0['steps']} steps x {r0['tokens_per_step']:,} tokens, data "
                 f"{r0['data']}, {len(seeds)} seed(s); gray: dense final (mean)", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def make_jobs(a: argparse.Namespace, work: Path) -> list[dict]:
    models = [m.strip() for m in a.models.split(";" if ":" in a.models else ",") if m.strip()]
    for m in models:
        model_config(a.preset, m)  # unknown names fail here, before any training
    lrs = [float(x) for x in a.lrs.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    if not models or not lrs or not seeds:
        raise ValueError("--models, --lrs and --seeds each need at least one value")
    if a.sweep_seed is not None and a.sweep_seed not in seeds:
        raise ValueError(f"--sweep-seed {a.sweep_seed} is not one of --seeds {a.seeds}")
    fractions = [float(x) for x in a.budget_fractions.split(",") if x.strip()]
    if any(not 0 < f < 1 for f in fractions):
        raise ValueError(f"--budget-fractions must lie strictly between 0 and 1, got {a.budget_fractions!r}")
    eval_every = a.eval_every or max(1, a.steps // 10)
    warmup = a.warmup_steps if a.warmup_steps is not None else max(1, a.steps // 10)
    # (name in the table, recipe, steps): every model at the full budget, and each MoE again with its own
    # shorter schedule for every budget fraction (named e.g. "moe@0.7")
    runs = [(m, m, a.steps) for m in models]
    runs += [(f"{m}@{f:g}", m, round(f * a.steps)) for f in fractions for m in models if m != "dense"]
    return [dict(preset=a.preset, model=name, recipe=m, lr=lr, seed=s, steps=steps, batch_size=a.batch_size,
                 seq_len=a.seq_len, warmup_steps=warmup, data=a.data, max_chars=a.max_chars, eval_every=eval_every,
                 eval_windows=a.eval_windows, device=a.device, backend=a.backend, threads=a.threads,
                 cuda_graph=a.cuda_graph,
                 cache_dir=a.cache_dir, keep_runs=a.keep_runs, out=str(work / f"{name}-lr{lr:g}-s{s}"),
                 result=str(work / f"{name}-lr{lr:g}-s{s}.json"))
            for name, m, steps in runs for lr in lrs for s in seeds]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (so a job pinned to one of them by a
    child's CUDA_VISIBLE_DEVICES lands on the same physical GPU when the parent was given a subset)."""
    import torch

    n = torch.cuda.device_count()
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


def run_all(jobs: list[dict], parallel: int, in_process: bool = False, log=print) -> list[dict]:
    """Run the jobs (`parallel` subprocesses at a time, or one by one in this process)."""
    if in_process:
        done = []
        for job in jobs:
            done.append(run_job(job))
            log(f"done {Path(job['out']).name}: val {done[-1]['final_val']:.4f} ({done[-1]['seconds']:.0f}s)")
        return done
    import torch

    gpus = visible_gpus() if torch.cuda.is_available() else []
    pending, running, done, failed = list(jobs), [], [], []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            env = dict(os.environ)
            gpu = None
            if gpus:  # the least loaded of the GPUs this process may use (not plain round robin)
                gpu = min(gpus, key=lambda g: (sum(r[3] == g for r in running), gpus.index(g)))
                env["CUDA_VISIBLE_DEVICES"] = gpu
            log_f = open(job["result"] + ".log", "w")
            p = subprocess.Popen([sys.executable, __file__, "--job", json.dumps(job)], env=env, stdout=log_f,
                                 stderr=subprocess.STDOUT)
            running.append((job, p, log_f, gpu))
        time.sleep(1)
        for item in list(running):
            job, p, log_f, _ = item
            if p.poll() is None:
                continue
            running.remove(item)
            log_f.close()
            if p.returncode == 0:
                done.append(json.loads(Path(job["result"]).read_text()))
                log(f"done {Path(job['out']).name}: val {done[-1]['final_val']:.4f} ({done[-1]['seconds']:.0f}s)")
            else:
                failed.append(job)
                log(f"FAILED {Path(job['out']).name}:\n" + Path(job["result"] + ".log").read_text()[-2000:])
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) failed (logs beside them in the work folder); no table written")
    return done


# settings that make curves comparable (the lr sweep and the seeds may differ: runs are keyed by model, lr, seed)
MERGE_SAME = ("preset", "steps", "batch_size", "seq_len", "sweep_seed", "data", "max_chars",
              "eval_every", "eval_windows", "warmup_steps")


def merged_runs(a: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The runs of an earlier JSON of this script (`--merge`), when it was made with the same settings, and
    the commands that made them. A job whose (model, lr, seed) is among them is not run again."""
    if not a.merge:
        return [], []
    prev = json.loads(Path(a.merge).read_text())
    was = prev["settings"]
    for k in MERGE_SAME:
        if was.get(k) != getattr(a, k):
            raise ValueError(f"--merge {a.merge}: it was made with {k}={was.get(k)!r}, this run has "
                             f"{getattr(a, k)!r}; the curves would not be comparable")
    return prev["runs"], [*prev.get("earlier_commands", []), prev["command"]]


def job_key(r: dict) -> tuple:
    return (r["model"], float(r["lr"]), int(r["seed"]))


def run_benchmark(a: argparse.Namespace, log=print) -> dict:
    """Prepare the data once, run every job, write the JSON and the PNG; returns the JSON object."""
    from moesaic.data.tokens import prepare_data

    json_path, work = Path(a.json), Path(a.work)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    jobs = make_jobs(a, work)
    t0 = time.perf_counter()
    vocab = model_config(a.preset, "moe").vocab_size
    prepare_data(a.data, vocab, max_chars=a.max_chars, cache_dir=a.cache_dir)  # once, into the shared cache
    log(f"data ready in {time.perf_counter() - t0:.0f}s; {len(jobs)} jobs")
    earlier, earlier_commands = merged_runs(a)
    have = {job_key(r) for r in earlier}
    if have:
        log(f"--merge: {sum(job_key(j) in have for j in jobs)} of the {len(jobs)} jobs are in {a.merge} already")
    jobs = [j for j in jobs if job_key(j) not in have]
    if a.sweep_seed is None:
        results = earlier + run_all(jobs, a.parallel, a.in_process, log)
    else:  # the sweep on one seed, then the other seeds at each model's chosen lr only
        lrs_of: dict[str, set] = {}
        for r in [*earlier, *jobs]:
            lrs_of.setdefault(r["model"], set()).add(float(r["lr"]))
        # a model with one lr has nothing to choose: all its seeds run in the first wave
        in_first = [j["seed"] == a.sweep_seed or len(lrs_of[j["model"]]) == 1 for j in jobs]
        first = [j for j, f in zip(jobs, in_first) if f]
        jobs = [j for j, f in zip(jobs, in_first) if not f]
        results = earlier + run_all(first, a.parallel, a.in_process, log)
        chosen = {m: min(sw, key=sw.get) for m, sw in pick_lrs(results, a.sweep_seed).items()}
        picked = ", ".join(f"{m} {lr:g}" for m, lr in chosen.items())
        log(f"lr chosen on seed {a.sweep_seed}: {picked}")
        rest = [j for j in jobs if j["lr"] == chosen[j["model"]]]
        results = results + run_all(rest, a.parallel, a.in_process, log)
    best = summarize(results, a.sweep_seed)
    table = format_table(best)
    import torch

    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "earlier_commands": earlier_commands,  # --merge: where the merged runs came from
              "settings": {k: v for k, v in vars(a).items() if k not in ("job",)},
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "wall_seconds": time.perf_counter() - t0, "summary": best, "table": table,
              "runs": sorted(results, key=lambda r: (r["model"], r["lr"], r["seed"]))}
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, json_path)
    png = json_path.with_suffix(".png")
    report["plot"] = str(png) if write_plot(results, best, png) else None
    log("\n" + table)
    log(f"\nJSON: {json_path}" + (f"\nplot: {png}" if report["plot"] else "\nplot: skipped (no matplotlib)"))
    return report


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="trunk and default MoE: a moesaic preset, or 'h200'")
    ap.add_argument("--models", default="moe,dense", help="comma-separated: moe, dense, mixtral, fine-shared, "
                    "fine-sigmoid, softmax-aux, sigmoid-lossfree; NAME:field=value,... overrides config fields "
                    "(then separate the models with ';')")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lrs", default="1.5e-3,3e-3", help="the learning-rate sweep, the same for every model")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sweep-seed", type=int, default=None,
                    help="pick each model's lr from the sweep on this seed alone, then train the other seeds "
                         "at the chosen lr only (default: every seed at every lr, lr by the mean over seeds)")
    ap.add_argument("--budget-fractions", default="", help="e.g. 0.7: also train each MoE for 70%% of the steps "
                    "with its own (shorter) cosine schedule, and compare its loss with the dense twin's final one")
    ap.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: steps // 10)")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--max-chars", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=0, help="0: steps // 10")
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--parallel", type=int, default=4, help="jobs at a time")
    ap.add_argument("--cuda-graph", default="auto", choices=["off", "auto"],
                    help="auto (default): each training step replays one CUDA graph (TrainConfig.cuda_graph)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per job (0: torch's default)")
    ap.add_argument("--in-process", action="store_true", help="run the jobs one by one in this process")
    ap.add_argument("--json", default="/tmp/quality/quality.json", help="results; the plot goes beside it (.png)")
    ap.add_argument("--work", default="/tmp/quality_runs", help="scratch: run folders and job logs")
    ap.add_argument("--keep-runs", action="store_true", help="keep each job's run folder (checkpoint)")
    ap.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default $MOESAIC_CACHE)")
    ap.add_argument("--merge", default=None, help="an earlier JSON of this script with the same settings: its "
                    "runs join this table, and only the (model, lr, seed) jobs it lacks are trained")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    if a.job:
        job = json.loads(a.job)
        Path(job["result"]).write_text(json.dumps(run_job(job)))
        return
    for name in ("steps", "batch_size", "seq_len", "eval_windows", "parallel"):
        if getattr(a, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    try:
        run_benchmark(a)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
