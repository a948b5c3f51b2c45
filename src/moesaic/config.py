"""Typed model configuration: `ModelConfig`, named presets and dense twins.

Every field is validated in `__post_init__`; a bad value raises a `ValueError`
that names the field and the allowed values. Derived fields (head_dim,
shared_ffn) are filled in there too, so a config read back from JSON equals the
one that was written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

RouterKind = Literal["softmax_topk", "sigmoid_topk", "switch"]
ROUTERS: tuple[str, ...] = ("softmax_topk", "sigmoid_topk", "switch")
ATTENTIONS: tuple[str, ...] = ("gqa", "mla")
QK_NORMS: tuple[str, ...] = ("none", "head", "full")


def dataclass_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """cls(**d), refusing unknown keys with a message that lists the known fields."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**d)


def _check(cond: bool, name: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"ModelConfig.{name} must be {allowed}, got {value!r}")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only (MoE) language model.

    A model with `num_experts == 0` is dense: every layer uses an FFN of size `ffn`.
    Otherwise layer i is an MoE layer when `is_moe_layer(i)`; the others are dense.
    """

    # --- trunk
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None  # None -> n_heads (plain multi-head attention)
    head_dim: int | None = None  # None -> d_model // n_heads
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF-style dict (llama3, yarn, linear, ...)
    norm_eps: float = 1e-5
    max_seq_len: int = 1024
    tie_embeddings: bool = False
    ffn: int = 1024  # hidden size of dense FFN layers
    # --- attention variants (needed by real checkpoints)
    attention: str = "gqa"  # "gqa" | "mla" (DeepSeek multi-head latent attention)
    qkv_bias: bool = False  # Qwen2-style biases on q/k/v projections
    qk_norm: str = "none"  # "none" | "head" (Qwen3: RMSNorm per head) | "full" (OLMoE: over all heads)
    clip_qkv: float | None = None  # OLMoE: clamp q/k/v projections to [-clip, clip]
    q_lora_rank: int | None = None  # MLA only; None -> full-rank q projection
    kv_lora_rank: int = 0  # MLA only
    qk_nope_head_dim: int = 0  # MLA only
    qk_rope_head_dim: int = 0  # MLA only
    v_head_dim: int = 0  # MLA only
    rope_interleave: bool = False  # MLA only: rotate interleaved pairs (DeepSeek layout)
    # --- mixture of experts
    num_experts: int = 0
    top_k: int = 2
    expert_ffn: int = 512
    num_shared_experts: int = 0
    shared_ffn: int | None = None  # None -> expert_ffn * num_shared_experts
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(D, 1)) scales the shared output
    first_dense_layers: int = 0
    moe_every: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)  # forced dense (Qwen2-MoE)
    router: str = "softmax_topk"
    normalize_topk: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    capacity_factor: float | None = None  # None -> dropless
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0  # loss-free balancing (sigmoid_topk); 0 disables
    router_jitter: float = 0.0  # multiplicative input noise while training (Switch)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.d_model // self.n_heads
        if self.shared_ffn is None:
            self.shared_ffn = self.expert_ffn * self.num_shared_experts
        self.mlp_only_layers = sorted(int(i) for i in self.mlp_only_layers)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ffn", "moe_every"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, name, "an integer >= 1", v)
        _check(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
               f"a divisor of n_heads={self.n_heads}", self.n_kv_heads)
        _check(self.head_dim is not None and self.head_dim >= 1 and self.head_dim % 2 == 0,
               "head_dim", "an even integer >= 2 (RoPE rotates pairs)", self.head_dim)
        _check(self.rope_theta > 0, "rope_theta", "> 0", self.rope_theta)
        _check(0 < self.norm_eps < 1, "norm_eps", "in (0, 1)", self.norm_eps)
        _check(self.attention in ATTENTIONS, "attention", f"one of {ATTENTIONS}", self.attention)
        _check(self.qk_norm in QK_NORMS, "qk_norm", f"one of {QK_NORMS}", self.qk_norm)
        _check(self.clip_qkv is None or self.clip_qkv > 0, "clip_qkv", "None or > 0", self.clip_qkv)
        partial = float((self.rope_scaling or {}).get("partial_rotary_factor") or 1.0)
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _check(getattr(self, name) >= 1, name, "an integer >= 1 when attention='mla'",
                       getattr(self, name))
            _check(partial == 1.0, "rope_scaling", "without partial_rotary_factor when attention='mla' (MLA "
                   "rotates its qk_rope_head_dim part only)", self.rope_scaling)
        else:
            rotary_dim(self.head_dim, self.rope_scaling)  # a factor giving an odd or empty rotary part fails here
        _check(self.num_experts >= 0, "num_experts", "an integer >= 0 (0 = dense model)", self.num_experts)
        if self.num_experts > 0:
            self._validate_moe()

    def _validate_moe(self) -> None:
        e = self.num_experts
        _check(self.router in ROUTERS, "router", f"one of {ROUTERS}", self.router)
        _check(1 <= self.top_k <= e, "top_k", f"in [1, num_experts={e}]", self.top_k)
        if self.router == "switch":
            _check(self.top_k == 1, "top_k", "1 for the switch router", self.top_k)
        _check(self.expert_ffn >= 1, "expert_ffn", "an integer >= 1", self.expert_ffn)
        _check(self.num_shared_experts >= 0, "num_shared_experts", ">= 0", self.num_shared_experts)
        _check(self.shared_ffn >= 0 and (self.num_shared_experts == 0 or self.shared_ffn >= 1),
               "shared_ffn", ">= 1 when there are shared experts", self.shared_ffn)
        _check(0 <= self.first_dense_layers <= self.n_layers, "first_dense_layers",
               f"in [0, n_layers={self.n_layers}]", self.first_dense_layers)
        _check(all(0 <= i < self.n_layers for i in self.mlp_only_layers), "mlp_only_layers",
               f"layer indices in [0, {self.n_layers})", self.mlp_only_layers)
        _check(self.n_group >= 1 and e % self.n_group == 0, "n_group",
               f"a divisor of num_experts={e}", self.n_group)
        _check(1 <= self.topk_group <= self.n_group, "topk_group", f"in [1, n_group={self.n_group}]",
               self.topk_group)
        if self.n_group > 1:
            _check(self.router == "sigmoid_topk", "n_group", "1 unless router='sigmoid_topk'", self.n_group)
            per_group = e // self.n_group
            _check(self.top_k <= self.topk_group * per_group, "top_k",
                   f"<= topk_group * experts per group = {self.topk_group * per_group}", self.top_k)
            _check(per_group >= 2, "n_group", "small enough that each group has >= 2 experts", self.n_group)
        _check(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
               "None (dropless) or > 0", self.capacity_factor)
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "router_jitter"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        _check(self.routed_scaling_factor > 0, "routed_scaling_factor", "> 0", self.routed_scaling_factor)

    # --------------------------------------------------------------- structure
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        """Layer i is MoE when past the first dense layers, on the moe_every stride, not forced dense."""
        if not self.is_moe or i < self.first_dense_layers or i in self.mlp_only_layers:
            return False
        return (i - self.first_dense_layers) % self.moe_every == self.moe_every - 1

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    # ------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, d)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ModelConfig:
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (derived fields recomputed unless given)."""
        d = self.to_dict()
        if "n_heads" in changes or "d_model" in changes:
            d.setdefault("head_dim", None)
            if "head_dim" not in changes:
                d["head_dim"] = None
        if ("expert_ffn" in changes or "num_shared_experts" in changes) and "shared_ffn" not in changes:
            d["shared_ffn"] = None
        d.update(changes)
        return ModelConfig.from_dict(d)

    # ---------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
        d = dict(PRESETS[name])
        d.update(overrides)
        return cls.from_dict(d)

    # ------------------------------------------------------------- dense twin
    def ffn_params_per_layer(self, i: int, active: bool) -> int:
        """FFN (+ router, shared experts) parameters of layer i; routed experts counted top_k or all."""
        d = self.d_model
        if not self.is_moe_layer(i):
            return 3 * d * self.ffn
        n = self.top_k if active else self.num_experts
        p = n * 3 * d * self.expert_ffn + d * self.num_experts  # experts + router
        p += 3 * d * self.shared_ffn + (d if self.shared_expert_gate else 0)
        return p

    def dense_twin(self, match: str = "active") -> ModelConfig:
        """A dense config with the same trunk and the same active (or total) FFN parameters.

        The dense FFN size is chosen so that the sum over layers of dense FFN parameters
        equals the sum of this model's active (match="active") or total (match="total")
        FFN parameters, rounded to a multiple of 8.
        """
        if match not in ("active", "total"):
            raise ValueError(f"dense_twin(match=...) must be 'active' or 'total', got {match!r}")
        target = sum(self.ffn_params_per_layer(i, match == "active") for i in range(self.n_layers))
        ffn = max(8, int(round(target / (self.n_layers * 3 * self.d_model) / 8)) * 8)
        return self.replace(num_experts=0, ffn=ffn, num_shared_experts=0, shared_expert_gate=False,
                            first_dense_layers=0, mlp_only_layers=[])


