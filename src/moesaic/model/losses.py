"""Router losses and loss-free balancing: pure functions of router statistics.

Shape legend: E experts. All take sums over real tokens (see RouterOutput), so statistics
added up across micro-batches give the same value as one big batch.
"""

from __future__ import annotations

import torch


def load_balance_loss(counts_E: torch.Tensor, prob_sum_E: torch.Tensor, n_tokens: int, top_k: int
                      ) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i.

    f_i = fraction of routed (token, slot) pairs sent to expert i (counts / (T*K), no gradient);
    P_i = mean router probability of expert i (prob_sum / T). Equals 1.0 when perfectly balanced.
    """
    if n_tokens == 0:
        return prob_sum_E.sum() * 0.0
    e = counts_E.numel()
    f = counts_E.detach().float() / (n_tokens * top_k)
    p = prob_sum_E.float() / n_tokens
    return e * (f * p).sum()


def z_loss(z_sum: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return z_sum / max(n_tokens, 1)


def router_loss(outputs, aux_coef: float, z_coef: float) -> torch.Tensor:
    """Weighted sum over MoE layers of the balance loss and z-loss (0 when both coefficients are 0)."""
    total = None
    for o in outputs:
        term = 0.0
        if aux_coef > 0:
            term = term + aux_coef * load_balance_loss(o.counts_E, o.prob_sum_E, o.n_tokens, o.top_k)
        if z_coef > 0:
            term = term + z_coef * z_loss(o.z_sum, o.n_tokens)
        if isinstance(term, torch.Tensor):
            total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


@torch.no_grad()
def update_correction_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float,
                           keep: torch.Tensor | None = None) -> torch.Tensor:
    """Loss-free balancing (Wang et al. 2024, DeepSeek-V3): bias_i += rate * sign(mean load - load_i).

    Updates `bias_E` in place (no gradient) and returns it. `keep` (a 0-d tensor, 1 or 0) scales the step on
    the device, so a captured step can skip it without a host sync.
    """
    load = counts_E.float()
    step = rate * torch.sign(load.mean() - load)
    bias_E += (step if keep is None else step * keep).to(bias_E.dtype)
    return bias_E
