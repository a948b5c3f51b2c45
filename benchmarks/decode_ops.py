"""Diagnostic: the aten ops of ONE engine decode step, per layer and per module, on CPU.

A proxy for the kernels a CUDA graph replays: the step measured is the static-shape forward that
inference/graphs.py captures on the GPU (`DecodeGraphs(capture=False)`), logged op by op with a
TorchDispatchMode. Ops that only make a view (their result aliases an input without writing it:
view, transpose, slice, expand, ...) launch no kernel and are counted apart. The MoE experts call
(`kernels.moe_experts`; the Triton decode path is 2 kernels on the GPU) is counted as one row
"experts" whatever the CPU backend runs inside it.

    python benchmarks/decode_ops.py                 # Mixtral-shaped mini model, bf16 (as on the GPU)
    python benchmarks/decode_ops.py --dtype fp32 --list   # also print one layer's ops in order
    python benchmarks/decode_ops.py --cuda          # on a GPU: the real kernels of the step, per layer
"""

from __future__ import annotations

import argparse
import collections
import inspect
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from moesaic import Engine, ModelConfig, SamplingParams, build_model, kernels  # noqa: E402
from moesaic.inference.cache import SlotCache  # noqa: E402
from moesaic.inference.graphs import DecodeGraphs  # noqa: E402
from moesaic.inference.scheduler import Scheduler  # noqa: E402

NO_KERNEL = {"_unsafe_view", "empty", "empty_strided", "lift_fresh", "scalar_tensor"}


