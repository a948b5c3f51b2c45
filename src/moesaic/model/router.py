"""Routers: hidden states [T, D] -> each token's top-k experts and combine weights.

Shape legend: T tokens, D model dim, E experts, K top-k, Gr expert groups.

Every router returns a `RouterOutput`. Expert id -1 marks a (token, slot) dropped by
capacity: its weight is 0 and the experts kernel skips it. Statistics are computed over
real tokens only (`token_mask`), so padding never counts toward load or losses, and they
are sums (not means) so a trainer can add them up across micro-batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.config import ModelConfig, capacity


class RouterOutput:
    """What a router decided for T tokens.

    weights_TK: combine weights (0 for dropped slots); expert_ids_TK: int64 expert per slot (-1 dropped);
    logits_TE: raw router logits; probs_TE: the per-expert probabilities the balance loss uses
    (softmax, or normalised sigmoid scores; None given: the softmax of the logits, computed on first
    access); valid_T: True for real tokens; n_dropped: real (token, slot) pairs dropped by capacity.

    Statistics are computed on first access (decoding never pays for them): counts_E: routed
    (token, slot) pairs per expert over real tokens, after drops; prob_sum_E: sum of probs_TE over
    real tokens (differentiable); z_sum: sum over real tokens of logsumexp(logits)^2 (differentiable);
    n_tokens: real tokens.
    """

    def __init__(self, weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor, logits_TE: torch.Tensor,
                 probs_TE: torch.Tensor | None, valid_T: torch.Tensor | None = None, n_dropped: int = 0) -> None:
        self.weights_TK, self.expert_ids_TK = weights_TK, expert_ids_TK
        self.logits_TE, self._probs_TE = logits_TE, probs_TE
        self.valid_T, self.n_dropped = valid_T, n_dropped

    @cached_property
    def probs_TE(self) -> torch.Tensor:
        return self.logits_TE.softmax(-1) if self._probs_TE is None else self._probs_TE

    @property
    def top_k(self) -> int:
        return self.expert_ids_TK.shape[1]

    @cached_property
    def n_tokens(self) -> int:
        return self.expert_ids_TK.shape[0] if self.valid_T is None else int(self.valid_T.sum())

    @cached_property
    def counts_E(self) -> torch.Tensor:
        ids = self.expert_ids_TK.reshape(-1)
        counts = torch.zeros(self.logits_TE.shape[-1], dtype=torch.long, device=ids.device)
        # scatter, not bincount(ids[ids >= 0]): the mask and bincount each wait for the GPU (3 syncs a layer)
        return counts.scatter_add_(0, ids.clamp(min=0), (ids >= 0).long())

    def _masked(self, x_T: torch.Tensor) -> torch.Tensor:
        return x_T if self.valid_T is None else x_T * self.valid_T.to(x_T.dtype).view(-1, *[1] * (x_T.dim() - 1))

    @cached_property
    def prob_sum_E(self) -> torch.Tensor:
        return self._masked(self.probs_TE).sum(0)

    @cached_property
    def z_sum(self) -> torch.Tensor:
        return self._masked(torch.logsumexp(self.logits_TE, dim=-1).pow(2)).sum()

    @property
    def dropped_fraction(self) -> float:
        total = self.n_tokens * self.top_k
        return self.n_dropped / total if total else 0.0

    @property
    def load_imbalance(self) -> float:
        """max / mean of tokens per expert (1.0 = perfectly balanced)."""
        c = self.counts_E.float()
        return float(c.max() / c.mean()) if float(c.sum()) > 0 else 1.0


class Router(nn.Module, ABC):
    """Base: a bias-free linear gate [E, D] in fp32 math; subclasses choose experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.normalize, self.scale = cfg.normalize_topk, cfg.routed_scaling_factor
        self.capacity_factor, self.jitter = cfg.capacity_factor, cfg.router_jitter
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model))
        nn.init.normal_(self.weight, std=0.02)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        return F.linear(x_TD.float(), self._weight_fp32())

    def _weight_fp32(self) -> torch.Tensor:
        """The gate weight in fp32. A 16-bit weight's fp32 copy is kept while no gradient is asked for
        (decode casts nothing per step), renewed when the weight moves or changes in place."""
        w = self.weight
        if w.dtype == torch.float32 or (torch.is_grad_enabled() and w.requires_grad) or w.is_inference():
            return w.float()  # (an inference tensor has no version counter to key the copy on)
        cached = self.__dict__.get("_w32")
        if torch.compiler.is_compiling():  # tracing (the decode step, after eager warm-up): no pointer checks
            return w.float() if cached is None else cached[1]
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if cached is None or cached[0] != key:
            cached = self.__dict__["_w32"] = (key, w.detach().float())
        return cached[1]

    def _scaled(self, w_TK: torch.Tensor) -> torch.Tensor:
        return w_TK if self.scale == 1.0 else w_TK * self.scale  # decode runs this per layer and step

    @abstractmethod
    def select(self, logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (weights_TK, ids_TK, probs_TE for the balance loss; None: the softmax of the logits)."""
        ...  # each router kind chooses differently

    def forward(self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None = None,
                top_k: int | None = None) -> RouterOutput:
        """Route T tokens. `top_k` lowers the number of experts per token (inference dial)."""
        k = self.top_k if top_k is None else int(top_k)
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"top_k override must be in [1, {self.num_experts}], got {k}")
        logits_TE = self.logits(x_TD)
        weights_TK, ids_TK, probs_TE = self.select(logits_TE, k)
        valid_T = None if token_mask_T is None else token_mask_T.reshape(-1).bool()
        if valid_T is not None:  # padding routes nowhere: it never counts toward load or capacity
            ids_TK = torch.where(valid_T[:, None], ids_TK, -1)
        n_dropped = 0
        if self.capacity_factor is not None:
            n_real = x_TD.shape[0] if valid_T is None else int(valid_T.sum())
            ids_TK, n_dropped = drop_over_capacity(ids_TK, self.num_experts,
                                                   capacity(self.capacity_factor, n_real, k, self.num_experts))
        if self.capacity_factor is not None:
            weights_TK = weights_TK * (ids_TK >= 0)
        elif valid_T is not None:  # the same zeros, one op (decode steps run this per layer)
            weights_TK = torch.where(valid_T[:, None], weights_TK, 0.0)
        return RouterOutput(weights_TK.to(x_TD.dtype), ids_TK, logits_TE, probs_TE, valid_T, n_dropped)


def drop_over_capacity(ids_TK: torch.Tensor, num_experts: int, cap: int) -> tuple[torch.Tensor, int]:
    """Keep at most `cap` pairs per expert, first come first served in (token, slot) order; -1 the rest."""
    flat = ids_TK.reshape(-1)
    valid = flat >= 0
    onehot_NE = F.one_hot(flat.clamp(min=0), num_experts) * valid[:, None]
    rank_N = ((onehot_NE.cumsum(0) - 1) * onehot_NE).sum(-1)  # position of each pair in its expert's queue
    keep = valid & (rank_N < cap)
    n_dropped = int((valid & ~keep).sum())
    return torch.where(keep, flat, torch.full_like(flat, -1)).view_as(ids_TK), n_dropped


class SoftmaxTopK(Router):
    """softmax over experts, top-k, optional renormalisation (Mixtral: yes; Qwen2-MoE: no).

    Renormalised and not training: the softmax of the top-k logits, which equals the renormalised top-k
    of the softmax (softmax keeps the order; the shared normaliser cancels) within fp32 round-off, in
    2 ops instead of 4 (the balance loss's probabilities are computed only if asked for)."""

    def select(self, logits_TE, k):
        if self.normalize and not self.training:
            top, ids = logits_TE.topk(k, dim=-1)
            return self._scaled(top.softmax(-1)), ids, None
        probs = logits_TE.softmax(-1)
        w, ids = probs.topk(k, dim=-1)
        if self.normalize:
            w = w / w.sum(-1, keepdim=True)
        return self._scaled(w), ids, probs


class SwitchTop1(Router):
    """Switch Transformer: top-1 of the softmax, weight = its probability (never renormalised);
    capacity drops overflow."""

    def select(self, logits_TE, k):
        probs = logits_TE.softmax(-1)
        w, ids = probs.topk(k, dim=-1)
        return self._scaled(w), ids, probs


class SigmoidTopK(Router):
    """DeepSeek-V3: sigmoid scores; selection on scores + correction bias, restricted to the
    `topk_group` best of `n_group` groups (ranked by the sum of their two best biased scores);
    weights are the unbiased scores, normalised, times routed_scaling_factor."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.register_buffer("correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def select(self, logits_TE, k):
        scores = logits_TE.sigmoid()
        choice = scores + self.correction_bias.float()
        if self.n_group > 1:
            choice = _limit_groups(choice, self.n_group, self.topk_group)
        ids = choice.topk(k, dim=-1).indices
        w = scores.gather(1, ids)
        if self.normalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        probs = scores / scores.sum(-1, keepdim=True)
        return self._scaled(w), ids, probs


def _limit_groups(choice_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Mask (to -inf) the experts outside each token's `topk_group` best groups."""
    t, e = choice_TE.shape
    grouped = choice_TE.view(t, n_group, e // n_group)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, Gr]
    keep_groups = group_score.topk(topk_group, dim=-1).indices
    keep = torch.zeros(t, n_group, dtype=torch.bool, device=choice_TE.device)
    keep.scatter_(1, keep_groups, True)
    keep_TE = keep[:, :, None].expand_as(grouped).reshape(t, e)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


ROUTER_CLASSES: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopK, "sigmoid_topk": SigmoidTopK, "switch": SwitchTop1,
}


def build_router(cfg: ModelConfig) -> Router:
    """The router named by cfg.router."""
    return ROUTER_CLASSES[cfg.router](cfg)
