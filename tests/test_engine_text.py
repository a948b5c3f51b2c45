"""Text in, text out: a tokenizer trained on the fly; stop strings, eos, streaming deltas, async stream."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moesaic import ModelConfig, build_model
from moesaic.inference import Engine, SamplingParams
from moesaic.tokenizer import Tokenizer

TEXT = ("the quick brown fox jumps over the lazy dog. a mixture of experts routes each token "
        "to a few experts; the engine batches requests and streams text. héllo wörld ✓ ") * 4


@pytest.fixture(scope="module")
def tokenizer():
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return Tokenizer(tok, eos_token_ids=[tok.token_to_id("<eos>")])


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    m = build_model(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=96)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)
    return m


def test_text_equals_decoded_tokens_and_stream_concatenates(model, tokenizer):
    eng = Engine(model, tokenizer, max_batch=2)
    sp = SamplingParams(max_tokens=20, temperature=0.8, seed=5)
    (done,) = eng.generate(["the quick"], sp)
    assert done.text == tokenizer.decode(done.token_ids)
    deltas = list(eng.stream("the quick", sp))
    assert "".join(deltas) == done.text
    assert all(d for d in deltas)


def test_stop_string_truncates_and_is_never_streamed(model, tokenizer):
    eng = Engine(model, tokenizer, max_batch=2)
    base = eng.generate(["a mixture"], SamplingParams(max_tokens=30, temperature=0))[0]
    assert len(base.text) > 6
    stop = base.text[3:6]  # a string the greedy continuation produces
    (out,) = eng.generate(["a mixture"], SamplingParams(max_tokens=30, temperature=0, stop=[stop, "zzzq"]))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[:base.text.index(stop)]
    streamed = "".join(eng.stream("a mixture", SamplingParams(max_tokens=30, temperature=0, stop=[stop])))
    assert streamed == out.text


def test_eos_stops_and_ignore_eos(model, tokenizer):
    eng = Engine(model, tokenizer, max_batch=2)
    base = eng.generate(["the lazy"], SamplingParams(max_tokens=8, temperature=0))[0]
    stop_tok = base.token_ids[2]
    cut = base.token_ids.index(stop_tok) + 1
    (out,) = eng.generate(["the lazy"], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_tok]))
    assert out.token_ids == base.token_ids[:cut] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.text == tokenizer.decode(base.token_ids[:cut - 1])
    # the tokenizer's eos ids stop generation unless ignore_eos
    eos_tok = Tokenizer(tokenizer.backend, eos_token_ids=[stop_tok])
    eng2 = Engine(model, eos_tok, max_batch=2)
    (out2,) = eng2.generate(["the lazy"], SamplingParams(max_tokens=8, temperature=0))
    assert out2.token_ids == out.token_ids
    (out3,) = eng2.generate(["the lazy"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert out3.token_ids == base.token_ids and out3.finish_reason == "length"


def test_logprobs_on_request(model, tokenizer):
    eng = Engine(model, tokenizer, max_batch=2)
    a, b = eng.generate(["fox", "dog"], [SamplingParams(max_tokens=4, temperature=0, logprobs=3),
                                         SamplingParams(max_tokens=4, temperature=0)])
    assert b.logprobs is None and len(a.logprobs) == 4 and len(a.top_logprobs) == 4
    for tok, lp, top in zip(a.token_ids, a.logprobs, a.top_logprobs):
        assert len(top) == 3 and max(top, key=top.get) == tok and top[tok] == pytest.approx(lp)


def test_async_stream_runs_requests_concurrently(model, tokenizer):
    eng = Engine(model, tokenizer, max_batch=4)
    sp = SamplingParams(max_tokens=12, temperature=0)
    want = [c.text for c in eng.generate(["the quick", "experts"], sp)]

    async def collect(prompt):
        parts, reqs = [], []
        async for delta, req in eng.astream(prompt, sp):
            parts.append(delta)
            reqs.append(req)
        return "".join(parts), reqs[-1]

    async def main():
        return await asyncio.gather(collect("the quick"), collect("experts"))

    got = asyncio.run(main())
    assert [g[0] for g in got] == want
    assert all(r.finished and r.completion().text == t for t, r in got)
    eng.close()
    assert eng._bg is None
