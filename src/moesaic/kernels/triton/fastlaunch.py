"""Re-launch an already compiled Triton kernel without Triton's per-call Python dispatch.

Why: on the device machine one `kernel[grid](...)` call costs ~60 us of host time (binding,
cache-key hashing, knob lookups), so a 6-launch MoE forward spends ~360 us on the CPU: more than
the GPU needs at decode. We key each call on everything Triton specializes on (constexpr values,
num_warps/num_stages, each tensor's dtype and 16-byte alignment, each int's ==1 / %16 / int32
range; a key at least as fine as Triton's), let Triton compile and launch the first call of a key
normally, keep the CompiledKernel it returns, and call its launcher directly afterwards.

Launch hooks (profilers) are not called on the fast path; MOESAIC_TRITON_FASTLAUNCH=0 turns it off.
Under the interpreter (TRITON_INTERPRET=1) every call goes through Triton.
"""

from __future__ import annotations

import os

import torch

_I32 = (-(2 ** 31), 2 ** 31)


def _spec(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return (a == 1, a % 16 == 0, _I32[0] <= a < _I32[1])
    if isinstance(a, float):
        return "f"
    return (type(a), a)


class Launcher:
    """`Launcher(jit_fn)(grid, *runtime_args, num_warps=., num_stages=., launch_pdl=False, **constexprs)`;
    launch_pdl is a compile option too (Triton keeps it in the kernel's metadata, its launcher reads it)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.cache: dict = {}
        self.enabled = (os.environ.get("TRITON_INTERPRET", "0") != "1"
                        and os.environ.get("MOESAIC_TRITON_FASTLAUNCH", "1") != "0")
        if not self.enabled:
            return
        n_params = len(fn.arg_names)
        self.const_names = [fn.arg_names[i] for i in sorted(fn.constexprs)]
        if sorted(fn.constexprs) != list(range(n_params - len(self.const_names), n_params)):
            raise ValueError(f"{fn.arg_names}: constexpr parameters must come last for the fast launcher")

    def __call__(self, grid, *args, num_warps: int = 4, num_stages: int = 3, launch_pdl: bool = False, **consts):
        opts = {"launch_pdl": True} if launch_pdl else {}  # programmatic dependent launch (sm_90+)
        if not self.enabled:
            self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages, **opts, **consts)
            return
        cvals = tuple(consts[n] for n in self.const_names)
        key = (torch.cuda.current_device(), num_warps, num_stages, launch_pdl, cvals, tuple(map(_spec, args)))
        k = self.cache.get(key)
        if k is None:
            k = self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages, **opts, **consts)
            if hasattr(k, "result"):  # asynchronous compile mode
                k = k.result()
            self.cache[key] = k
            return
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        k.run(grid[0], g1, g2, torch.cuda.current_stream().cuda_stream, k.function, k.packed_metadata,
              None, None, None, *args, *cvals)


_LAUNCHERS: dict = {}


def launcher(fn) -> Launcher:
    """The (cached) fast launcher of a @triton.jit function."""
    lf = _LAUNCHERS.get(fn)
    if lf is None:
        lf = _LAUNCHERS[fn] = Launcher(fn)
    return lf
