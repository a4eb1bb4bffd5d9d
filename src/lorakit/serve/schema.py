"""Request bodies of the HTTP API (pydantic models, strict: a string is not a number, ``"yes"`` is not a bool,
a bool is not an int) and the OpenAI parameters lorakit refuses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: strict types; unknown fields kept so that unsupported OpenAI parameters can be refused by name
_STRICT = ConfigDict(strict=True, extra="allow")
#: seeds as torch takes them: any 64-bit value, signed or not
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1


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
    n: int | None = Field(default=None, ge=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    """A chat message; ``content`` is required (text, or a list of ``{"type": "text", "text": ...}`` parts)."""

    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    model: str
    input: str | list[str]


class AdapterRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    path: str | None = None


#: OpenAI parameters lorakit does not implement: refused (400) unless left at their default
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "response_format": (None, {"type": "text"}), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0)}
