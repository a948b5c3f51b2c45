"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE initialised from a trained dense model.

Every dense FFN becomes E experts that start as copies of it (optionally with small Gaussian noise,
relative to each weight's std, to break the symmetry); attention, norms, embeddings and head are
copied as they are; the router is fresh. With identical copies and combine weights that sum to 1
(softmax top-k, renormalised), the MoE computes exactly the dense model's function at step 0.
"""

from __future__ import annotations

import torch

from moesaic.config import ModelConfig


def upcycled_config(dense: ModelConfig, num_experts: int, top_k: int = 2, **overrides) -> ModelConfig:
    """The MoE config of an upcycled dense model: same trunk, every layer MoE, experts of the dense FFN's size."""
    if dense.is_moe:
        raise ValueError("--init-from must name a dense run (num_experts == 0); this one is already an MoE")
    if num_experts < 2:
        raise ValueError(f"--num-experts must be >= 2 to upcycle, got {num_experts}")
    fields = dict(num_experts=num_experts, top_k=top_k, expert_ffn=dense.ffn, num_shared_experts=0,
                  router="softmax_topk", normalize_topk=True, routed_scaling_factor=1.0, first_dense_layers=0,
                  moe_every=1, mlp_only_layers=[], capacity_factor=None)
    fields.update(overrides)
    return dense.replace(**fields)


@torch.no_grad()
def upcycle(dense_model, moe_cfg: ModelConfig, noise: float = 0.0, seed: int = 0):
    """A new MoE `Transformer` whose experts copy dense_model's FFNs (see the module docstring)."""
    from moesaic.model import build_model

    if noise < 0:
        raise ValueError(f"--upcycle-noise must be >= 0, got {noise}")
    dcfg = dense_model.config
    for name in ("d_model", "n_layers", "vocab_size", "n_heads"):
        if getattr(dcfg, name) != getattr(moe_cfg, name):
            raise ValueError(f"upcycling needs the same {name}: dense has {getattr(dcfg, name)}, "
                             f"MoE config has {getattr(moe_cfg, name)}")
    torch.manual_seed(seed)
    moe = build_model(moe_cfg)  # fresh routers come from here
    dense_sd = dense_model.state_dict()
    moe_sd = moe.state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    for key, t in moe_sd.items():
        if ".ffn.router." in key:
            continue
        if ".ffn.experts." in key:
            src = dense_sd[key.replace(".experts.w13", ".w13.weight").replace(".experts.w2", ".w2.weight")]
            if moe_cfg.expert_ffn != src.shape[-1 if key.endswith("w2") else 0] // (1 if key.endswith("w2") else 2):
                raise ValueError(f"upcycling needs expert_ffn == dense ffn ({dcfg.ffn}), got {moe_cfg.expert_ffn}")
            copies = src.detach().to(t.dtype).cpu()[None].expand_as(t).clone()
            if noise > 0:
                copies += noise * src.float().std() * torch.randn(copies.shape, generator=gen).to(t.dtype)
            t.copy_(copies)
        elif key in dense_sd:
            t.copy_(dense_sd[key])
        else:
            raise ValueError(f"upcycling: the dense model has no weight for {key}")
    return moe
