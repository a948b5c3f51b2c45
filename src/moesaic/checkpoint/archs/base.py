"""Building blocks of the per-architecture key maps.

A key map is a list of entries, each naming one moesaic tensor (a `Transformer.state_dict()` name) and
the Hugging Face tensor(s) it comes from:

  Copy(ours, key)               the same tensor
  Cat(ours, keys)               ours = cat(keys, dim 0): a dense SwiGLU's w13 = [gate_proj; up_proj]
  Experts(ours, per_expert, fused, n)
                                stacked experts: w13[e] = [gate_e; up_e] from per-expert keys (two formats
                                with `{e}`), or the transformers-5 fused `experts.gate_up_proj` [E, 2F, D];
                                w2[e] = down_e, or the fused `experts.down_proj` [E, D, F]

The same entries drive loading (HF -> moesaic) and export (moesaic -> HF, per-expert names).
Shape legend: E experts, F expert hidden, D model dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from moesaic.config import ModelConfig


@dataclass(frozen=True)
class Copy:
    ours: str
    key: str


@dataclass(frozen=True)
class Cat:
    ours: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Experts:
    ours: str
    per_expert: tuple[str, ...]  # formats with {e}: (gate, up) for w13, (down,) for w2
    fused: str
    n: int


Entry = Copy | Cat | Experts


class ArchError(ValueError):
    """A checkpoint that does not match its architecture (names the tensor and the architecture)."""


# ------------------------------------------------------------------ reading config.json
class HFConfig:
    """config.json values with the architecture's transformers defaults for absent keys."""

    def __init__(self, d: dict[str, Any], defaults: dict[str, Any], arch: str) -> None:
        self.d, self.defaults, self.arch = d, defaults, arch

    def get(self, key: str, default: Any = None) -> Any:
        v = self.d.get(key)
        if v is None:
            v = self.defaults.get(key, default)
        return v

    def require(self, key: str) -> Any:
        v = self.get(key)
        if v is None:
            raise self.fail(f"config.json lacks {key!r}")
        return v

    def first(self, *keys: str, default: Any = None) -> Any:
        for k in keys:
            if self.d.get(k) is not None:
                return self.d[k]
        for k in keys:
            if self.defaults.get(k) is not None:
                return self.defaults[k]
        return default

    def fail(self, what: str) -> ArchError:
        return ArchError(f"{self.arch}: {what}")


SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")


