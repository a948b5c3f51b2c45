"""Weights in transparent huge pages (Linux): a transform applied to a finished CPU model, in place.

A batch-1 decode step streams every weight it uses once from memory; with 4 KiB pages that is one TLB
miss (a page walk) every 4 KiB, which the hardware prefetcher cannot hide. Backed by 2 MiB pages the
same GEMVs read faster: on the 2-core Zen 4 VM a 1 GiB fp32 sum went 26.3 -> 32.4 GB/s and batch-1
decode steps 1.00-1.10x faster (same-process A/B, fp32 and bf16, coarse and fine MoE shapes).

Linux's default THP mode ("madvise") gives huge pages only to memory that asks for them, so each
large parameter / buffer is copied into an anonymous mapping advised with MADV_HUGEPAGE, aligned to
2 MiB. Values, shapes and strides are unchanged. Memory the model allocates later (oneDNN-blocked
copies, activations) is not covered: torch's own allocator does that for every large allocation when
the process starts with THP_MEM_ALLOC_ENABLE=1 (set before torch is imported).
"""

from __future__ import annotations

import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20
_MOVED_ATTR = "_moesaic_huge_pages"  # the address a tensor was moved to


def huge_pages_supported() -> bool:
    """Whether this platform can advise huge pages (Linux with THP not set to "never")."""
    if getattr(mmap, "MADV_HUGEPAGE", None) is None:
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of CPU tensor t (same shape, strides and values) in memory advised for huge pages.

    The mapping lives as long as the returned tensor's storage (torch.frombuffer keeps a reference)."""
    if t.device.type != "cpu" or t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"huge_page_copy needs a dense CPU tensor, got {t.device} {t.layout}")
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
    nbytes = span * t.element_size()
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    base = torch.frombuffer(m, dtype=torch.uint8)
    off = (-base.data_ptr()) % HUGE_PAGE  # start on a 2 MiB boundary: the kernel maps whole aligned 2 MiB pages
    out = base[off:off + nbytes].view(t.dtype).as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def move_to_huge_pages(model: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Move every CPU parameter and buffer of at least `min_bytes` into huge-page memory, in place
    (`p.data` is replaced; Parameter objects, names and state dict stay). Returns the bytes moved
    (0 where huge pages are not supported). Call it before making oneDNN-blocked copies, which are
    keyed by the weight's address."""
    if not huge_pages_supported():
        return 0
    moved = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or t.device.type != "cpu" or t.layout != torch.strided:
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        if nbytes < min_bytes or getattr(t, _MOVED_ATTR, None) == t.data_ptr():
            continue  # small, or already moved (a second Engine on the same model)
        t.data = huge_page_copy(t.data)
        setattr(t, _MOVED_ATTR, t.data_ptr())
        moved += nbytes
    return moved
