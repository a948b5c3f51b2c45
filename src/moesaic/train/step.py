"""One optimizer step's forward/backward over micro-batches, with accumulation-invariant balancing.

Shape legend: B rows, S positions, E experts, L MoE layers.

Why a pre-pass: the Switch balance loss is E * sum_i f_i * P_i, with f_i (fraction of routed pairs sent
to expert i; no gradient) and P_i (mean router probability; differentiable). Over a global batch split
into micro-batches m, P_i = sum_m prob_sum_i^m / T and the loss is linear in each prob_sum^m once f is
fixed. So if every micro-batch uses the GLOBAL f, the sum of the micro-batch gradients equals the
full-batch gradient exactly. f is only known after routing every micro-batch, hence a cheap no-grad
routing pre-pass (run only when there is accumulation and an aux loss; same RNG stream as the real
pass, so router jitter draws the same noise). The z-loss and the LM loss are sums over tokens divided
by the global count of real tokens/targets: exact without any pre-pass. The loss-free bias update uses
counts summed over micro-batches, identical to one big batch.

Plan of `forward_backward`:
 1. count real tokens and real targets of the whole batch;
 2. if needed, the no-grad pre-pass gives global counts_E per MoE layer;
 3. per micro-batch: forward, LM loss sum / n_targets + router terms with global f, backward;
 4. return the statistics summed over micro-batches (for logging and the bias update).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moesaic.model.losses import load_balance_loss, z_loss

IGNORE = -100  # target id that contributes no loss (padding)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, S], IGNORE where no loss
    token_mask: torch.Tensor | None = None  # [B, S] True for real tokens (None: all real)


@dataclass
class StepStats:
    """Sums over the micro-batches of one optimizer step."""

    lm_loss: float = 0.0  # mean over real targets
    aux_loss: float = 0.0  # sum over MoE layers of the (unweighted) balance loss
    z_loss: float = 0.0  # sum over MoE layers of the (unweighted) z-loss
    total_loss: float = 0.0  # what was differentiated: lm + aux_coef*aux + z_coef*z
    n_targets: int = 0
    n_tokens: int = 0
    counts_LE: list[torch.Tensor] = field(default_factory=list)
    prepass_counts_LE: list[torch.Tensor] | None = None  # the global counts the gradient used (pre-pass)
    n_dropped: int = 0
    top_k: int = 0

    @property
    def imbalance(self) -> float:
        """max/mean expert load, worst MoE layer (1.0 = balanced; 1.0 for dense models)."""
        if not self.counts_LE:
            return 1.0
        c = torch.stack(self.counts_LE).float()  # [L, E]; one device->host copy for all layers
        ratio = torch.where(c.sum(1) > 0, c.max(1).values / c.mean(1).clamp(min=1e-30), torch.ones_like(c[:, 0]))
        return float(ratio.max())

    @property
    def dropped_fraction(self) -> float:
        pairs = self.n_tokens * self.top_k * max(1, len(self.counts_LE))
        return self.n_dropped / pairs if pairs else 0.0


def split_batch(tokens_BS1: torch.Tensor, micro_batch_size: int) -> list[MicroBatch]:
    """Windows [B, S+1] -> micro-batches of inputs [:, :-1] and targets [:, 1:]."""
    return [MicroBatch(tokens_BS1[i:i + micro_batch_size, :-1], tokens_BS1[i:i + micro_batch_size, 1:])
            for i in range(0, tokens_BS1.shape[0], micro_batch_size)]


def _mask(mb: MicroBatch) -> torch.Tensor:
    return mb.token_mask if mb.token_mask is not None else torch.ones_like(mb.input_ids, dtype=torch.bool)


@torch.no_grad()
def routing_prepass(model, micro_batches: list[MicroBatch], autocast) -> list[torch.Tensor]:
    """Global counts_E per MoE layer, summed over micro-batches, from no-grad forwards."""
    total: list[torch.Tensor] = []
    for mb in micro_batches:
        with autocast():
            out = model.forward_aux(mb.input_ids, token_mask=mb.token_mask)
        for i, r in enumerate(out.router_outputs):
            c = r.counts_E.detach()
            if i < len(total):
                total[i] = total[i] + c
            else:
                total.append(c.clone())
    return total


def forward_backward(model, micro_batches: list[MicroBatch], autocast=contextlib.nullcontext) -> StepStats:
    """Accumulate gradients of one global batch into model's .grad (see the module docstring)."""
    cfg = model.config
    aux_coef = cfg.aux_loss_coef if cfg.is_moe else 0.0
    z_coef = cfg.z_loss_coef if cfg.is_moe else 0.0
    st = StepStats()
    st.n_targets = int(sum(int((mb.targets != IGNORE).sum()) for mb in micro_batches))
    st.n_tokens = int(sum(int(_mask(mb).sum()) for mb in micro_batches))
    if st.n_targets == 0:
        raise ValueError("the batch holds no target tokens (everything is padding)")
    global_counts = None
    if aux_coef > 0 and len(micro_batches) > 1:
        # same RNG stream for the pre-pass and the real pass (router jitter must draw the same noise)
        devices = [model.embed.weight.device] if model.embed.weight.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            global_counts = routing_prepass(model, micro_batches, autocast)
        st.prepass_counts_LE = global_counts
    prob_sums: list[torch.Tensor] = []
    z_sums: list[torch.Tensor] = []
    for mb in micro_batches:
        with autocast():
            out = model.forward_aux(mb.input_ids, token_mask=mb.token_mask)
        logits = out.logits.float()
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb.targets.reshape(-1),
                             ignore_index=IGNORE, reduction="sum") / st.n_targets
        routers = out.router_outputs
        _accumulate(st, routers, prob_sums, z_sums)
        counts = global_counts if global_counts is not None else [r.counts_E for r in routers]
        router_term = lm.new_zeros(())
        for r, c in zip(routers, counts):
            if aux_coef > 0:
                router_term = router_term + aux_coef * load_balance_loss(c, r.prob_sum_E, st.n_tokens, r.top_k)
            if z_coef > 0:
                router_term = router_term + z_coef * z_loss(r.z_sum, st.n_tokens)
        (lm + router_term).backward()
        st.lm_loss += float(lm.detach())
    if st.counts_LE:  # one device->host copy for all layers (not two per layer)
        aux = torch.stack([load_balance_loss(c, p, st.n_tokens, st.top_k) for c, p in zip(st.counts_LE, prob_sums)])
        zs = torch.stack([z_loss(z, st.n_tokens) for z in z_sums])
        st.aux_loss, st.z_loss = torch.stack([aux.sum(), zs.sum()]).tolist()
    st.total_loss = st.lm_loss + aux_coef * st.aux_loss + z_coef * st.z_loss
    return st


