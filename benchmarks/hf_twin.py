"""transformers' twin of a moesaic Mixtral-style model, on the very same tensors, and its generate timing.

Used by decode_gpu.py. The twin is `MixtralForCausalLM` built on the meta device and given moesaic's
tensors under moesaic's export key map (transformers 5 names: fused `gate_up_proj` / `down_proj`
experts), so it costs no memory; its rotary tables are rebuilt on the device.
"""

from __future__ import annotations

import statistics
import time

import torch


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def hf_twin(model):
    """transformers' MixtralForCausalLM holding the very same tensors (meta init, then assign)."""
    import transformers

    from moesaic.checkpoint.archs import for_export
    from moesaic.checkpoint.archs.base import Cat, Copy, Experts
    from moesaic.checkpoint.export import hf_config_dict

    cfg = model.config
    arch = for_export(cfg, "MixtralForCausalLM")
    d = hf_config_dict(model, arch, model.embed.weight.dtype)
    hcfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    state = model.state_dict()
    sd: dict[str, torch.Tensor] = {}
    for e in arch.entries(cfg, {"model.layers.0.mlp.gate.weight"}):  # names of transformers 5 (fused experts)
        if isinstance(e, Copy):
            sd[e.key] = state[e.ours]
        elif isinstance(e, Cat):
            sd.update(zip(e.keys, state[e.ours].chunk(len(e.keys), 0), strict=True))
        elif isinstance(e, Experts):
            sd[e.fused] = state[e.ours]
    with torch.device("meta"):
        hf = transformers.MixtralForCausalLM(hcfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"transformers Mixtral names differ: missing {missing[:4]}, unexpected {unexpected[:4]}")
    dev = model.embed.weight.device
    for name, mod in hf.named_modules():  # rotary tables: non-persistent buffers, rebuilt on the device
        if name.endswith("rotary_emb"):
            parent = hf.get_submodule(name.rsplit(".", 1)[0]) if "." in name else hf
            with torch.device(dev):
                setattr(parent, name.rsplit(".", 1)[-1], type(mod)(config=hcfg))
    meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"transformers twin left on the meta device: {meta[:4]}")
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation("sdpa")  # what from_pretrained picks on a GPU
    return hf.eval()


def set_impl(hf, impl: str) -> None:
    if hasattr(hf, "set_experts_implementation"):
        hf.set_experts_implementation(impl)
    else:
        hf.config._experts_implementation = impl


@torch.inference_mode()
def parity(model, hf, vocab: int, dev: str) -> float:
    ids = torch.randint(0, vocab, (1, 16), device=dev, generator=torch.Generator(dev).manual_seed(5))
    ours = model(ids).float()
    theirs = hf(ids).logits.float()
    return float((ours - theirs).abs().max() / ours.abs().max())


def run_hf(hf, ids: torch.Tensor, new_tokens: int) -> float:
    """Median seconds per decode step of transformers' greedy generate from prompts ids [B, P]: the time
    between consecutive logits (a logits processor synchronizes and stamps the clock), after a warm-up."""
    from transformers import LogitsProcessor, LogitsProcessorList

    dev = ids.device.type

    class Stamp(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            sync(dev)
            self.times.append(time.perf_counter())
            return scores

    gaps: list[float] = []
    for new in (4, new_tokens):  # warm-up, then timed
        stamp = Stamp()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new + 1, min_new_tokens=new + 1,
                        do_sample=False, pad_token_id=0, eos_token_id=None,
                        logits_processor=LogitsProcessorList([stamp]))
        gaps = [b - a for a, b in zip(stamp.times, stamp.times[1:])]
    return statistics.median(gaps[2:] if len(gaps) > 4 else gaps)


