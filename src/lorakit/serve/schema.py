"""Request bodies of the HTTP API (pydantic models, strict: a string is not a number, ``"yes"`` is not a bool,
a bool is not an int) and the OpenAI parameters lorakit refuses."""

from __future__ import annotations

from typing import Any, Literal

from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field

from .config import ServeError
from .limits import check_text
from .sampling import SamplingParams

#: strict types; unknown fields kept so that unsupported OpenAI parameters can be refused by name
_STRICT = ConfigDict(strict=True, extra="allow")
#: seeds as torch takes them: any 64-bit value, signed or not
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1
#: most choices per request, and most alternatives per token in logprobs (OpenAI's limit of 20)
MAX_N, MAX_LOGPROBS = 16, 20


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions; ``null`` means the default."""

    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # legacy API: alternatives per token


class Message(BaseModel):
    """A chat message; ``content`` is required (text, or a list of ``{"type": "text", "text": ...}`` parts)."""

    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    model: str
    input: str | list[str]


class AdapterRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    path: str | None = None


class LoadLoraRequest(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter`` body."""

    model_config = ConfigDict(strict=True, extra="ignore")
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter`` body (``lora_int_id`` accepted and unused)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    lora_name: str
    lora_int_id: int | None = None


#: request fields that do not change an answer (bookkeeping for the client or OpenAI's platform): accepted
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "modalities"})
#: parameters lorakit does not implement, accepted only at their neutral values; any other unknown field is
#: refused by name as well (none is accepted and ignored)
NEUTRAL = {"echo": (None, False), "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
           "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
           "response_format": (None, {"type": "text"}), "use_beam_search": (None, False),
           "prompt_logprobs": (None, 0), "min_tokens": (None, 0), "stop_token_ids": (None, []),
           "bad_words": (None, []), "ignore_eos": (None, False), "skip_special_tokens": (None, True)}


def sampling_of(body: Sampling) -> tuple[SamplingParams, tuple[str, ...]]:
    """A generation request's sampling parameters and stop strings. Every field is honoured; unknown fields
    (other than `IGNORED` bookkeeping, or `NEUTRAL` ones at their neutral value) are refused by name."""
    for name, value in (body.model_extra or {}).items():
        if name not in IGNORED and (name not in NEUTRAL or value not in NEUTRAL[name]):
            raise ServeError(400, f"parameter {name!r} is not supported by lorakit serve", code="unsupported_parameter",
                             param=name)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 4 or any(not s for s in stop):
        raise ServeError(400, "stop must be up to 4 non-empty strings", param="stop")
    for s in stop:
        check_text(s, "stop")
    if isinstance(body, ChatRequest):
        if body.top_logprobs and not body.logprobs:
            raise ServeError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = getattr(body, "logprobs", None)

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    return SamplingParams(
        temperature=given(body.temperature, 1.0), top_p=given(body.top_p, 1.0), top_k=max(given(body.top_k, 0), 0),
        min_p=given(body.min_p, 0.0), repetition_penalty=given(body.repetition_penalty, 1.0),
        presence_penalty=given(body.presence_penalty, 0.0), frequency_penalty=given(body.frequency_penalty, 0.0),
        seed=body.seed, logprobs=logprobs), stop


def choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """The parameters of choice ``j`` of ``n``: with a seed, choice j draws from seed + j (so the choices differ
    and the answer is reproducible)."""
    if j == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + j) % 2 ** 64)
