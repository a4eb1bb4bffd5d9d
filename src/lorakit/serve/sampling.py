"""Choosing each next token: penalties, then greedy or temperature / top-k / top-p / min-p sampling, and the
log-probabilities a request may ask for. All on the logits' device, one row ``(vocab,)`` at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: temperatures below this are greedy (as vLLM): dividing logits by ~1e-45 overflows to inf, and softmax of
#: inf is NaN
GREEDY_BELOW = 1e-5


class SamplingError(ValueError):
    """The distribution of one row is not a distribution (NaN or inf): that row fails, the batch goes on."""


@dataclass(frozen=True)
class SamplingParams:
    """How one generation chooses its tokens (OpenAI / vLLM request fields of the same names).

    ``top_k`` 0 (or -1) and ``min_p`` 0 disable those filters; penalties at their neutral values do nothing.
    ``logprobs``: None, or the number of most likely alternatives to report with each token's log-probability.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        """argmax: temperature (near) 0, or ``top_k == 1`` (sampling from the one most likely token)."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def penalize(logits: Tensor, params: SamplingParams, prompt_ids: list[int], generated: list[int]) -> Tensor:
    """``logits`` (vocab,) with the request's penalties applied (a new tensor when any applies).

    ``repetition_penalty`` (Keskar et al. 2019, CTRL, section 4.1; as transformers and vLLM) divides the positive
    logits and multiplies the negative ones of every token in the prompt or the answer so far;
    ``presence_penalty`` / ``frequency_penalty`` (OpenAI) subtract ``presence + frequency * count`` from the
    logits of tokens the answer already holds ``count`` times.
    """
    if not params.penalized:
        return logits
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(generated)), dtype=torch.long, device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                   picked * params.repetition_penalty)
    if generated and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    return logits


def sample_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from ``logits`` (vocab,): argmax when greedy, else softmax at ``temperature`` over the ``top_k``
    most likely tokens, the nucleus of mass ``top_p`` (Holtzman et al. 2020, section 3.1) and the tokens with
    at least ``min_p`` times the top probability (Nguyen et al. 2024, min-p sampling)."""
    if params.greedy:
        return int(logits.argmax())
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = scores.topk(params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    if not bool(torch.isfinite(probs).all()) or not bool(probs.sum() > 0):
        raise SamplingError("the token distribution is not finite (NaN or inf logits)")
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under the model's distribution ``log_softmax(logits)`` (before
    temperature and penalties, as vLLM reports by default) and the ``top`` most likely tokens with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, ids = logp.topk(top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(logp[token]), alternatives


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` not to stream yet: a possible start of a stop string, or an
    incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold
