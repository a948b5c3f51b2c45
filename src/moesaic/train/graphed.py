"""One optimizer step captured as a CUDA graph: forward, backward, clipping, AdamW and the bias update.

Shape legend: B rows, S positions, V vocabulary, E experts, L MoE layers.

Why: measured on an H200 (docs/gpu.md), a small MoE's eager training step is bound by the host: ~34 ms
of GPU work under ~55 ms of Python and ~1,200 kernel launches. Replaying the captured step costs one
launch. What the capture needs, and how each is met:
  * no host syncs inside the step: the losses, the gradient norm and the non-finite test stay on the
    device (`device_step`); the Trainer reads them back once, after the replay;
  * static addresses: the batch is copied into one input buffer; the learning rate is a 0-d tensor in
    each param group, filled before each replay; the optimizer is the fused AdamW, which keeps its step
    counts on the device;
  * the skip on a non-finite loss or gradient norm: the optimizer's `found_inf` (what GradScaler uses)
    makes the fused AdamW leave weights, moments and step counts untouched, and the bias update is
    multiplied by 0;
  * warm-up iterations (the Triton kernels compile and tune, the allocator settles) change the weights:
    every parameter, buffer, optimizer state and the RNG state is put back after the capture.
Limits (the Trainer falls back to the eager step, and says why): CUDA only, one micro-batch per step
(no accumulation), a backend without host syncs (`triton` or a dense model; `sorted` loops over experts
on the host), no Switch capacity drops (counted on the host).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moesaic.model.losses import load_balance_loss, z_loss
from moesaic.train.step import IGNORE, StepStats, update_biases

WARMUP = 3


def unsupported_reason(model, cfg, device: torch.device) -> str | None:
    """Why a captured step cannot run for this model/config (None: it can)."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if cfg.micro_batch_size != cfg.batch_size:
        return "gradient accumulation (micro_batch_size < batch_size) is not captured"
    mc = model.config
    if mc.is_moe and mc.router == "switch":
        return "the Switch router's capacity drops are counted on the host"
    if mc.is_moe and cfg.moe_backend not in ("auto", "triton"):
        return f"the {cfg.moe_backend!r} MoE backend syncs with the host; use triton"
    return None


def device_step(model, input_BS: torch.Tensor, target_BS: torch.Tensor, autocast, grad_clip: float,
                optimizer, found_inf: torch.Tensor) -> dict[str, torch.Tensor]:
    """forward_backward + clipping + AdamW + bias update with no host sync; returns device scalars/stacks.

    Same arithmetic as the eager step (`step.forward_backward` with one micro-batch, then the Trainer's
    clip, step and bias update), so the tests can check the two against each other on CPU."""
    cfg = model.config
    aux_coef = cfg.aux_loss_coef if cfg.is_moe else 0.0
    z_coef = cfg.z_loss_coef if cfg.is_moe else 0.0
    n_tokens = input_BS.numel()  # no padding in a captured step: every position is a real token
    with autocast():
        out = model.forward_aux(input_BS)
    logits = out.logits.float()
    n_targets = (target_BS != IGNORE).sum().clamp(min=1)
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_BS.reshape(-1), ignore_index=IGNORE,
                         reduction="sum") / n_targets
    routers = out.router_outputs
    zero = lm.new_zeros(())
    aux = torch.stack([load_balance_loss(r.counts_E, r.prob_sum_E, n_tokens, r.top_k) for r in routers]).sum() \
        if routers else zero
    zs = torch.stack([z_loss(r.z_sum, n_tokens) for r in routers]).sum() if routers else zero
    total = lm + aux_coef * aux + z_coef * zs
    total.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    bad = ~(torch.isfinite(total.detach()) & torch.isfinite(gnorm))
    found_inf.copy_(bad.float())
    optimizer.step()  # fused AdamW reads optimizer.found_inf: a bad step leaves everything untouched
    counts = [r.counts_E.detach() for r in routers]
    if cfg.is_moe:
        update_biases(model, counts, keep=1.0 - found_inf)  # no update on a bad step, decided on the device
    return {"lm": lm.detach(), "aux": aux.detach(), "z": zs.detach(), "total": total.detach(),
            "gnorm": gnorm.detach(), "counts_LE": torch.stack(counts) if counts else None}