PRESETS: dict[str, dict[str, Any]] = {
    # Seconds-fast model for tests: 8 experts top-2, two layers.
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                 ffn=128, num_experts=8, top_k=2, expert_ffn=64),
    # CPU training, and the default recipe (docs/training.md): 16 fine-grained experts top-2 plus one shared
    # expert; sigmoid router with loss-free balancing (bias rate 1e-2) plus the default aux loss 0.01, x2.5.
    "small": dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=256,
                  ffn=1024, num_experts=16, top_k=2, expert_ffn=256, num_shared_experts=1,
                  router="sigmoid_topk", bias_update_rate=1e-2, routed_scaling_factor=2.5),
    # Coarse Mixtral-style shape that fits a CPU for decode benchmarks.
    "mixtral-mini": dict(vocab_size=8192, d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=1024,
                         ffn=2048, num_experts=8, top_k=2, expert_ffn=1024),
    # Fine-grained Qwen3-MoE-style shape: 64 experts top-8.
    "finegrained-mini": dict(vocab_size=8192, d_model=512, n_layers=4, n_heads=8, n_kv_heads=4,
                             max_seq_len=1024, ffn=2048, num_experts=64, top_k=8, expert_ffn=256),
    # DeepSeek-V3-style routing: sigmoid + correction bias, group-limited, shared expert, first dense layer.
    "deepseek-mini": dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8, max_seq_len=256,
                          ffn=1024, num_experts=32, top_k=4, expert_ffn=128, num_shared_experts=1,
                          first_dense_layers=1, router="sigmoid_topk", n_group=4, topk_group=2,
                          routed_scaling_factor=2.5, aux_loss_coef=0.0, bias_update_rate=1e-3),
    # Switch Transformer: top-1 with capacity.
    "switch-mini": dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, max_seq_len=256, ffn=1024,
                        num_experts=8, top_k=1, expert_ffn=1024, router="switch", capacity_factor=1.25,
                        normalize_topk=False, router_jitter=0.01),
}


def rotary_dim(head_dim: int, scaling: dict[str, Any] | None) -> int:
    """Dims of a head that RoPE rotates: head_dim x `partial_rotary_factor` of the HF-style dict (default 1)."""
    factor = float((scaling or {}).get("partial_rotary_factor") or 1.0)
    r = int(head_dim * factor)
    if not 0 < factor <= 1 or r < 2 or r % 2:
        raise ValueError(f"rope_scaling partial_rotary_factor={factor} gives {r} rotary dims of head_dim={head_dim}; "
                         "needs a factor in (0, 1] giving an even number >= 2")
    return r


def capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Per-expert capacity: ceil(capacity_factor * T * K / E) (K = 1 for Switch)."""
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))
