"""Run metrics: metrics.jsonl (one JSON object per logged step or evaluation), optional TensorBoard
event files (when `tensorboard` is installed), and a rich progress bar."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from moesaic.checkpoint.io import write_text_atomic


class MetricsLog:
    """Appends one JSON line per record; `truncate_after(step)` drops what a crashed run logged past its
    last checkpoint, so a resumed run's file reads as if it had never stopped."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = _tensorboard_writer(run_dir) if tensorboard else None

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        write_text_atomic(self.path, "".join(k + "\n" for k in keep))

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def _tensorboard_writer(run_dir: Path):
    try:
        import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))


class ProgressBar:
    """A rich progress bar showing loss, tokens/s, lr, expert-load imbalance and dropped fraction."""

    def __init__(self, total: int, start: int, title: str, enabled: bool = True) -> None:
        self._p = None
        if not enabled or os.environ.get("MOESAIC_NO_PROGRESS"):
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn(f"[bold]{title}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                           console=Console(stderr=True), transient=False)
        self._task = self._p.add_task(title, total=total, completed=start, info="")
        self._p.start()

    @property
    def enabled(self) -> bool:
        return self._p is not None

    def update(self, step: int, info: str) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=step, info=info)

    def print(self, text: str) -> None:
        if self._p is not None:
            self._p.console.print(text)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
