"""One request's life in the engine: its tokens, detokenized text, stop checks and stream deltas.

Text is re-decoded from the generated ids after each token (simple and exact for every tokenizer);
a delta is held back while the text ends in an incomplete UTF-8 sequence (U+FFFD) or in what
could be the start of a stop string, so a streamed text never contains a stop string and the
concatenated deltas always equal `Completion.text`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moesaic.inference.sampler import SamplingParams, make_generator


@dataclass
class Completion:
    """A finished (or aborted) request.

    text: the generated text (stop string excluded); token_ids: generated ids (a stop token id is the
    last one when generation ended on it); finish_reason: "stop", "length" or "abort"; stop_reason: the
    stop string or token id that ended it (None otherwise); logprobs: log p of each generated token
    under the model (when requested); top_logprobs: per token, {token id: log p} of the n most likely;
    active_params_per_token: non-embedding parameters each token touched (experts_per_token applied).
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: str | int | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    experts_per_token: int | None = None
    active_params_per_token: int | None = None


DeltaFn = Callable[[str, "Request"], None]


@dataclass
class Request:
    """Mutable state of one running request (owned by the engine)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: set[int]
    tokenizer: object | None = None
    on_delta: DeltaFn | None = None
    experts_per_token: int | None = None
    active_params_per_token: int | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    slot: int = -1
    generator: torch.Generator = field(init=False)
    prompt_counts: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.generator = make_generator(self.params.seed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0

    def init_counts(self, vocab: int) -> None:
        """Token counts for the penalties (only built when the request uses them)."""
        if self.needs_penalties and self.prompt_counts is None:
            self.prompt_counts = torch.bincount(torch.tensor(self.prompt_ids, dtype=torch.long), minlength=vocab)
            self.output_counts = torch.zeros(vocab, dtype=torch.long)

    def append(self, token: int, max_len: int, logprob: float | None = None,
               top: dict[int, float] | None = None) -> None:
        """Record a sampled token, then decide whether the request is finished and what to stream."""
        if self.finished:  # aborted from another thread during the step
            return
        self.output_ids.append(token)
        if self.output_counts is not None:
            self.output_counts[token] += 1
        if logprob is not None:
            self.logprobs.append(logprob)
            self.top_logprobs.append(top or {})
        text_ids = self.output_ids
        if token in self.stop_ids:
            self.finish_reason, self.stop_reason = "stop", token
            text_ids = self.output_ids[:-1]
        self._update_text(text_ids)
        if self.finish_reason is None:
            if len(self.output_ids) >= self.params.max_tokens:
                self.finish_reason = "length"
            elif len(self.prompt_ids) + len(self.output_ids) >= max_len:
                self.finish_reason = "length"  # the KV cache slot is full
        self._emit()

    def abort(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "abort"
            self._emit()

    def _update_text(self, ids: list[int]) -> None:
        if self.tokenizer is None:
            return
        old = len(self.text)
        self.text = self.tokenizer.decode(ids)
        if not self.params.stop:
            return
        longest = max(len(s) for s in self.params.stop)
        start = max(0, min(old, self.emitted) - longest + 1)
        hits = [(self.text.find(s, start), s) for s in self.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[:i]
            self.finish_reason, self.stop_reason = "stop", s

    def _safe_end(self) -> int:
        """How much of the text can be streamed now."""
        if self.finished:
            return len(self.text)
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for s in self.params.stop:  # hold back a possible stop-string prefix
            for n in range(min(len(s) - 1, end), 0, -1):
                if self.text[:end].endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return max(end - hold, self.emitted)

    def _emit(self) -> None:
        end = self._safe_end()
        delta = self.text[self.emitted:end]
        self.emitted = end
        if self.on_delta is not None and (delta or self.finished):
            self.on_delta(delta, self)

    def completion(self) -> Completion:
        want = self.params.logprobs is not None
        return Completion(self.request_id, list(self.prompt_ids), self.text, list(self.output_ids),
                          self.finish_reason or "abort", self.stop_reason,
                          list(self.logprobs) if want else None, list(self.top_logprobs) if want else None,
                          self.experts_per_token, self.active_params_per_token)
