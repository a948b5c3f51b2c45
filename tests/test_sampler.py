"""Sampling transforms by hand: penalties, temperature, top-k, top-p, min-p, seeds, logprobs, validation."""

from __future__ import annotations

import math

import pytest
import torch

from moesaic.inference.sampler import (
    SamplingParams,
    apply_penalties,
    filter_logits,
    make_generator,
    sample_row,
    token_logprobs,
)


def kept(x):
    return set(torch.isfinite(x).nonzero().flatten().tolist())


def test_top_k_top_p_min_p_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))
    assert kept(filter_logits(logits, SamplingParams(top_k=2))) == {0, 1}
    # top_p: keep while the mass before a token is < p: 0 (0), 1 (.5), 2 (.75) for p=0.8; 3 starts at .9
    assert kept(filter_logits(logits, SamplingParams(top_p=0.8))) == {0, 1, 2}
    assert kept(filter_logits(logits, SamplingParams(top_p=0.5))) == {0}
    assert kept(filter_logits(logits, SamplingParams(top_p=0.01))) == {0}
    # min_p: keep p >= 0.2 * 0.5 = 0.1
    assert kept(filter_logits(logits, SamplingParams(min_p=0.2))) == {0, 1, 2}
    # top-k first, then top-p over the renormalised survivors (.5/.9, .25/.9 -> cumulative .56 .83)
    assert kept(filter_logits(logits, SamplingParams(top_k=3, top_p=0.7))) == {0, 1}


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(filter_logits(logits, SamplingParams(temperature=0.5)), logits * 2)


def test_penalties_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    prompt = torch.tensor([1, 0, 0, 0])
    output = torch.tensor([0, 0, 2, 1])
    p = SamplingParams(repetition_penalty=2.0)
    torch.testing.assert_close(apply_penalties(logits, p, prompt, output), torch.tensor([1.0, -1.0, 0.25, 1.5]))
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    torch.testing.assert_close(apply_penalties(logits, p, prompt, output),
                               torch.tensor([2.0, -1.0, 0.5 - 1.0 - 0.25, 3.0 - 0.5 - 0.25]))


def test_greedy_and_penalised_greedy():
    logits = torch.tensor([0.1, 5.0, 4.9])
    g = make_generator(0)
    assert sample_row(logits, SamplingParams(temperature=0), g) == 1
    out = torch.tensor([0, 3, 0])
    assert sample_row(logits, SamplingParams(temperature=0, frequency_penalty=0.5), g, None, out) == 2


def test_sampling_follows_distribution_and_seed():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = torch.log(probs.clamp_min(1e-30))
    p = SamplingParams(temperature=1.0)
    g = make_generator(123)
    draws = torch.tensor([sample_row(logits, p, g) for _ in range(3000)])
    freq = torch.bincount(draws, minlength=4).float() / 3000
    assert freq[3] == 0
    assert torch.allclose(freq[:3], probs[:3], atol=0.04)
    g1, g2, g3 = make_generator(7), make_generator(7), make_generator(8)
    a = [sample_row(logits, p, g1) for _ in range(30)]
    assert a == [sample_row(logits, p, g2) for _ in range(30)]
    assert a != [sample_row(logits, p, g3) for _ in range(30)]


def test_logprobs_are_raw_log_softmax():
    logits = torch.tensor([1.0, 2.0, 0.5])
    lp, top = token_logprobs(logits, 0, 2)
    ref = torch.log_softmax(logits, -1)
    assert math.isclose(lp, float(ref[0]), rel_tol=1e-6)
    assert list(top) == [1, 0] and math.isclose(top[1], float(ref[1]), rel_tol=1e-6)


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -2), ("min_p", 1.0),
                                         ("repetition_penalty", 0.0), ("frequency_penalty", 3.0),
                                         ("presence_penalty", -2.5), ("logprobs", -1),
                                         ("experts_per_token", 0), ("stop", [""])])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_string_accepted_as_str():
    assert SamplingParams(stop="\n").stop == ["\n"]
