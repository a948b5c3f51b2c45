"""Same-process A/B of the fp32 fast step's prefetch hint: the T1 twins of the one-row fp32 kernels
(`cpu_gemv` moesaic_gemv_f32_t1, `cpu_experts` moesaic_experts_f32_t1, which `kernels.cpu_program` records) against
the same kernels with the module path's NTA hint (a second build of the sources with the hint swapped, recorded into
a second FastStep). Interleaved rounds of 32 greedy tokens; medians of the decode steps.

    python benchmarks/ab_fast_step_hint.py fine-64x8|coarse-8x2 [rounds]
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ab_fast_step import timed_run  # noqa: E402
from decode import SHAPES  # noqa: E402

import moesaic.kernels.cpu_program as cp  # noqa: E402
from moesaic import Engine, ModelConfig, build_model  # noqa: E402
from moesaic.inference.fast_step import FastStep  # noqa: E402
from moesaic.kernels import cpu_gemv  # noqa: E402
from moesaic.kernels.cpu_experts_src import SOURCE as EXPERTS_SOURCE  # noqa: E402

ROW1_T1 = "ROW1(row1_f32_t1, float, float, 16, F32_LOAD, F32_LOAD, F32_TLOAD, F32_TLOAD, F32_FMA, _MM_HINT_T1)"
GEMV_T1 = "GEMV_F32(moesaic_gemv_f32_t1, _MM_HINT_T1)"


def main() -> None:
    shape = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    torch.set_num_threads(2)
    torch.manual_seed(0)
    eng = Engine(build_model(ModelConfig(**SHAPES[shape])).eval(), max_batch=1, max_len=60)
    assert ROW1_T1 in EXPERTS_SOURCE and GEMV_T1 in cpu_gemv._SOURCE
    gemv_nta = cpu_gemv.build(cpu_gemv._SOURCE.replace(GEMV_T1, GEMV_T1.replace("T1)", "NTA)")), "gemv_nta_ab")
    experts_nta = cpu_gemv.build(EXPERTS_SOURCE.replace(ROW1_T1, ROW1_T1.replace("T1)", "NTA)")), "experts_nta_ab")
    real = cp.cpu_gemv._library, cp.cpu_experts._library
    cp.cpu_gemv._library, cp.cpu_experts._library = (lambda: gemv_nta), (lambda: experts_nta)
    t1, nta = eng.fast_step, FastStep(eng.model, eng.cache)
    try:
        eng.fast_step = nta
        timed_run(eng, list(range(16)), 4)  # records its program while the NTA builds stand in
    finally:
        cp.cpu_gemv._library, cp.cpu_experts._library = real
    t1.adapt = nta.adapt = False  # both always two-thread
    steps: dict[str, list[float]] = {"T1": [], "NTA": []}
    toks = {}
    for i in range(rounds):
        for name in (("T1", "NTA") if i % 2 == 0 else ("NTA", "T1")):
            eng.fast_step = t1 if name == "T1" else nta
            s, toks[name] = timed_run(eng, list(range(16)), 32)
            steps[name] += s
    old, new = statistics.median(steps["NTA"]), statistics.median(steps["T1"])
    print(f"{shape} fp32 fast step: NTA {old * 1e3:.2f} ms -> T1 {new * 1e3:.2f} ms ({old / new:.3f}x), tokens equal "
          f"{toks['T1'] == toks['NTA']}")


if __name__ == "__main__":
    main()
