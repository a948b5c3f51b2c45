"""Same-process interleaved A/B of batch-1 decode: the C router (`inference.cpu_router`) against the model's own.

    OMP_WAIT_POLICY=PASSIVE THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab_router.py fine|coarse fp32|w8a8 [repeats]

One engine (decode.py's shapes, 2 threads; w8a8 = W8A8 with every linear int8, like decode.py's w8a8 row); each
repeat generates 64 tokens after a 32-token prompt with the routers' class set to torch's, then to the C one.
Prints the tok/s of each run and their medians, whether the greedy tokens agree, how often the kernel gave up to
torch (near-ties), and the median time of a router call inside the decode steps (forward hooks), with the part
of torch's that is the gate matmul.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

import moesaic.kernels.cpu_router as cr  # noqa: E402
from moesaic import Engine, ModelConfig, SamplingParams, build_model  # noqa: E402
from moesaic.inference.cpu_router import CpuSoftmaxTopK  # noqa: E402
from moesaic.model.router import Router, SoftmaxTopK  # noqa: E402

BASE = dict(vocab_size=8000, d_model=1024, n_layers=4, n_heads=16, n_kv_heads=4, max_seq_len=256, ffn=2816)
SHAPES = {"coarse": dict(BASE, num_experts=8, top_k=2, expert_ffn=2816),
          "fine": dict(BASE, num_experts=64, top_k=8, expert_ffn=512, qk_norm="head")}


def med(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


def main() -> None:
    shape, prec = sys.argv[1], sys.argv[2]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    torch.manual_seed(0)
    torch.set_num_threads(2)
    kw = dict(quantize="w8a8", quantize_linears=True) if prec == "w8a8" else {}
    eng = Engine(build_model(ModelConfig(**SHAPES[shape])).eval(), None, max_batch=1, **kw)
    routers = [m.router for m in eng.model.moe_layers()]
    assert all(type(r) is CpuSoftmaxTopK for r in routers), "the engine did not switch the routers"
    gave_up, on_now = [], [False]
    real = cr.route_unchecked

    def spy(*a, **k):
        got = real(*a, **k)
        gave_up.append(got is None)
        return got

    cr.route_unchecked = spy
    t0, call_s, gate_s = [0.0], {True: [], False: []}, []
    for r in routers:
        r.register_forward_pre_hook(lambda *a: t0.__setitem__(0, time.perf_counter()))
        r.register_forward_hook(lambda *a: call_s[on_now[0]].append(time.perf_counter() - t0[0]))
    plain_logits = Router.logits

    def timed_logits(self, x):
        t = time.perf_counter()
        y = plain_logits(self, x)
        if not on_now[0]:
            gate_s.append(time.perf_counter() - t)
        return y

    Router.logits = timed_logits
    prompt, params = [list(range(1, 33))], SamplingParams(max_tokens=64, temperature=0.0)
    tps, tokens = {True: [], False: []}, {}
    for _ in range(repeats):
        for on in (False, True):
            for r in routers:
                r.__class__ = CpuSoftmaxTopK if on else SoftmaxTopK
            on_now[0] = on
            eng.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0))
            t = time.perf_counter()
            ids = eng.generate(prompt, params)[0].token_ids
            tps[on].append(64 / (time.perf_counter() - t))
            tokens.setdefault(on, ids)
    print(shape, prec, "torch router tok/s", [round(x, 1) for x in tps[False]],
          "C router", [round(x, 1) for x in tps[True]])
    print(f"medians {med(tps[False]):.1f} -> {med(tps[True]):.1f} tok/s, ratio {med(tps[True]) / med(tps[False]):.3f}; "
          f"same tokens {tokens[True] == tokens[False]}; C calls {len(gave_up)}, gave up {sum(gave_up)}")
    print(f"router call in-step median {med(call_s[False]) * 1e6:.1f} us (torch) -> {med(call_s[True]) * 1e6:.1f} us "
          f"(C); per step x{len(routers)} layers: {len(routers) * (med(call_s[False]) - med(call_s[True])) * 1e3:.3f} "
          f"ms saved; torch's gate matmul (Router.logits) {med(gate_s) * 1e6:.1f} us")


if __name__ == "__main__":
    main()
