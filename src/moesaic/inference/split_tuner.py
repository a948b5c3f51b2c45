"""Chooses, step by step, between a batch-1 decode program that splits its kernels over the C worker thread and one
that runs on the calling thread alone, by their recent run times.

Why: on a quiet 2-core VM the two-thread program is 1.10-1.21x faster (fine-64x8, fp32 / bf16 / W8A8); with another
process spinning on one of the cores it is 1.12-1.37x slower (three runnable threads on two cores: the worker and
the other process take turns on one, and the caller waits for the worker's half or takes it back), even with the
C worker's take-back (`kernels.cpu_pool`). Both programs compute the same bits, so the engine may switch at any step.

    tuner.choose() -> bool      True: run the two-thread program this step
    tuner.record(split, secs)   that program's run time

After a warm-up that runs each three times, the program with the lower median of its last `KEEP` runs is chosen,
except every `EXPLORE`-th step, which runs the other one (so a change of load is noticed within a few dozen steps).
"""

from __future__ import annotations

import os
from collections import deque

ENABLED = os.environ.get("MOESAIC_FAST_STEP_ADAPT", "1") != "0"  # 0: always the two-thread program where it can


class SplitTuner:
    KEEP = 8
    EXPLORE = 32
    WARM = 3

    def __init__(self) -> None:
        self.times: dict[bool, deque[float]] = {True: deque(maxlen=self.KEEP), False: deque(maxlen=self.KEEP)}
        self.steps = 0

    def choose(self) -> bool:
        self.steps += 1
        a, b = self.times[True], self.times[False]
        if len(a) < self.WARM or len(b) < self.WARM:  # warm-up: the one with fewer runs (two-thread first)
            return len(a) <= len(b)
        best = _median(a) <= _median(b)
        return (not best) if self.steps % self.EXPLORE == 0 else best

    def record(self, split: bool, seconds: float) -> None:
        self.times[split].append(seconds)


def _median(d: deque[float]) -> float:
    return sorted(d)[len(d) // 2]
