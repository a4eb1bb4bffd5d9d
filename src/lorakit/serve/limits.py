"""Limits checked before any work: the request body's size (ASGI middleware, before the body is parsed), text
that is not valid Unicode, and prompts certainly over the token limit (before tokenizing)."""

from __future__ import annotations

import json
from typing import Any, Callable

from .config import ServeError

#: methods whose body is read (and bounded)
_WITH_BODY = {"POST", "PUT", "PATCH"}


def error_response_parts(err: ServeError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of ``err`` as raw ASGI parts (JSON with non-ASCII escaped, so text the client
    sent — even a lone surrogate — can be echoed in a message)."""
    body = json.dumps(err.body()).encode()
    return err.status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


class BodyLimitMiddleware:
    """Refuses request bodies over ``limit()`` bytes with 413 before they are parsed: at once from the
    ``Content-Length`` header, else while reading (chunked uploads), never holding more than the limit."""

    def __init__(self, app: Any, limit: Callable[[], int]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), [False]

        async def replay() -> dict:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Callable, limit: int) -> None:
        status, headers, body = error_response_parts(ServeError(
            413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)",
            code="request_too_large"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def check_text(text: str, param: str) -> str:
    """``text`` when it can be encoded as UTF-8; a lone surrogate (``"\\udfff"``) is a 400 naming ``param``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ServeError(400, f"{param} is not valid Unicode: {err.reason} at character {err.start}",
                         code="invalid_text", param=param) from None
    return text


def longest_token(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry: a text of ``n`` characters is at least
    ``n / longest_token`` tokens (each token covers at most that many characters of the text, byte-level BPE and
    SentencePiece alike), which bounds a prompt's token count without tokenizing it."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: no bound, every prompt is tokenized
        return 0
    return max((len(token) for token in vocab), default=0)


def check_prompt_chars(chars: int, max_tokens: int, longest: int, param: str) -> None:
    """Refuse, before tokenizing, a prompt of ``chars`` characters that is certainly over ``max_tokens`` tokens
    (twice the bound of `longest_token`, leaving room for normalizers that drop characters)."""
    if longest and chars > 2 * max_tokens * longest:
        raise ServeError(400, f"the prompt is {chars} characters, certainly more than this server's limit of "
                              f"{max_tokens} prompt tokens (--max-prompt-tokens); shorten it",
                         code="context_length_exceeded", param=param)
