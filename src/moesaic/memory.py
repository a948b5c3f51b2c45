"""How much host memory is free now (for decisions made before allocating: training's fit check, the
engine's optional weight copies)."""

from __future__ import annotations

import os


def available_memory() -> int | None:
    """Bytes of memory available now: Linux MemAvailable, elsewhere the physical memory; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