def rope_from_hf(h: HFConfig, max_pos: int, partial_rotary: bool = False) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`.

    `partial_rotary`: the architecture rotates only the first `partial_rotary_factor` of each head (kept in
    rope_scaling, as transformers keeps it in rope_parameters); elsewhere a factor < 1 is refused."""
    params = dict(h.d.get("rope_parameters") or h.d.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise h.fail("per-layer-type RoPE parameters are not supported")
    theta = float(params.get("rope_theta") or h.get("rope_theta") or
                  (h.defaults.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", h.get("partial_rotary_factor"))  # GLM defaults to 0.5
    partial = {} if partial in (None, 1, 1.0) else {"partial_rotary_factor": float(partial)}
    if partial and not partial_rotary:
        raise h.fail(f"partial_rotary_factor={partial['partial_rotary_factor']} is not supported (this "
                     "architecture's transformers implementation rotates the whole head)")
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return theta, ({"rope_type": "default", **partial} if partial else None)
    if kind not in SUPPORTED_ROPE:
        raise h.fail(f"rope type {kind!r} is not supported; supported: {SUPPORTED_ROPE}")
    drop = ("rope_theta", "type", "partial_rotary_factor")
    scaling = {k: v for k, v in params.items() if k not in drop and v is not None} | partial
    scaling["rope_type"] = kind
    if kind in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings",
                           h.d.get("original_max_position_embeddings") or max_pos)
    if kind == "yarn" and scaling.get("truncate", True) is False:
        raise h.fail("YaRN with truncate=false is not supported (moesaic rounds the correction range)")
    if kind == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_pos / scaling["original_max_position_embeddings"]
    return theta, scaling


def partial_rotary_factor(cfg: ModelConfig) -> float:
    return float((cfg.rope_scaling or {}).get("partial_rotary_factor") or 1.0)


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling:
        params.update({k: v for k, v in cfg.rope_scaling.items() if k != "type"})
        params["rope_type"] = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type", "default"))
    return params


def trunk_fields(h: HFConfig, partial_rotary: bool = False) -> dict[str, Any]:
    """ModelConfig fields every decoder shares (vocab, widths, heads, norms, RoPE, tying)."""
    act = h.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise h.fail(f"hidden_act={act!r} is not supported (moesaic FFNs are SwiGLU: silu)")
    if h.get("mlp_bias", False):
        raise h.fail("mlp_bias=True is not supported (moesaic FFNs have no biases)")
    n_heads = int(h.require("num_attention_heads"))
    max_pos = int(h.get("max_position_embeddings", 4096))
    window = h.get("sliding_window") if h.get("use_sliding_window", True) else None
    if isinstance(window, int) and 0 < window < max_pos:
        # Sliding-window attention equals full attention up to the window: cap the usable length there.
        max_pos = window
    theta, scaling = rope_from_hf(h, int(h.get("max_position_embeddings", 4096)), partial_rotary)
    return dict(
        vocab_size=int(h.require("vocab_size")), d_model=int(h.require("hidden_size")),
        n_layers=int(h.require("num_hidden_layers")), n_heads=n_heads,
        n_kv_heads=int(h.get("num_key_value_heads") or n_heads),
        head_dim=h.d.get("head_dim") or int(h.require("hidden_size")) // n_heads,
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(h.get("rms_norm_eps", 1e-6)),
        max_seq_len=max_pos, tie_embeddings=bool(h.get("tie_word_embeddings", False)),
    )


def trunk_to_hf(cfg: ModelConfig, arch: str, model_type: str) -> dict[str, Any]:
    return {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_to_hf(cfg), "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }


# ------------------------------------------------------------------ common entries
def trunk_entries(cfg: ModelConfig) -> list[Entry]:
    out: list[Entry] = [Copy("embed.weight", "model.embed_tokens.weight"), Copy("norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        out.append(Copy("lm_head.weight", "lm_head.weight"))
    return out


def norm_entries(i: int) -> list[Entry]:
    p = f"model.layers.{i}"
    return [Copy(f"blocks.{i}.attn_norm.weight", f"{p}.input_layernorm.weight"),
            Copy(f"blocks.{i}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight")]


def gqa_entries(cfg: ModelConfig, i: int) -> list[Entry]:
    """q/k/v/o projections (+ biases, + q/k norms) of a llama-style `self_attn`."""
    p, o = f"model.layers.{i}.self_attn", f"blocks.{i}.attn"
    out: list[Entry] = [Copy(f"{o}.{w}.weight", f"{p}.{h}_proj.weight")
                        for w, h in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o"))]
    if cfg.qkv_bias:
        out += [Copy(f"{o}.{w}.bias", f"{p}.{h}_proj.bias") for w, h in (("wq", "q"), ("wk", "k"), ("wv", "v"))]
    if cfg.qk_norm != "none":
        out += [Copy(f"{o}.q_norm.weight", f"{p}.q_norm.weight"), Copy(f"{o}.k_norm.weight", f"{p}.k_norm.weight")]
    return out


def swiglu_entries(ours: str, hf: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
                   ) -> list[Entry]:
    """A dense SwiGLU `hf` (gate/up/down Linear) -> our `ours` (w13 Linear, w2 Linear)."""
    g, u, d = names
    return [Cat(f"{ours}.w13.weight", (f"{hf}.{g}.weight", f"{hf}.{u}.weight")),
            Copy(f"{ours}.w2.weight", f"{hf}.{d}.weight")]


def expert_entries(ours: str, hf: str, n: int, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
                   ) -> list[Entry]:
    """Routed experts `hf.experts.{e}.{gate,up,down}` (or fused) -> our stacked `ours.experts.w13/w2`."""
    g, u, d = names
    return [Experts(f"{ours}.experts.w13", (f"{hf}.experts.{{e}}.{g}.weight", f"{hf}.experts.{{e}}.{u}.weight"),
                    f"{hf}.experts.gate_up_proj", n),
            Experts(f"{ours}.experts.w2", (f"{hf}.experts.{{e}}.{d}.weight",), f"{hf}.experts.down_proj", n)]


def has_prefix(names: set[str] | None, prefix: str) -> bool:
    return names is not None and any(k.startswith(prefix) for k in names)


# ------------------------------------------------------------------ export helpers
def split_for_export(entry: Entry, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensor -> the HF (name, tensor) pairs it came from (per-expert names for experts)."""
    if isinstance(entry, Copy):
        yield entry.key, t
    elif isinstance(entry, Cat):
        for k, part in zip(entry.keys, t.chunk(len(entry.keys), dim=0), strict=True):
            yield k, part
    else:
        k = len(entry.per_expert)
        for e in range(entry.n):
            for f, part in zip(entry.per_expert, t[e].chunk(k, dim=0), strict=True):
                yield f.format(e=e), part


class Arch(ABC):
    """One Hugging Face architecture: config.json <-> ModelConfig, and the key map.

    Subclasses set `name` (the `architectures` entry), `model_type`, `defaults` (transformers' config
    defaults for keys a config.json may omit) and implement the methods below.
    """

    name: str = ""
    model_type: str = ""
    defaults: dict[str, Any] = {}

    def hf(self, d: dict[str, Any]) -> HFConfig:
        return HFConfig(d, self.defaults, self.name)

    @abstractmethod
    def to_config(self, d: dict[str, Any]) -> ModelConfig:
        ...  # per architecture

    @abstractmethod
    def entries(self, cfg: ModelConfig, names: set[str] | None = None) -> list[Entry]:
        """The key map; `names` (the checkpoint's tensor names, None on export) picks aliases."""
        ...  # per architecture

    def ignored(self, key: str, cfg: ModelConfig) -> bool:
        """Checkpoint tensors that are not weights of the model (skipped, not errors)."""
        if key.endswith("rotary_emb.inv_freq"):
            return True
        return cfg.tie_embeddings and key == "lm_head.weight"

    @abstractmethod
    def export_blocker(self, cfg: ModelConfig) -> str | None:
        """Why this architecture cannot express cfg (None when it can)."""
        ...  # per architecture

    @abstractmethod
    def to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        ...  # per architecture

    def keep_fp32(self, key: str) -> bool:
        """HF tensors the architecture keeps in fp32 whatever the model dtype (written fp32 on export)."""
        return False

    def export_adjust(self, cfg: ModelConfig, key: str, t: torch.Tensor) -> torch.Tensor:
        """An exact rewrite of one exported tensor where the HF layout needs it (default: none)."""
        return t

    def export_extra(self, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
        """HF tensors with no moesaic counterpart, written on export (default: none)."""
        return []


def no_o_bias(h: HFConfig) -> None:
    if h.get("attention_bias", False):
        raise h.fail("attention_bias=True (a bias on o_proj too) is not supported; moesaic attention has "
                     "q/k/v biases only (qkv_bias)")


def gqa_blockers(cfg: ModelConfig, qkv_bias: bool, qk_norm: str, partial_rotary: bool = False) -> list[str]:
    out = []
    if partial_rotary_factor(cfg) != 1.0 and not partial_rotary:
        out.append(f"partial_rotary_factor={partial_rotary_factor(cfg)} (rotates the whole head)")
    if cfg.attention != "gqa":
        out.append(f"attention={cfg.attention!r} (needs 'gqa')")
    if cfg.qkv_bias != qkv_bias:
        out.append(f"qkv_bias={cfg.qkv_bias} (needs {qkv_bias})")
    if cfg.qk_norm != qk_norm:
        out.append(f"qk_norm={cfg.qk_norm!r} (needs {qk_norm!r})")
    if cfg.clip_qkv is not None and qk_norm != "full":
        out.append(f"clip_qkv={cfg.clip_qkv} (not expressible)")
    return out