def _accumulate(st: StepStats, routers, prob_sums: list, z_sums: list) -> None:
    for i, r in enumerate(routers):
        if i < len(st.counts_LE):
            st.counts_LE[i] = st.counts_LE[i] + r.counts_E.detach()
            prob_sums[i] = prob_sums[i] + r.prob_sum_E.detach()
            z_sums[i] = z_sums[i] + r.z_sum.detach()
        else:
            st.counts_LE.append(r.counts_E.detach().clone())
            prob_sums.append(r.prob_sum_E.detach().clone())
            z_sums.append(r.z_sum.detach().clone())
        st.n_dropped += r.n_dropped
        st.top_k = r.top_k


@torch.no_grad()
def update_biases(model, counts_LE: list[torch.Tensor], keep: torch.Tensor | None = None) -> None:
    """Loss-free balancing: nudge each sigmoid router's correction bias with this step's global counts."""
    from moesaic.model.losses import update_correction_bias

    rate = model.config.bias_update_rate
    if rate <= 0:
        return
    for layer, counts in zip(model.moe_layers(), counts_LE):
        bias = getattr(layer.router, "correction_bias", None)
        if bias is not None:
            update_correction_bias(bias, counts, rate, keep)


@torch.no_grad()
def evaluate(model, windows_NS1: torch.Tensor, batch_size: int, autocast=contextlib.nullcontext) -> float:
    """Mean next-token cross-entropy over fixed validation windows [N, S+1] (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, windows_NS1.shape[0], batch_size):
        w = windows_NS1[i:i + batch_size]
        with autocast():
            logits = model(w[:, :-1]).float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                       reduction="sum"))
        n += w[:, 1:].numel()
    model.train(was_training)
    return total / max(n, 1)
