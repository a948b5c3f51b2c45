"""The training loop: `Trainer(model_cfg, train_cfg, out, tokenizer, data).fit()`.

Each optimizer step: learning rate from the schedule -> the next global batch from the sampler ->
forward/backward over micro-batches (train.step) -> non-finite check -> clip -> AdamW step -> loss-free
bias update -> log, evaluate, save (atomically). Resume restores weights, optimizer moments, RNG
states and the data position from the newest complete checkpoint, so the continued run computes the
same losses as one that never stopped (bit-exact on CPU).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from moesaic.checkpoint import native
from moesaic.config import ModelConfig
from moesaic.data.tokens import TokenData, WindowSampler, eval_windows
from moesaic.train.config import TrainConfig
from moesaic.train.graphed import GraphedStep, unsupported_reason
from moesaic.train.hardware import autocast_for, check_fits, resolve_device
from moesaic.train.metrics import MetricsLog, ProgressBar
from moesaic.train.optim import build_optimizer, lr_at, set_lr
from moesaic.train.step import evaluate, forward_backward, split_batch, update_biases


class TrainingStopped(RuntimeError):
    """Raised when a non-finite loss or gradient stops the run (nonfinite='stop' or too many skips)."""


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, out: str | Path, tokenizer, data: TokenData,
                 resume: bool = False, init_model: torch.nn.Module | None = None, log=print) -> None:
        if data.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"the tokenizer has {data.vocab_size} ids but ModelConfig.vocab_size is "
                             f"{model_cfg.vocab_size}; raise vocab_size or train a smaller tokenizer")
        if cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"TrainConfig.seq_len={cfg.seq_len} exceeds ModelConfig.max_seq_len="
                             f"{model_cfg.max_seq_len}")
        self.model_cfg, self.cfg, self.out = model_cfg, cfg, Path(out)
        self.tokenizer, self.data, self.resume, self.log = tokenizer, data, resume, log
        self.device = resolve_device(cfg.device)
        self.autocast = autocast_for(self.device, cfg.dtype)
        self._check_run_folder()
        check_fits(model_cfg, cfg.micro_batch_size, cfg.seq_len, self.device)
        torch.manual_seed(cfg.seed)
        model = init_model if init_model is not None else _build(model_cfg)
        self.model = model.to(self.device).train()
        if model_cfg.is_moe:
            self.model.set_moe_backend(cfg.moe_backend)
        self.optimizer = build_optimizer(self.model, cfg)
        self.sampler = WindowSampler(data.train, cfg.seq_len, cfg.seed)
        self.val_NS1 = torch.from_numpy(eval_windows(data.val, cfg.seq_len, cfg.eval_windows)).to(self.device)
        self.step, self.position, self.skipped_in_row, self.skipped_total = 0, 0, 0, 0
        self.graphed: GraphedStep | None = None
        self._graph_decided = cfg.cuda_graph == "off"
        self.last_val: float | None = None

    # -------------------------------------------------------------- run folder
    def _check_run_folder(self) -> None:
        has_run = (self.out / "config.json").exists() or native.list_checkpoints(self.out)
        if has_run and not self.resume:
            raise ValueError(f"{self.out} already holds a run; pass --resume to continue it or choose "
                             "another --out (nothing was overwritten)")
        if self.resume and has_run:
            saved = native.read_model_config(self.out)
            diff = _diff(saved.to_dict(), self.model_cfg.to_dict(), ())
            tc = self.out / "train_config.json"
            if tc.exists():
                diff += _diff(json.loads(tc.read_text()), self.cfg.to_dict(), TrainConfig.RESUME_FREE)
            if diff:
                raise ValueError(f"--resume: {self.out} was trained with a different config: "
                                 + "; ".join(diff[:8]))

    def _start(self) -> None:
        metrics = MetricsLog(self.out)
        found = native.newest_loadable(self.out, self.model, self.optimizer) if self.resume else None
        if found is not None:
            ckpt, state = found
            self.step, self.position = int(state["step"]), int(state["position"])
            self.skipped_total = int(state.get("skipped_total", 0))
            self.last_val = state.get("val_loss")
            metrics.truncate_after(self.step)
            self.log(f"resumed {self.out} from {ckpt.name} (step {self.step})")
        else:
            if self.resume:
                self.log(f"--resume: no complete checkpoint in {self.out}; starting from step 0")
            metrics.truncate_after(0)
            native.write_run_files(self.out, self.model_cfg, self.tokenizer, self.cfg.to_json())
        self.metrics = metrics

    # -------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train to cfg.steps (from the checkpoint when resuming); returns a summary."""
        self._start()
        cfg = self.cfg
        bar = ProgressBar(cfg.steps, self.step, self.out.name, enabled=cfg.progress)
        t_start = time.perf_counter()
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                rec = self._train_step()
                rec["tokens_per_s"] = round(cfg.tokens_per_step / max(time.perf_counter() - t0, 1e-9), 1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.metrics.write(rec)
                bar.update(self.step, _bar_info(rec, self.last_val))
                self._maybe_eval_and_save(bar)
                _debug_sleep()
        finally:
            bar.close()
            self.metrics.close()
        return {"steps": self.step, "tokens": self.step * cfg.tokens_per_step, "val_loss": self.last_val,
                "seconds": time.perf_counter() - t_start, "skipped": self.skipped_total}

    def _train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, cfg)
        batch = torch.from_numpy(self.sampler.batch(self.position, cfg.batch_size)).to(self.device)
        graphed = self._graph_for(batch)
        if graphed is not None:  # the whole step in one replay; a non-finite step changed nothing in it
            st, gnorm = graphed.run(batch, lr)
            finite = math.isfinite(st.total_loss) and math.isfinite(gnorm)
        else:
            set_lr(self.optimizer, lr)
            self.optimizer.zero_grad(set_to_none=True)
            st = forward_backward(model, split_batch(batch, cfg.micro_batch_size), self.autocast)
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
            finite = math.isfinite(st.total_loss) and math.isfinite(gnorm)
            if finite:
                self.optimizer.step()
                update_biases(model, st.counts_LE)
        if finite:
            self.skipped_in_row = 0
        else:
            self._nonfinite(st.total_loss, gnorm)
        self.position += cfg.batch_size
        self.step += 1
        return {"step": self.step, "loss": st.lm_loss, "aux_loss": st.aux_loss, "z_loss": st.z_loss, "lr": lr,
                "tokens": self.step * cfg.tokens_per_step, "grad_norm": gnorm, "imbalance": st.imbalance,
                "dropped": st.dropped_fraction, "skipped": not finite}

    def _graph_for(self, batch: torch.Tensor) -> GraphedStep | None:
        """The captured step (cuda_graph='auto'), built on the first batch; None: eager steps."""
        if not self._graph_decided:
            self._graph_decided = True
            reason = unsupported_reason(self.model, self.cfg, self.device)
            if reason is None:
                try:
                    self.graphed = GraphedStep(self.model, self.optimizer, self.cfg, self.autocast, batch)
                    self.log("CUDA graph: each optimizer step is one replay")
                except Exception as e:  # noqa: BLE001 - any capture failure: the eager step is always right
                    reason = f"capture failed ({type(e).__name__}: {e})"
            if reason is not None and self.device.type == "cuda":  # on CPU there is nothing to say
                self.log(f"CUDA graph off: {reason}; eager steps")
        return self.graphed

    def _nonfinite(self, loss: float, gnorm: float) -> None:
        if self.graphed is None:  # a graph's gradients live in its own memory: leave them
            self.optimizer.zero_grad(set_to_none=True)
        what = f"step {self.step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} " \
               f"(loss={loss}, grad_norm={gnorm}); the optimizer did not touch the weights"
        self.skipped_in_row += 1
        self.skipped_total += 1
        if self.cfg.nonfinite == "stop":
            raise TrainingStopped(what + " (nonfinite='stop'); the last checkpoint is intact")
        if self.skipped_in_row > self.cfg.max_skipped:
            raise TrainingStopped(what + f"; {self.skipped_in_row} batches in a row skipped, stopping")
        self.log(what + ", batch skipped")

    def _maybe_eval_and_save(self, bar: ProgressBar) -> None:
        cfg, s = self.cfg, self.step
        last = s == cfg.steps
        if last or (cfg.eval_every and s % cfg.eval_every == 0):
            self.last_val = evaluate(self.model, self.val_NS1, cfg.micro_batch_size, self.autocast)
            self.metrics.write({"step": s, "val_loss": self.last_val, "tokens": s * cfg.tokens_per_step})
            line = f"{self.out.name} step {s}: val_loss {self.last_val:.4f}"
            if bar.enabled:
                bar.print(line)
            else:
                self.log(line)
        if (last and cfg.save_final) or (cfg.save_every and s % cfg.save_every == 0):
            self.save()

    def save(self) -> Path:
        state = {"step": self.step, "position": self.position, "skipped_total": self.skipped_total,
                 "val_loss": self.last_val, "epoch": self.sampler.epoch_of(self.position)}
        return native.save_checkpoint(self.out, self.model, self.tokenizer, self.optimizer, state,
                                      keep=self.cfg.keep_checkpoints)


def _build(cfg: ModelConfig):
    from moesaic.model import build_model

    return build_model(cfg)


def _diff(saved: dict, now: dict, free: tuple[str, ...]) -> list[str]:
    keys = sorted((set(saved) | set(now)) - set(free))
    return [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _bar_info(rec: dict[str, Any], val: float | None) -> str:
    v = f" val {val:.3f}" if val is not None else ""
    return (f"loss {rec['loss']:.3f}{v} | {rec['tokens_per_s']:.0f} tok/s | lr {rec['lr']:.1e} | "
            f"load max/mean {rec['imbalance']:.2f} | drop {rec['dropped']:.1%}")


def _debug_sleep() -> None:
    """MOESAIC_DEBUG_STEP_SLEEP=seconds slows each step down so crash tests can kill a run mid-way."""
    s = os.environ.get("MOESAIC_DEBUG_STEP_SLEEP")
    if s:
        time.sleep(float(s))
