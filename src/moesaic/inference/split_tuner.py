"""Chooses, step by step, between a batch-1 decode program that splits its kernels over the C worker thread and one
that runs on the calling thread alone, by comparing their run times on neighbouring steps.

Why: on a quiet 2-core VM the two-thread program is 1.10-1.21x faster (fine-64x8, fp32 / bf16 / W8A8); with another
process spinning on one of the cores it is 1.12-1.37x slower (three runnable threads on two cores: the worker and
the other process take turns on one, and the caller waits for the worker's half or takes it back), even with the
C worker's take-back (`kernels.cpu_pool`). Both programs compute the same bits, so the engine may switch at any step.

    tuner.choose() -> bool      True: run the two-thread program this step
    tuner.record(split, secs)   that program's run time

The preferred program (first: two threads) runs, except on exploring steps (every other step until `WARM`
comparisons exist, then every `EXPLORE`-th), which run the other one. Each exploring step is compared with the step
just before it (this VM's bandwidth drifts by 1.5x within minutes: only neighbouring steps compare alike); when the
median of the last `KEEP` ratios other / preferred is below `SWITCH`, the other program becomes the preferred one.
A program's first run (cold buffers) is not compared.
"""

from __future__ import annotations

import os
from collections import deque

ENABLED = os.environ.get("MOESAIC_FAST_STEP_ADAPT", "1") != "0"  # 0: always the two-thread program where it can


class SplitTuner:
    EXPLORE = 32
    WARM = 3
    KEEP = 5
    SWITCH = 0.95

    def __init__(self) -> None:
        self.prefer = True
        self.ratios: deque[float] = deque(maxlen=self.KEEP)
        self.steps = 0
        self._last: tuple[bool, float] | None = None
        self._seen: set[bool] = set()

    def choose(self) -> bool:
        self.steps += 1
        every = 2 if len(self.ratios) < self.WARM else self.EXPLORE
        return (not self.prefer) if self.steps % every == 0 else self.prefer

    def record(self, split: bool, seconds: float) -> None:
        if split not in self._seen:  # its first run: cold caches and buffers
            self._seen.add(split)
            self._last = None
            return
        if split != self.prefer and self._last is not None and self._last[0] == self.prefer:
            self.ratios.append(seconds / self._last[1])
            if len(self.ratios) >= self.WARM and sorted(self.ratios)[len(self.ratios) // 2] < self.SWITCH:
                self.prefer = split
                self.ratios.clear()
        self._last = (split, seconds)
