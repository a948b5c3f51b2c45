"""The inference engine every front end uses: continuous batching over a preallocated KV cache.

Shape legend: B running rows of one forward, T new tokens, V vocabulary.

One `step()`:
 1. admit waiting requests into free KV slots (continuous batching: at step boundaries);
 2. prefill the newly admitted requests (right-padded prompts batched in one forward, up to a
    token budget) and sample each one's first token;
 3. decode one token for every other running request: one forward over all of them with T = 1
    (rows are grouped by experts_per_token, since a forward routes every row to the same k;
    with `deterministic=True` every row runs alone, so its arithmetic never depends on batch-mates,
    and the step runs under `kernels.deterministic()`, so no kernel sums in a timing-dependent order);
 4. finished requests leave the batch and free their slot.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from moesaic import kernels
from moesaic.inference.cache import SlotCache
from moesaic.inference.fast_step import FastStep
from moesaic.inference.graphs import make_decode_graphs
from moesaic.inference.request import Completion, Request
from moesaic.inference.sampler import SamplingParams, sample_row, token_logprobs
from moesaic.inference.scheduler import Scheduler
from moesaic.inference.serving import AsyncEngineMixin

Prompt = str | Sequence[int]


class Engine(AsyncEngineMixin):
    """Offline and streaming generation for a moesaic `Transformer`.

    Args:
        model: a moesaic Transformer (put in eval mode; weights are used as they are).
        tokenizer: a moesaic Tokenizer (None: prompts must be token ids and no text is produced).
        max_batch: KV slots, i.e. requests running at once (more wait in a queue).
        max_len: positions per slot (prompt + generated); default the model's max_seq_len.
        backend: MoE kernels backend for every MoE layer (None: keep what the layers have).
        dtype: cast the model to this dtype first (e.g. torch.bfloat16); None keeps it.
        quantize: "int8" replaces the expert weights by int8 + per-output-channel scales (weight-only),
            "w8a8" also quantizes the activations on the fly (see inference.quantize); None keeps them. quantize_linears: also attention, dense FFNs, LM head.
        onednn: on CPU, run float linears and experts through oneDNN (`inference.quantize.use_onednn`;
            MKL's fp32 matmuls read weights at about half the bandwidth here); the model is changed in place.
        pack_weights: with onednn, also keep oneDNN-blocked copies of the float expert and linear weights
            for batched steps (1.2-1.5x faster decode at batch 8-32 on this CPU) and bf16 one-row steps
            (1.4-1.5x: oneDNN's bf16 one-row kernel is much faster on blocked weights; fp32 one-row steps
            keep the plain weights). They cost a second copy of those weights in memory. None (default):
            pack when it can win (bf16 weights, or max_batch > 1) and the copy needs less than a quarter of
            the memory available now (`inference.quantize.auto_pack`); `unpack_weights(model)` frees them.
        huge_pages: on Linux, move the CPU weights into transparent huge pages first
            (`inference.hugepages`; batch-1 decode up to 1.1x faster here); the model is changed in place.
        prefill_tokens: new requests are prefilled together, right-padded, up to this many padded tokens
            per forward.
        deterministic: run every row's forward alone so a request's output is bitwise independent of
            its batch-mates (slower: weights are read once per row instead of once per step), and under
            `kernels.deterministic()` (the GPU experts skip their atomics-based "fused" path).
        cuda_graphs: replay decode steps from CUDA graphs (inference/graphs.py); None: on when the model is
            on CUDA and the step is capturable (MoE layers on the triton backend), else eager. On CUDA the
            engine also fuses each layer's q/k/v weights in place (`Transformer.fuse_qkv`; same names, values).
    """

    def __init__(self, model, tokenizer=None, *, max_batch: int = 8, max_len: int | None = None,
                 backend: str | None = None, dtype: torch.dtype | None = None, quantize: str | None = None,
                 quantize_linears: bool = False, deterministic: bool = False, onednn: bool = True,
                 prefill_tokens: int = 2048, pack_weights: bool | None = None, huge_pages: bool = True,
                 cuda_graphs: bool | None = None) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"Engine max_batch must be an integer >= 1, got {max_batch!r}")
        cfg = model.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"Engine max_len must be an integer >= 2, got {max_len!r}")
        if not isinstance(prefill_tokens, int) or prefill_tokens < 1:
            raise ValueError(f"Engine prefill_tokens must be an integer >= 1, got {prefill_tokens!r}")
        if backend is not None:
            kernels.get_backend(backend)  # an unknown name fails before the model is touched
        self.model = model.eval()
        if dtype is not None:
            self.model.to(dtype)
        if backend == "int8" and quantize is None:
            quantize = "int8"  # the int8 backend computes what was quantized: ask for the format too
        if quantize is not None:
            from moesaic.inference.quantize import quantize_model

            quantize_model(self.model, quantize, linears=quantize_linears)
        if backend is not None:
            self.model.set_moe_backend(backend)
        from moesaic.inference.quantize import prepare_cpu_weights

        self.packed = prepare_cpu_weights(self.model, onednn=onednn, pack_weights=pack_weights,
                                          huge_pages=huge_pages, max_batch=max_batch)
        if self.model.embed.weight.device.type != "cpu":  # CPU linears go through oneDNN (their own layouts)
            self.model.fuse_qkv()  # one q/k/v matmul per layer: fewer kernels in the GPU decode step
        self.tokenizer = tokenizer
        self.deterministic = deterministic
        self.prefill_tokens = prefill_tokens
        self._active: dict[int | None, int] = {}
        self.vocab = cfg.vocab_size
        p = self.model.embed.weight
        cache_dtype = p.dtype
        self.cache = SlotCache.for_model(cfg, max_batch, max_len, dtype=cache_dtype, device=p.device)
        self.device = p.device
        self.scheduler = Scheduler(self.cache)
        self.decode_graphs = make_decode_graphs(self.model, self.cache, cuda_graphs)  # GPU (or None)
        self.fast_step = FastStep.build(self.model, self.cache)  # batch-1 CPU steps in one C call (or None)
        self._ids = itertools.count()
        self._step_lock = threading.Lock()
        self._bg: threading.Thread | None = None
        self._bg_wake = threading.Event()
        self._closing = False
        self.stats: dict[str, float | int] = dict(steps=0, prompt_tokens=0, generated_tokens=0, finished_requests=0,
                                                  busy_seconds=0.0)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: Prompt, params: SamplingParams | None = None, *,
               on_delta: Callable[[str, Request], None] | None = None, request_id: str | None = None) -> Request:
        """Queue a request; it joins the running batch at the next step with a free slot.

        on_delta(text_delta, request) is called from the stepping thread after each token that adds
        text, and once more (possibly with "") when the request finishes.
        """
        params = params or SamplingParams()
        ids = self._encode(prompt)
        k = params.experts_per_token
        cfg = self.model.config
        if k is not None and cfg.is_moe and not 1 <= k <= cfg.num_experts:
            raise ValueError(f"SamplingParams.experts_per_token must be in [1, {cfg.num_experts}], got {k}")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer is not None:
            stop_ids |= set(self.tokenizer.eos_token_ids)
        req = Request(request_id or f"req-{next(self._ids)}", ids, params, stop_ids, self.tokenizer, on_delta,
                      experts_per_token=k, active_params_per_token=self.active_params_per_token(k))
        req.init_counts(self.vocab)
        self.scheduler.add(req)
        self._bg_wake.set()
        return req

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or give the Engine a tokenizer")
            ids = self.tokenizer.encode(prompt)
            if self.tokenizer.bos_token_id is not None and (not ids or ids[0] != self.tokenizer.bos_token_id):
                ids = [self.tokenizer.bos_token_id] + ids
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) > self.cache.max_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the engine's max_len is {self.cache.max_len}")
        if min(ids) < 0 or max(ids) >= self.vocab:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab}), got min {min(ids)} max {max(ids)}")
        return ids

    def abort(self, request_id: str) -> bool:
        """Stop a request (finish_reason "abort"); returns whether it was found."""
        req = self.scheduler.find(request_id)
        if req is None:
            return False
        req.abort()
        return True

    def active_params_per_token(self, k: int | None = None) -> int:
        """Non-embedding parameters one token touches with k routed experts per MoE layer (+ LM head)."""
        if k in self._active:
            return self._active[k]
        pc = self.model.count_params()
        active = pc.active + pc.lm_head
        if k is not None:
            for m in self.model.moe_layers():
                active -= (m.router.top_k - k) * m.experts.params_per_expert
        self._active[k] = active
        return active

    # ---------------------------------------------------------------------- steps
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Run one engine step (see the module plan); returns the requests that finished in it."""
        with self._step_lock, kernels.deterministic(self.deterministic):
            t0 = time.perf_counter()
            new = self.scheduler.admit()
            for group in self._prefill_groups(new):
                self._prefill(group)
            fresh = {id(r) for r in new}
            decode = [r for r in self.scheduler.running if not r.finished and id(r) not in fresh]
            for group in self._groups(decode):
                self._decode(group)
            done = self.scheduler.release_finished()
            st = self.stats
            st["steps"] += 1
            st["prompt_tokens"] += sum(len(r.prompt_ids) for r in new)
            st["generated_tokens"] += len(new) + len(decode)
            st["finished_requests"] += len(done)
            st["busy_seconds"] += time.perf_counter() - t0
            return done

    def snapshot(self) -> dict[str, float | int]:
        """Counters for monitoring: steps, prompt / generated tokens, finished requests, busy seconds,
        and the running / waiting request counts now."""
        with self.scheduler.lock:
            return dict(self.stats, running=len(self.scheduler.running), waiting=len(self.scheduler.waiting))

    def _groups(self, reqs: list[Request]) -> list[list[Request]]:
        if self.deterministic:
            return [[r] for r in reqs]
        by_k: dict[int | None, list[Request]] = {}
        for r in reqs:
            by_k.setdefault(r.experts_per_token, []).append(r)
        return list(by_k.values())

    def _prefill_groups(self, reqs: list[Request]) -> list[list[Request]]:
        """Batches of new requests to prefill together: same experts_per_token, right-padded to the
        longest prompt, at most `prefill_tokens` padded tokens per batch (one request always fits)."""
        out: list[list[Request]] = []
        for group in self._groups(reqs):
            group = sorted(group, key=lambda r: len(r.prompt_ids))
            cur: list[Request] = []
            for r in group:
                if cur and (len(cur) + 1) * len(r.prompt_ids) > self.prefill_tokens:
                    out.append(cur)
                    cur = []
                cur.append(r)
            if cur:
                out.append(cur)
        return out

    def _prefill(self, reqs: list[Request]) -> None:
        lens = [len(r.prompt_ids) for r in reqs]
        t = max(lens)
        ids = torch.zeros(len(reqs), t, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, :lens[i]] = torch.tensor(r.prompt_ids)
        ids = ids.to(self.device)
        padded = min(lens) != t
        view = self.cache.view([r.slot for r in reqs], lens if padded else None)
        mask = (torch.arange(t)[None, :] < torch.tensor(lens)[:, None]).to(self.device) if padded else None
        out = self.model.forward_aux(ids, cache=view, token_mask=mask, top_k=reqs[0].experts_per_token,
                                     logits_index=torch.tensor(lens) - 1)
        self._sample(reqs, out.logits[:, -1])

    def _decode(self, reqs: list[Request]) -> None:
        if self.decode_graphs is not None:  # CUDA graphs (inference/graphs.py); None: capture failed
            logits = self.decode_graphs.decode([r.output_ids[-1] for r in reqs], [r.slot for r in reqs],
                                               [len(r.prompt_ids) + len(r.output_ids) - 1 for r in reqs],
                                               reqs[0].experts_per_token)
            if logits is not None:
                return self._sample(reqs, logits)
        if len(reqs) == 1 and self.fast_step is not None:  # inference/fast_step.py (None: k it does not take)
            r = reqs[0]
            logits = self.fast_step.decode(r.output_ids[-1], r.slot, r.experts_per_token)
            if logits is not None:
                return self._sample(reqs, logits)
        ids = torch.tensor([[r.output_ids[-1]] for r in reqs], dtype=torch.long, device=self.device)
        view = self.cache.view([r.slot for r in reqs])
        out = self.model.forward_aux(ids, cache=view, top_k=reqs[0].experts_per_token, last_only=True)
        self._sample(reqs, out.logits[:, -1])

    def _sample(self, reqs: list[Request], logits_BV: torch.Tensor) -> None:
        logits_BV = logits_BV.float().cpu()
        plain = [i for i, r in enumerate(reqs) if r.params.greedy and not r.needs_penalties]
        tokens: dict[int, int] = {}
        if plain:  # one batched argmax for the plain greedy rows (all rows: no gather of their logits first)
            rows = logits_BV if len(plain) == len(reqs) else logits_BV[plain]
            for i, t in zip(plain, rows.argmax(-1).tolist(), strict=True):
                tokens[i] = t
        for i, r in enumerate(reqs):
            if i not in tokens:
                tokens[i] = sample_row(logits_BV[i], r.params, r.generator, r.prompt_counts, r.output_counts)
            lp, top = (token_logprobs(logits_BV[i], tokens[i], r.params.logprobs)
                       if r.params.logprobs is not None else (None, None))
            r.append(tokens[i], self.cache.max_len, lp, top)

    # -------------------------------------------------------------- front ends
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Run prompts to completion (continuous batching when there are more than max_batch)."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(plist)} SamplingParams")
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        while any(not r.finished for r in reqs):
            self.step()
        return [r.completion() for r in reqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one request while stepping the engine (other requests advance too)."""
        deltas: list[str] = []
        req = self.submit(prompt, params, on_delta=lambda d, _r: deltas.append(d))
        while True:
            if not req.finished:
                self.step()
            while deltas:
                d = deltas.pop(0)
                if d:
                    yield d
            if req.finished:
                return
