"""Diagnostic, not a comparison: the Engine's decode step alone, on a random Mixtral-shaped model, with
its host time broken down (cProfile) and its CUDA/CPU ops (torch.profiler).

Written to find the ~9 ms per step that decode_gpu.py's breakdown puts outside the graph replay. On
2026-11-28 (one H200, bf16, Mixtral dims with 8 layers, batch 1, CUDA graphs) the step here took
2.90 ms median, almost all of it the device->host copy of the logits waiting for the replay: the
engine has no fixed host cost of that size, so the gap belongs to decode_gpu.py's setup (see
benchmarks/README.md, decode_gpu).

    python benchmarks/engine_step_gpu.py                 # CUDA graphs on (default on CUDA)
    python benchmarks/engine_step_gpu.py --layers 2 --d-model 1024 --ffn 3584   # smaller; also runs on CPU
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from moesaic import Engine, ModelConfig, SamplingParams, build_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336, help="expert width (Mixtral: 14336)")
    ap.add_argument("--new-tokens", type=int, default=120)
    ap.add_argument("--no-graphs", action="store_true")
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ModelConfig(vocab_size=32000, d_model=a.d_model, n_layers=a.layers, n_heads=32 if a.d_model >= 4096 else 8,
                      n_kv_heads=8 if a.d_model >= 4096 else 2, ffn=a.ffn, num_experts=8, top_k=2, expert_ffn=a.ffn,
                      max_seq_len=256)
    torch.manual_seed(0)
    with torch.device(dev):
        model = build_model(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    eng = Engine(model, None, max_batch=1, max_len=200, cuda_graphs=dev == "cuda" and not a.no_graphs)
    params = SamplingParams(max_tokens=a.new_tokens, temperature=0, ignore_eos=True)

    def steps() -> list[float]:
        eng.submit(list(range(1, 33)), params)
        eng.step()  # prefill
        out = []
        while eng.has_unfinished():
            t = time.perf_counter()
            eng.step()
            out.append(time.perf_counter() - t)
        return out

    steps()  # warm-up: tuning, capture
    ts = steps()
    print(f"{dev}, {a.layers} layers, D={a.d_model}, F={a.ffn}, graphs={eng.decode_graphs is not None}: "
          f"decode step median {statistics.median(ts) * 1e3:.2f} ms, min {min(ts) * 1e3:.2f} ms", flush=True)
    eng.submit(list(range(1, 33)), params)
    for _ in range(6):
        eng.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(30):
        eng.step()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as p:
        for _ in range(10):
            eng.step()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
