"""Per-request sampling: `SamplingParams` and the logits -> token step.

Shape legend: B rows (one per running request), V vocabulary.

Order of operations on a row's logits (vLLM's order, so numbers are comparable):
 1. penalties: repetition (prompt + output tokens), frequency and presence (output tokens only);
 2. greedy (temperature == 0) takes the argmax here;
 3. temperature, then top-k, top-p and min-p filtering;
 4. a draw from the row's own `torch.Generator` (seeded per request), so a seeded request
    samples the same tokens whatever else is in the batch.
Log-probabilities reported to the user are those of the model's raw distribution (before step 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request is decoded.

    max_tokens: new tokens at most; temperature: 0 = greedy; top_k: 0 or -1 = off; top_p in (0, 1];
    min_p in [0, 1): drop tokens below min_p x the top probability; repetition_penalty > 0 (1 = off);
    frequency_penalty / presence_penalty in [-2, 2]; seed: per-request RNG seed (None: drawn from torch's
    global RNG); stop: strings that end generation (not included in the text); stop_token_ids: extra ids
    that end generation (the tokenizer's eos ids are added unless ignore_eos); logprobs: None = off,
    0 = the chosen token's log-probability, n > 0 = also the n most likely tokens;
    experts_per_token: routed experts per token for this request (None = the model's top_k).
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    experts_per_token: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self.validate()

    def validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} must be {allowed}, got {getattr(self, name)!r}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise bad("temperature", ">= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "an integer >= 0 (0 or -1 = off)")
        if not 0 <= self.min_p < 1:
            raise bad("min_p", "in [0, 1)")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "> 0 (1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise bad("logprobs", "None or an integer >= 0")
        if self.experts_per_token is not None and (not isinstance(self.experts_per_token, int)
                                                   or self.experts_per_token < 1):
            raise bad("experts_per_token", "None or an integer >= 1")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request (seeded from torch's global RNG when seed is None)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def apply_penalties(logits_V: torch.Tensor, p: SamplingParams, prompt_counts_V: torch.Tensor | None,
                    output_counts_V: torch.Tensor | None) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens; frequency / presence over output tokens."""
    if p.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits_V, dtype=torch.bool)
        for c in (prompt_counts_V, output_counts_V):
            if c is not None:
                seen |= c > 0
        penalised = torch.where(logits_V > 0, logits_V / p.repetition_penalty, logits_V * p.repetition_penalty)
        logits_V = torch.where(seen, penalised, logits_V)
    if output_counts_V is not None and (p.frequency_penalty or p.presence_penalty):
        c = output_counts_V.to(logits_V.dtype)
        logits_V = logits_V - p.frequency_penalty * c - p.presence_penalty * (c > 0).to(logits_V.dtype)
    return logits_V


def filter_logits(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p: filtered tokens get -inf. Returns scaled logits."""
    x = logits_V / p.temperature
    v = x.shape[-1]
    if p.top_k > 0 and p.top_k < v:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # keep a token while the mass strictly before it is < top_p (always keeps the best token)
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= p.top_p
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if p.min_p > 0.0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return x


def sample_row(logits_V: torch.Tensor, p: SamplingParams, generator: torch.Generator,
               prompt_counts_V: torch.Tensor | None = None,
               output_counts_V: torch.Tensor | None = None) -> int:
    """One token id for one request's next-token logits [V] (fp32 math)."""
    x = apply_penalties(logits_V.float(), p, prompt_counts_V, output_counts_V)
    if p.greedy:
        return int(torch.argmax(x))
    probs = filter_logits(x, p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits_V: torch.Tensor, token: int, top_n: int) -> tuple[float, dict[int, float]]:
    """log p(token) under the raw model distribution, and the top_n most likely tokens' log-probs."""
    lp = torch.log_softmax(logits_V.float(), -1)
    top: dict[int, float] = {}
    if top_n > 0:
        vals, ids = lp.topk(min(top_n, lp.shape[-1]))
        top = {int(i): float(v) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)}
    return float(lp[token]), top
