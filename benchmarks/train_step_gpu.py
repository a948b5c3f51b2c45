"""moesaic's own training step on the GPU, Triton vs sorted experts: the H200 quality preset's MoE.

What `Trainer` runs each step (bf16 autocast over fp32 weights, routing statistics, clipping, fused
AdamW, the loss-free bias update), on one fixed random batch, timed with the MoE layers on each backend
(interleaved: triton, sorted, triton), then the whole step captured as one CUDA graph (train/graphed.py,
`TrainConfig.cuda_graph="auto"`) with triton experts. `--profile` adds torch.profiler tables (GPU time and host time).

    python benchmarks/train_step_gpu.py [--model moe] [--batch 32] [--seq 512] [--profile]

Measured 2026-11-28 on an H200 (x4 host, idle): triton 51.4 / 56.5 ms, sorted 59.7 ms per 16,384-token
step (1.06-1.16x). The profile: ~34 ms of GPU work and ~70 ms of host time per step (3,675 launches for
three steps; the MoE autograd function's Python ~1.1 ms per layer; ~340 autocast weight casts) -- the
step is bound by the host, not by the expert kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> None:
    from quality import model_config

    from moesaic.model import build_model
    from moesaic.train.config import TrainConfig
    from moesaic.train.optim import build_optimizer
    from moesaic.train.step import forward_backward, split_batch, update_biases

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="h200")
    ap.add_argument("--model", default="moe", help="a quality.py model name, e.g. moe, dense, moe:num_experts=256")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graphed step")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("train_step_gpu.py needs CUDA")
    torch.manual_seed(0)
    cfg = model_config(a.preset, a.model)
    model = build_model(cfg).cuda()
    tc = TrainConfig(preset="tiny", steps=100, batch_size=a.batch, seq_len=a.seq, device="cuda")
    opt = build_optimizer(model, tc)
    batch = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), device="cuda")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        st = forward_backward(model, split_batch(batch, a.batch), autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_biases(model, st.counts_LE)

    def ms_per_step(fn) -> float:  # 3 warm-up steps, then the mean of a.steps
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.steps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / a.steps * 1e3

    times: dict[str, list[float]] = {}
    for backend in (["triton", "sorted", "triton"] if cfg.is_moe else ["auto"]):
        model.set_moe_backend(backend)
        times.setdefault(backend, []).append(ms_per_step(step))
    if not a.no_graph:  # the whole step as one CUDA graph (TrainConfig.cuda_graph="auto"), triton experts
        from moesaic.train.graphed import GraphedStep

        model.set_moe_backend("triton" if cfg.is_moe else "auto")
        graphed = GraphedStep(model, opt, tc, autocast, batch)
        times["graph"] = [ms_per_step(lambda: graphed.run(batch, 1e-3))]
    tokens = a.batch * a.seq
    for backend, ms in times.items():
        print(f"{a.model} {backend}: " + " / ".join(f"{m:.1f}" for m in ms) + f" ms per {tokens}-token step")
    if "sorted" in times:
        print(f"# speedup triton vs sorted: {min(times['sorted']) / min(times['triton']):.2f}x (best of each)")
        if "graph" in times:
            print(f"# speedup graphed triton step vs sorted: {min(times['sorted']) / min(times['graph']):.2f}x")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        model.set_moe_backend("triton" if cfg.is_moe else "auto")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        ka = p.key_averages()
        print(ka.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
