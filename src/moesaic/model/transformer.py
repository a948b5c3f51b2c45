"""The decoder: embed -> [Block] x L -> norm -> LM head.

Shape legend: B batch, T positions, D model dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moesaic.config import ModelConfig
from moesaic.model.block import Block
from moesaic.model.norm import RMSNorm
from moesaic.model.router import RouterOutput


@dataclass
class ModelOutput:
    """logits [B, T, V] and one RouterOutput per MoE layer (in layer order)."""

    logits: torch.Tensor
    router_outputs: list[RouterOutput] = field(default_factory=list)


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts. `total`/`active` exclude the embedding and LM head, which are reported apart;
    `active` is what one token touches: attention, norms, dense FFNs, and in each MoE layer the router,
    the shared experts and top_k routed experts."""

    total: int
    active: int
    embedding: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def total_with_embeddings(self) -> int:
        return self.total + self.embedding + self.lm_head

    @property
    def active_with_embeddings(self) -> int:
        return self.active + self.embedding + self.lm_head


class Transformer(nn.Module):
    """Decoder-only LM. `model(input_ids)` -> logits; `model.forward_aux(...)` also returns router outputs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        for blk in self.blocks:  # scale residual output projections (GPT-2)
            if hasattr(blk.attn, "wo"):
                nn.init.normal_(blk.attn.wo.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                top_k: int | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]."""
        return self.forward_aux(input_ids, positions, cache, top_k=top_k).logits

    def forward_aux(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                    token_mask: torch.Tensor | None = None, top_k: int | None = None,
                    last_only: bool = False, logits_index: torch.Tensor | None = None) -> ModelOutput:
        """Full forward returning logits and router outputs.

        positions [B, T]: absolute positions (default: from the cache, else 0..T-1);
        token_mask [B, T]: True for real tokens (router statistics ignore the rest);
        top_k: route each token to fewer experts than trained (inference dial);
        last_only: compute logits for the last position only ([B, 1, V]);
        logits_index [B]: compute logits only at position logits_index[b] of row b ([B, 1, V]; the
            engine's batched prefill of right-padded prompts).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if positions is None:
            positions = (cache.positions(t) if cache is not None
                         else torch.arange(t, device=input_ids.device)[None].expand(b, t))
        x = self.embed(input_ids)
        routers: list[RouterOutput] = []
        # every layer rotates with the same tables: compute them once per forward (in fp32, then cast
        # once to the activations' dtype, so no layer casts them again)
        rope = self.blocks[0].attn.rope(positions, x.dtype)
        for blk in self.blocks:
            x, r = blk(x, positions, cache, token_mask, top_k, rope=rope)
            if r is not None:
                routers.append(r)
        if cache is not None:
            cache.advance(t)
        if logits_index is not None:
            x = x[torch.arange(b, device=x.device), logits_index.to(x.device)][:, None]
        elif last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return ModelOutput(self.lm_head(x), routers)

    # ---------------------------------------------------------------- helpers
    def moe_layers(self) -> list[nn.Module]:
        return [blk.ffn for blk in self.blocks if blk.is_moe]

    def fuse_qkv(self) -> int:
        """One q/k/v projection matmul per attention layer (`Attention.fuse_qkv`: parameters become views
        of one tensor; names, values and state dict stay). Returns the number of layers fused."""
        return sum(bool(getattr(blk.attn, "fuse_qkv", lambda: False)()) for blk in self.blocks)

    def set_moe_backend(self, name: str) -> None:
        """Route every MoE layer through the named kernels backend."""
        from moesaic import kernels

        kernels.get_backend(name)  # validates the name
        for m in self.moe_layers():
            m.backend = name

    def count_params(self) -> ParamCount:
        """Total and active-per-token parameters (embedding and LM head apart)."""
        cfg = self.config
        emb = self.embed.weight.numel()
        head = 0 if cfg.tie_embeddings else self.lm_head.weight.numel()
        total = active = self.norm.weight.numel()
        for blk in self.blocks:
            n = sum(p.numel() for p in blk.parameters())
            total += n
            if blk.is_moe:
                k = blk.ffn.router.top_k
                per = blk.ffn.experts.params_per_expert
                active += n - (blk.ffn.experts.num_experts - k) * per
            else:
                active += n
        return ParamCount(total=total, active=active, embedding=emb, lm_head=head)


def build_model(config: ModelConfig) -> Transformer:
    """A randomly initialised model (seed with torch.manual_seed first for reproducibility)."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"build_model expects a ModelConfig, got {type(config).__name__}")
    return Transformer(config)