def is_view(func) -> bool:
    """True when the op launches no kernel: its outputs alias an input without writing it, or it
    only allocates / relabels (`_unsafe_view`, `empty`), or wraps a Python scalar (`scalar_tensor`:
    made on the CPU for `where(c, x, 0.0)`; SDPA's bool-mask conversion makes its two on the mask's
    device, i.e. 2 GPU fills per layer that this count leaves out)."""
    return func.__name__.split(".")[0] in NO_KERNEL or any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class OpLog(TorchDispatchMode):
    """Records (module path, op name, is_view) of every aten op; the module stack comes from hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = ["(top)"]
        self.ops: list[tuple[str, str, bool]] = []
        self.in_experts = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # log what the composite op runs (linear -> addmm, to -> _to_copy, ...)
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if not self.in_experts:
            self.ops.append((self.stack[-1], func.__name__, is_view(func)))
        return func(*args, **kwargs)


def hook_modules(model, log: OpLog) -> None:
    for name, mod in model.named_modules():
        if not name:
            continue
        mod.register_forward_pre_hook(lambda m, a, n=name: log.stack.append(n))
        mod.register_forward_hook(lambda m, a, o: log.stack.pop() and None)


def wrap_experts(log: OpLog) -> None:
    inner = kernels.moe_experts

    def experts(*args, **kwargs):
        log.ops.append((log.stack[-1] + ".experts", "moe_experts", False))
        log.in_experts = True
        try:
            return inner(*args, **kwargs)
        finally:
            log.in_experts = False

    kernels.moe_experts = experts


def group(name: str) -> str:
    """blocks.3.attn.wq -> attn.wq; top-level modules keep their name."""
    parts = name.split(".")
    return ".".join(parts[2:]) or "(block)" if parts[0] == "blocks" else name


def cuda_kernels(layers: int, show: bool) -> int:
    """GPU kernels of one static decode step (the forward a CUDA graph captures), run eagerly on CUDA
    under torch.profiler: the engine as it runs there (bf16, MoE on its default backend)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = ModelConfig.preset("mixtral-mini", n_layers=layers, max_seq_len=256)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(cfg).to(torch.bfloat16).eval()
    eng = Engine(model, None, max_batch=1, max_len=256, cuda_graphs=False)
    req = eng.submit(list(range(1, 17)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    eng.step()  # prefill
    graphs = DecodeGraphs(eng.model, eng.cache, capture=False)
    pos = len(req.prompt_ids) + len(req.output_ids) - 1
    with torch.inference_mode():
        for _ in range(3):  # build the bucket, tune / compile kernels
            graphs.decode([req.output_ids[-1]], [req.slot], [pos], None)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graphs.decode([req.output_ids[-1]], [req.slot], [pos], None)
            torch.cuda.synchronize()
    names = collections.Counter(e.name for e in prof.events()
                                if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name)
    if show:
        print(f"{layers} layers: {sum(names.values())} kernels; by name:")
        for name, n in names.most_common():
            print(f"  {n:4d}  {name[:110]}")
    return sum(names.values())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--no-fuse", action="store_true",
                    help="separate q/k/v projections and k / v cache buffers (what the CPU engine runs)")
    ap.add_argument("--list", action="store_true", help="print layer 1's ops in order")
    ap.add_argument("--cuda", action="store_true",
                    help="instead: count the GPU kernels of the step on CUDA (2 and 4 layers; per layer = half the difference)")
    a = ap.parse_args(argv)
    if a.cuda:
        k2, k4 = cuda_kernels(2, False), cuda_kernels(4, True)
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}: GPU kernels per decode step: "
              f"{k2} (2 layers), {k4} (4 layers): {(k4 - k2) / 2:.1f} per layer, {2 * k2 - k4} outside the layers")
        return dict(per_layer=(k4 - k2) / 2, outside=2 * k2 - k4)
    cfg = ModelConfig.preset("mixtral-mini", n_layers=a.layers, max_seq_len=256)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = build_model(cfg).to(dtype).eval()
    eng = Engine(model, None, max_batch=1, max_len=256, cuda_graphs=False, onednn=False, huge_pages=False)
    if not a.no_fuse and hasattr(eng.model, "fuse_qkv"):  # as the engine does on the GPU:
        eng.model.fuse_qkv()  # one q/k/v matmul, and k / v side by side in one cache buffer
        if "kv_together" in inspect.signature(SlotCache).parameters:
            eng.cache = SlotCache.for_model(cfg, 1, 256, dtype=dtype, kv_together=True)
            eng.scheduler = Scheduler(eng.cache)
    req = eng.submit(list(range(1, 17)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    eng.step()  # prefill
    graphs = DecodeGraphs(eng.model, eng.cache, capture=False)
    pos = len(req.prompt_ids) + len(req.output_ids) - 1
    with torch.inference_mode():
        graphs.decode([req.output_ids[-1]], [req.slot], [pos], None)  # build the bucket (not logged)
        log = OpLog()
        hook_modules(eng.model, log)
        wrap_experts(log)
        with log:
            graphs.decode([req.output_ids[-1]], [req.slot], [pos], None)
    per_layer: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    outside = collections.Counter()
    by_module = collections.Counter()
    views = 0
    for mod, op, view in log.ops:
        if view:
            views += 1
            continue
        if mod.startswith("blocks."):
            per_layer[int(mod.split(".")[1])][op] += 1
            by_module[group(mod)] += 1
        else:
            outside[f"{mod}: {op}"] += 1
    n_layer = [sum(c.values()) for _, c in sorted(per_layer.items())]
    print(f"torch {torch.__version__}, mixtral-mini x {a.layers} layers, {a.dtype}, batch 1, static decode step")
    total = sum(n_layer) + sum(outside.values())
    print(f"kernel-launching aten ops per layer: {n_layer}; whole step: {total} "
          f"(layer 0 also computes the step's rotary tables; view-only ops apart: {views})")
    print(f"outside the layers: {sum(outside.values())}  {dict(outside)}")
    print("per layer, by module:")
    for mod, n in sorted(by_module.items()):
        print(f"  {mod:<24} {n / a.layers:5.1f}")
    print("per layer, by op:", dict(per_layer[1].most_common()))
    if a.list:
        print("layer 1 in order:")
        for mod, op, view in log.ops:
            if mod.startswith("blocks.1.") or mod == "blocks.1":
                print(f"  {'  view ' if view else ''}{group(mod):<20} {op}")
    return dict(per_layer=n_layer, outside=sum(outside.values()), total=total)


if __name__ == "__main__":
    main()
