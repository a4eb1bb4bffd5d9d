"""Request bodies of the HTTP API (pydantic models) and the OpenAI parameters lorakit refuses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    n: int = 1


class CompletionRequest(Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class ClassifyRequest(BaseModel):
    model: str
    input: str | list[str]


class AdapterRequest(BaseModel):
    name: str
    path: str | None = None


#: OpenAI parameters lorakit does not implement: refused (400) unless left at their default
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "response_format": (None, {"type": "text"}), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0)}
