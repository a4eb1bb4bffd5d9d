"""OpenAI-format answers built from engine events: whole responses, and server-sent-event streams."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from .engine import Event, Generation


@dataclass
class Answer:
    """What a handler knows about one generation request: ids, model, kind (``chat`` or ``text``) and, per
    choice, the text so far, the finish reason and the usage."""

    rid: str
    created: int
    model: str
    kind: str
    choices: int
    texts: list[str] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    usage: list[int] = field(default_factory=lambda: [0, 0])

    def __post_init__(self) -> None:
        self.texts, self.reasons = [""] * self.choices, [None] * self.choices

    def finish(self, event: Event) -> bool:
        """Record a final event; True when every choice has finished."""
        self.texts[event.index], self.reasons[event.index] = event.final_text or "", event.finish_reason
        self.usage[0] += event.prompt_tokens
        self.usage[1] += event.completion_tokens
        return all(r is not None for r in self.reasons)

    def usage_body(self) -> dict[str, int]:
        return {"prompt_tokens": self.usage[0], "completion_tokens": self.usage[1], "total_tokens": sum(self.usage)}

    def body(self) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
        return {"id": self.rid, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage_body()}

    # -- streaming ---------------------------------------------------------------------------------------
    def chunk(self, choices: list[dict], include_usage: bool, usage: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        data = {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    def choice(self, index: int, text: str | None, reason: str | None, role: bool = False) -> dict:
        """One streamed choice: a chat delta (the first one carries the role) or a completion text."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}


async def stream_events(answer: Answer, first: Event, next_event: Callable[[], Awaitable[Event | None]],
                        gens: list[Generation], include_usage: bool, cancel: Callable[[], None]
                        ) -> AsyncIterator[str]:
    """Server-sent events of OpenAI's chunk format, ending with ``data: [DONE]``. On a client disconnect (the
    response task is cancelled) or an error, the generations still running are cancelled."""
    finished: set[int] = set()
    try:
        if answer.kind == "chat":
            for g in gens:
                yield answer.chunk([answer.choice(g.index, None, None, role=True)], include_usage)
        event: Event | None = first
        while event is not None:
            if event.error is not None:
                yield f"data: {json.dumps(event.error.body())}\n\n"
                break
            if event.text or event.finish_reason:
                yield answer.chunk([answer.choice(event.index, event.text, event.finish_reason)], include_usage)
            if event.finish_reason is not None:
                finished.add(event.index)
                answer.finish(event)
                if len(finished) == len(gens):
                    if include_usage:
                        yield answer.chunk([], True, answer.usage_body())
                    break
            event = await next_event()
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        raise
    finally:
        if len(finished) < len(gens):
            cancel()