class GraphedStep:
    """A Trainer's optimizer step as a CUDA graph over a fixed [B, S+1] batch shape.

    `GraphedStep(model, optimizer, cfg, autocast, batch_BS1)` warms up and captures on the first batch
    (the model and optimizer are left exactly as they were); each `run(batch_BS1, lr)` copies the batch
    in, sets the learning rate, replays, and returns the step's statistics as Python numbers (one sync)."""

    def __init__(self, model, optimizer, cfg, autocast, batch_BS1: torch.Tensor) -> None:
        self.model, self.optimizer, self.cfg, self.autocast = model, optimizer, cfg, autocast
        dev = batch_BS1.device
        for g in optimizer.param_groups:  # a 0-d tensor the graph reads, filled before each replay
            if not isinstance(g["lr"], torch.Tensor):
                g["lr"] = torch.tensor(float(g["lr"]), device=dev)
            g["capturable"] = True  # the fused AdamW keeps its step counts on the GPU already
        self.found_inf = torch.zeros((), device=dev)
        optimizer.found_inf = self.found_inf
        self.static_BS1 = batch_BS1.clone()
        saved = self._snapshot()
        try:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(WARMUP):
                    self._body()
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self.out = self._body()
        except Exception:
            optimizer.found_inf = None  # the eager step must not see it
            optimizer.zero_grad(set_to_none=True)
            self._restore(saved)
            raise
        self._restore(saved)

    def _body(self) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        x = self.static_BS1
        return device_step(self.model, x[:, :-1], x[:, 1:], self.autocast, self.cfg.grad_clip, self.optimizer,
                           self.found_inf)

    def _tensors(self) -> list[torch.Tensor]:
        ts = list(self.model.parameters()) + list(self.model.buffers())
        for st in self.optimizer.state.values():
            ts += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return ts

    def _snapshot(self) -> dict:
        return {"tensors": {id(t): t.detach().clone() for t in self._tensors()},
                "rng": torch.cuda.get_rng_state(self.static_BS1.device), "cpu_rng": torch.get_rng_state()}

    @torch.no_grad()
    def _restore(self, saved: dict) -> None:
        for t in self._tensors():
            old = saved["tensors"].get(id(t))
            if old is not None:
                t.copy_(old)
            else:  # optimizer state the warm-up created: a fresh AdamW state is all zeros (step 0 too)
                t.zero_()
        torch.cuda.set_rng_state(saved["rng"], self.static_BS1.device)
        torch.set_rng_state(saved["cpu_rng"])

    def run(self, batch_BS1: torch.Tensor, lr: float) -> tuple[StepStats, float]:
        if batch_BS1.shape != self.static_BS1.shape:
            raise ValueError(f"captured for batches of shape {tuple(self.static_BS1.shape)}, got "
                             f"{tuple(batch_BS1.shape)}")
        self.static_BS1.copy_(batch_BS1, non_blocking=True)
        for g in self.optimizer.param_groups:
            g["lr"].fill_(lr)
        self.graph.replay()
        o = self.out
        lm, aux, z, total, gnorm = torch.stack([o["lm"], o["aux"], o["z"], o["total"], o["gnorm"]]).tolist()
        mc = self.model.config
        st = StepStats(lm_loss=lm, aux_loss=aux, z_loss=z, total_loss=total, n_targets=self.static_BS1[:, 1:].numel(),
                       n_tokens=self.static_BS1[:, :-1].numel(), top_k=mc.top_k if mc.is_moe else 0,
                       counts_LE=list(o["counts_LE"]) if o["counts_LE"] is not None else [])
        return st, gnorm
