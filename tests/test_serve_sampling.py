"""`lorakit.serve.sampling`: penalties with known values, each filter on a small distribution, greedy cases."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.serve.sampling import SamplingParams, SamplingError, held_back, penalize, sample_token, token_logprobs


def test_penalties_change_exactly_the_named_tokens() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0])
    same = penalize(logits, SamplingParams(), [0, 1], [2])
    assert same is logits  # neutral values: untouched, no copy
    rep = penalize(logits, SamplingParams(repetition_penalty=2.0), [0, 1], [2, 2])
    assert rep.tolist() == [1.0, -4.0, 0.5, 0.5, 3.0]  # positive / 2, negative * 2, unseen tokens kept
    pen = penalize(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [0, 1], [2, 2, 3])
    assert pen.tolist() == pytest.approx([2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25, 3.0])  # prompt not counted
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5, 3.0]  # the caller's logits are not modified


def test_filters_keep_only_the_allowed_tokens() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 2.9])
    draws = lambda params: {sample_token(logits, params, torch.Generator().manual_seed(s))  # noqa: E731
                            for s in range(60)}
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {3, 4}
    assert draws(SamplingParams(temperature=1.0, top_k=1)) == {3}  # greedy for any seed
    assert draws(SamplingParams(temperature=1.0, min_p=0.9)) == {3, 4}  # p(4) / p(3) = e^-0.1 > 0.9
    assert draws(SamplingParams(temperature=1.0, top_p=0.3)) == {3}  # the top token alone has mass >= 0.3
    assert len(draws(SamplingParams(temperature=2.0))) >= 4
    for tiny in (1e-45, 1e-6):  # below 1e-5: greedy (dividing by it overflows to inf, softmax to NaN)
        assert sample_token(logits, SamplingParams(temperature=tiny), torch.Generator()) == 3


def test_non_finite_distribution_is_a_sampling_error() -> None:
    with pytest.raises(SamplingError):
        sample_token(torch.tensor([0.0, math.nan, 1.0]), SamplingParams(temperature=1.0), torch.Generator())


def test_token_logprobs_and_stop_holdback() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0])
    expected = torch.log_softmax(logits, -1)
    chosen, top = token_logprobs(logits, 1, 2)
    assert chosen == pytest.approx(float(expected[1]))
    assert [t for t, _ in top] == [2, 1] and top[0][1] == pytest.approx(float(expected[2]))
    assert held_back("hello wor", ("world",)) == 3 and held_back("hello", ("xyz",)) == 0
    assert held_back("caf\ufffd", ()) == 1  # an incomplete UTF-8 character waits for its last byte
