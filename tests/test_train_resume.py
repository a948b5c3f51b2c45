"""Crash-safe resume: N steps + kill -9 + --resume gives the same losses, at every step, as a straight run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from moesaic.data.corpus import builtin_files


def _corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    files = sorted((p for p in builtin_files() if 2000 < p.stat().st_size < 12000), key=lambda p: p.name)[:20]
    for i, p in enumerate(files):
        shutil.copy(p, d / f"{i:03d}_{p.name}")
    return d


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moesaic.cli", "train", "--preset", "tiny", "--data", str(data), "--steps", "8",
            "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "32", "--save-every", "2",
            "--eval-every", "4", "--lr", "0.01", "--warmup", "2", "--no-progress", "--device", "cpu",
            "--set", "router_jitter=0.1", "--out", str(out), *extra]


def _env(tmp_path: Path, **kw) -> dict:
    env = dict(os.environ, MOESAIC_CACHE=str(tmp_path / "cache"), MOESAIC_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               **kw)
    env.pop("MOESAIC_DEBUG_STEP_SLEEP", None)
    env.update(kw)
    return env


def _losses(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("aux_loss"), r.get("val_loss")) for r in rows]


def test_kill9_then_resume_gives_identical_losses(tmp_path):
    data = _corpus(tmp_path)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    subprocess.run(_cmd(data, straight), env=_env(tmp_path), check=True, capture_output=True, timeout=240)

    proc = subprocess.Popen(_cmd(data, crashed), env=_env(tmp_path, MOESAIC_DEBUG_STEP_SLEEP="0.4"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (crashed / "checkpoints" / "step-00000004").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere past step 4, before step 8
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (crashed / "checkpoints" / "step-00000008").exists(), "killed too late to test anything"

    res = subprocess.run(_cmd(data, crashed, "--resume"), env=_env(tmp_path), capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr
    assert "resumed" in res.stderr
    a, b = _losses(straight), _losses(crashed)
    assert [r[0] for r in a if r[1] is not None] == list(range(1, 9))
    assert a == b  # bit-identical: every step's loss, aux loss and every validation loss


def test_resume_refuses_another_config_and_a_plain_rerun_refuses_to_overwrite(tmp_path):
    data = _corpus(tmp_path)
    out = tmp_path / "run"
    subprocess.run(_cmd(data, out), env=_env(tmp_path), check=True, capture_output=True, timeout=240)
    before = (out / "model.safetensors").read_bytes()
    again = subprocess.run(_cmd(data, out), env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    other = subprocess.run(_cmd(data, out, "--resume", "--lr", "0.02"), env=_env(tmp_path), capture_output=True,
                           text=True, timeout=240)
    assert other.returncode == 2 and "different config" in other.stderr and "lr" in other.stderr
    assert (out / "model.safetensors").read_bytes() == before
