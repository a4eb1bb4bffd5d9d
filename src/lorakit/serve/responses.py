"""OpenAI-format answers built from engine events: whole responses, and server-sent-event streams."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from .engine import Event, Generation, TokenLogprob


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat's ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""
    def item(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**item(text, lp), "top_logprobs": [item(t, l) for t, l in top]}
                        for text, lp, top in entries]}


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions ``logprobs``: parallel lists of tokens, their logprobs, the alternatives and each
    token's character offset in the answer (``offset``: characters before the first entry)."""
    offsets = []
    for text, _, _ in entries:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": [text for text, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": offsets}


@dataclass
class Answer:
    """What a handler knows about one generation request: ids, model, kind (``chat`` or ``text``), ``n``
    choices per prompt and, per choice, the text so far, the finish reason, the logprobs and the usage."""

    rid: str
    created: int
    model: str
    kind: str
    choices: int
    n: int = 1
    logprobs: bool = False
    texts: list[str] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    tokens: list[list[TokenLogprob]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # characters of each choice streamed so far
    usage: list[int] = field(default_factory=lambda: [0, 0])

    def __post_init__(self) -> None:
        self.texts, self.reasons = [""] * self.choices, [None] * self.choices
        self.tokens, self.offsets = [[] for _ in range(self.choices)], [0] * self.choices

    def record(self, event: Event) -> None:
        """Keep an event's logprobs (whole responses list them all at the end)."""
        if event.logprobs:
            self.tokens[event.index].extend(event.logprobs)

    def finish(self, event: Event) -> bool:
        """Record a final event; True when every choice has finished. The prompt counts once per prompt."""
        self.texts[event.index], self.reasons[event.index] = event.final_text or "", event.finish_reason
        self.usage[0] += event.prompt_tokens if event.index % self.n == 0 else 0
        self.usage[1] += event.completion_tokens
        return all(r is not None for r in self.reasons)

    def usage_body(self) -> dict[str, int]:
        return {"prompt_tokens": self.usage[0], "completion_tokens": self.usage[1], "total_tokens": sum(self.usage)}

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return chat_logprobs(entries) if self.kind == "chat" else completion_logprobs(entries, offset)

    def body(self) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        choices = []
        for i, (text, reason) in enumerate(zip(self.texts, self.reasons)):
            choice: dict[str, Any] = {"index": i}
            choice.update({"message": {"role": "assistant", "content": text}} if self.kind == "chat" else
                          {"text": text})
            choices.append({**choice, "logprobs": self._logprobs(self.tokens[i], 0), "finish_reason": reason})
        return {"id": self.rid, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage_body()}

    # -- streaming ---------------------------------------------------------------------------------------
    def chunk(self, choices: list[dict], include_usage: bool, usage: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        data = {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    def choice(self, event: Event) -> dict:
        """One streamed choice: a chat delta or a completion text, with the logprobs of its tokens."""
        logprobs = self._logprobs(event.logprobs or [], self.offsets[event.index])
        self.offsets[event.index] += len(event.text)
        if self.kind == "chat":
            delta = {"content": event.text} if event.text else {}
            return {"index": event.index, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}
        return {"index": event.index, "text": event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}

    def role_choice(self, index: int) -> dict:
        """The first chat chunk of a choice: its role."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}


async def stream_events(answer: Answer, first: Event, next_event: Callable[[], Awaitable[Event | None]],
                        gens: list[Generation], include_usage: bool, cancel: Callable[[], None]
                        ) -> AsyncIterator[str]:
    """Server-sent events of OpenAI's chunk format, ending with ``data: [DONE]``. On a client disconnect (the
    response task is cancelled) or an error, the generations still running are cancelled."""
    finished: set[int] = set()
    try:
        if answer.kind == "chat":
            for g in gens:
                yield answer.chunk([answer.role_choice(g.index)], include_usage)
        event: Event | None = first
        while event is not None:
            if event.error is not None:
                yield f"data: {json.dumps(event.error.body())}\n\n"
                break
            if event.text or event.finish_reason or event.logprobs:
                yield answer.chunk([answer.choice(event)], include_usage)
            if event.finish_reason is not None:
                finished.add(event.index)
                answer.finish(event)
                if len(finished) == len(gens):
                    if include_usage:
                        yield answer.chunk([], True, answer.usage_body())
                    break
            event = await next_event()
        yield "data: [DONE]\n\n"
    finally:
        if len(finished) < len(gens):
            cancel()
