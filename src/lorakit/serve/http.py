"""The OpenAI-compatible HTTP API: module-level FastAPI handlers over one `ServerState` (the engine, its
settings, the tokenizing thread), stored on ``app.state.serve`` by `create_app`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .config import ADAPTER_NAME, ServeConfig, ServeError
from .engine import Engine, Event, Generation
from .limits import BodyLimitMiddleware, check_prompt_chars, check_text, longest_token
from .metrics import MetricsMiddleware
from .responses import Answer, stream_events
from .schema import (AdapterRequest, ChatRequest, ClassifyRequest, CompletionRequest, LoadLoraRequest,
                     UnloadLoraRequest, choice_params, sampling_of)


@dataclass
class ServerState:
    """What every handler works with: the engine and its settings, and one thread that tokenizes (HF
    tokenizers are not re-entrant, and tokenizing a long prompt must not stall the event loop)."""

    engine: Engine
    tokenizing: concurrent.futures.ThreadPoolExecutor
    longest_token: int  # characters of the tokenizer's longest token (prompt length bound before tokenizing)

    @property
    def config(self) -> ServeConfig:
        return self.engine.config

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the tokenizing thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)


def state_of(request: Request) -> ServerState:
    return request.app.state.serve


# =========================================================================================================
# errors: every one in OpenAI's body
# =========================================================================================================
def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON with non-ASCII characters escaped: an error message may quote text the client sent, lone surrogates
    included, which cannot be encoded as UTF-8."""
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


def error_response(err: ServeError) -> Response:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    if err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return json_response(err.body(), err.status, headers)


async def serve_error(request: Request, err: ServeError) -> Response:
    return error_response(err)


async def invalid_request(request: Request, err: RequestValidationError) -> Response:
    problems = err.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        message = "malformed JSON in the request body: " + "; ".join(
            str(p.get("ctx", {}).get("error", p.get("msg"))) for p in problems)
        return error_response(ServeError(400, message, code="invalid_json"))
    where = field_path(problems[0].get("loc", ())) if problems else ""
    message = "; ".join(dict.fromkeys(f"{field_path(p.get('loc', ()))}: {p.get('msg')}" for p in problems))
    return error_response(ServeError(400, f"invalid request: {message}", param=where or None))


#: location parts pydantic adds for the member of a union it tried (``str``, ``list[str]``...): not field names
_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "list", "dict"}


def field_path(loc: tuple) -> str:
    """``messages[0].content`` from pydantic's ``("body", "messages", 0, "content", "str")``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body" and "[" not in part and part not in _UNION_MEMBERS:
            path += f".{part}" if path else part
    return path


async def http_error(request: Request, err: HTTPException) -> Response:
    return error_response(ServeError(err.status_code, str(err.detail)))


async def unexpected_error(request: Request, err: Exception) -> Response:
    """Anything else: a 500 in OpenAI's format (the traceback goes to the server log)."""
    return error_response(ServeError(500, f"internal error ({type(err).__name__}); see the server log",
                                     code="internal_error"))


# =========================================================================================================
# generation
# =========================================================================================================
def check_generation_task(engine: Engine) -> None:
    if engine.task != "causal-lm":
        raise ServeError(400, f"the base model is a {engine.task} model: use POST /v1/classify")


def token_budget(state: ServerState, body: Any, prompt_len: int, default: int, prompt_field: str) -> int:
    """max_tokens checked against the server limit and the context left after the prompt."""
    context, limit = state.engine.context, state.config.max_tokens
    if prompt_len > state.engine.max_prompt_tokens:
        raise ServeError(400, f"the prompt is {prompt_len} tokens; this server takes prompts of up to "
                              f"{state.engine.max_prompt_tokens} tokens (context {context}). Shorten the prompt",
                         code="context_length_exceeded", param=prompt_field)
    asked = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    if asked is None:
        return max(1, min(default, limit, context - prompt_len))
    if asked > limit:
        raise ServeError(400, f"max_tokens={asked} exceeds this server's limit of {limit}",
                         code="max_tokens_exceeded", param="max_tokens")
    if prompt_len + asked > context:
        raise ServeError(400, f"prompt ({prompt_len} tokens) + max_tokens ({asked}) exceeds the context of "
                              f"{context} tokens; lower max_tokens or shorten the prompt",
                         code="context_length_exceeded", param="max_tokens")
    return asked


#: seconds a handler waits past its request's deadline for the engine's own 408 before answering it itself
_DEADLINE_GRACE = 2.0


async def next_event(state: ServerState, queue: asyncio.Queue, request: Request,
                     gens: list[Generation]) -> Event | None:
    """The next engine event; None when the client disconnected (its generations are cancelled). Past the
    request's deadline, or with the engine stopped, an error event (the generations are cancelled)."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            error = None
            if await request.is_disconnected():
                state.engine.cancel(gens)
                return None
            if not state.engine.alive:
                error = ServeError(503, "the generation engine stopped; see the server log")
            elif time.monotonic() > gens[0].deadline + _DEADLINE_GRACE:
                error = ServeError(408, f"request timed out (limit {state.config.request_timeout:g} s)",
                                   code="timeout")
            if error is not None:
                state.engine.cancel(gens)
                return Event(-1, error=error)


def client_closed() -> Response:
    return error_response(ServeError(499, "client closed the request"))


async def generate(request: Request, body: Any, prompts: list[list[int]], adapter: str | None, kind: str,
                   default_max: int) -> Any:
    """Queue one generation per prompt, then answer whole or as a stream."""
    state = state_of(request)
    params, stop = sampling_of(body)
    n = body.n or 1
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(event: Event) -> None:  # called on the engine thread
        with contextlib.suppress(RuntimeError):  # loop closed: the server is stopping
            loop.call_soon_threadsafe(queue.put_nowait, event)

    prompt_field = "messages" if kind == "chat" else "prompt"
    deadline = time.monotonic() + state.config.request_timeout
    gens = [Generation(adapter, ids, token_budget(state, body, len(ids), default_max, prompt_field), emit,
                       params=choice_params(params, j), stop=stop, index=i * n + j, stream=bool(body.stream),
                       deadline=deadline) for i, ids in enumerate(prompts) for j in range(n)]
    state.engine.submit(gens)
    answer = Answer(("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24], int(time.time()),
                    body.model, kind, len(gens), n, params.logprobs is not None)
    first = await next_event(state, queue, request, gens)
    if first is None:
        return client_closed()
    if first.error is not None:
        state.engine.cancel(gens)
        raise first.error
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = stream_events(answer, first, lambda: next_event(state, queue, request, gens), gens, include_usage,
                               lambda: state.engine.cancel(gens))
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    event: Event | None = first
    while True:
        if event is None:
            return client_closed()
        if event.error is not None:
            state.engine.cancel(gens)
            raise event.error
        answer.record(event)
        if event.finish_reason is not None and answer.finish(event):
            return answer.body()
        event = await next_event(state, queue, request, gens)


def tokenize(state: ServerState, text: str, special: bool) -> list[int]:
    """Token ids of ``text`` (on the tokenizing thread: see `ServerState.off_loop`)."""
    return state.engine.tokenizer(text, add_special_tokens=special)["input_ids"]


async def completions(body: CompletionRequest, request: Request) -> Any:
    """POST /v1/completions: raw prompts continued (OpenAI's default max_tokens of 16)."""
    state = state_of(request)
    check_generation_task(state.engine)
    adapter = state.engine.adapters.resolve(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts or len(prompts) > state.config.max_batch:
        raise ServeError(400, f"prompt must be 1 to {state.config.max_batch} strings", param="prompt")
    for p in prompts:
        check_text(p, "prompt")
        check_prompt_chars(len(p), state.engine.max_prompt_tokens, state.longest_token, "prompt")
    ids = [await state.off_loop(tokenize, state, p, True) for p in prompts]
    if any(not i for i in ids):
        raise ServeError(400, "prompt must not be empty", param="prompt")
    return await generate(request, body, ids, adapter, "text", default_max=16)


def message_text(content: str | list[dict[str, Any]], where: str) -> str:
    """A message's text: the string, or its text parts joined. Parts the server cannot use (images, audio,
    untyped parts, non-string text) are refused, never dropped."""
    if isinstance(content, str):
        return check_text(content, where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text":
            raise ServeError(400, f"{where}[{j}] is a content part of type {kind!r}; this server takes text parts "
                                  "only ({\"type\": \"text\", \"text\": ...})", code="unsupported_content",
                             param=f"{where}[{j}]")
        if not isinstance(part.get("text"), str):
            raise ServeError(400, f"{where}[{j}].text must be a string", param=f"{where}[{j}].text")
        texts.append(check_text(part["text"], f"{where}[{j}].text"))
    return "".join(texts)


def chat_prompt(state: ServerState, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the messages through the tokenizer's chat template (on the tokenizing thread)."""
    try:
        text = state.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - template errors (e.g. role order) are the client's
        raise ServeError(400, f"the chat template rejected these messages: {err}", param="messages") from err
    return tokenize(state, text, False)


async def chat_completions(body: ChatRequest, request: Request) -> Any:
    """POST /v1/chat/completions: messages through the chat template (``developer`` is a system message)."""
    state = state_of(request)
    check_generation_task(state.engine)
    adapter = state.engine.adapters.resolve(body.model)
    if not getattr(state.engine.tokenizer, "chat_template", None):
        raise ServeError(400, "the base model's tokenizer has no chat template; use /v1/completions")
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": message_text(m.content, f"messages[{i}].content")} for i, m in enumerate(body.messages)]
    check_prompt_chars(sum(len(m["content"]) for m in messages), state.engine.max_prompt_tokens,
                       state.longest_token, "messages")
    ids = await state.off_loop(chat_prompt, state, messages)
    return await generate(request, body, [ids], adapter, "chat", default_max=state.config.max_tokens)


# =========================================================================================================
# classification, models, administration, health
# =========================================================================================================
async def classify(body: ClassifyRequest, request: Request) -> Any:
    """POST /v1/classify: label and class probabilities per input (classification bases)."""
    state = state_of(request)
    engine = state.engine
    if engine.task != "sequence-classification":
        raise ServeError(400, f"the base model is a {engine.task} model: classification needs a "
                              "sequence-classification base (lorakit serve --task sequence-classification)")
    adapter = engine.adapters.resolve(body.model)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or len(texts) > 256:
        raise ServeError(400, "input must hold 1 to 256 texts", param="input")
    for t in texts:
        check_text(t, "input")
        check_prompt_chars(len(t), engine.context, state.longest_token, "input")
    for t in texts:
        if len(await state.off_loop(tokenize, state, t, True)) > engine.context:
            raise ServeError(400, f"an input is longer than the model's context of {engine.context} tokens",
                             code="context_length_exceeded", param="input")
    future = engine.classify(adapter, texts)
    try:
        probs, tokens = await asyncio.wait_for(asyncio.wrap_future(future), timeout=state.config.request_timeout + 5)
    except asyncio.TimeoutError:
        raise ServeError(408, "request timed out", code="timeout") from None
    data = []
    for i, row in enumerate(probs.tolist()):
        best = max(range(len(row)), key=row.__getitem__)
        data.append({"index": i, "label": engine.labels.get(best, str(best)), "label_id": best, "probs": row})
    return {"object": "list", "model": body.model, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def model_card(engine: Engine, name: str, loaded: bool | None) -> dict[str, Any]:
    """OpenAI's model object; adapters also say whether they are ``loaded`` (held on the model now)."""
    card = {"id": name, "object": "model", "created": int(engine.started), "owned_by": "lorakit",
            "root": engine.base_name, "parent": None if loaded is None else engine.base_name}
    if loaded is not None:
        card["loaded"] = loaded
    return card


async def list_models(request: Request) -> Any:
    engine = state_of(request).engine
    cards = [model_card(engine, engine.base_name, None)] + [model_card(engine, n, l)
                                                            for n, l in engine.adapters.listing()]
    return {"object": "list", "data": cards}


async def get_model(model_id: str, request: Request) -> Any:
    engine = state_of(request).engine
    adapter = engine.adapters.resolve(model_id)
    return model_card(engine, model_id, None if adapter is None else adapter in engine.adapters.loaded)


def require_admin(state: ServerState, request: Request) -> None:
    token = state.config.admin_token
    if not token:
        raise ServeError(403, "adapter administration is disabled: start the server with --admin-token "
                              "(or LORAKIT_ADMIN_TOKEN)")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ServeError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)", code="unauthorized")


def adapter_folder(state: ServerState, name: str, path: str | None) -> Path:
    """The folder to load adapter ``name`` from: ``path``, else ``--adapter-dir/name``."""
    if not ADAPTER_NAME.fullmatch(name):
        raise ServeError(400, f"invalid adapter name {name!r}: use letters, digits, '-' and '_' (no paths)",
                         code="invalid_name", param="name")
    if path is None:
        folder = state.engine.adapters.dir_entry(name, removed_too=True)
        if folder is None:
            raise ServeError(404, f"no adapter folder {name!r} in the adapter directory"
                             if state.engine.adapters.adapter_dir else "no --adapter-dir: give a path",
                             code="adapter_not_found", param="name")
        return folder
    folder = Path(path).expanduser().resolve()
    if not (folder / "adapter_config.json").is_file():
        raise ServeError(400, f"{path} is not an adapter folder (no adapter_config.json)", param="path")
    return folder


async def add_adapter(body: AdapterRequest, request: Request) -> Any:
    """POST /v1/adapters (admin): load an adapter now."""
    state = state_of(request)
    require_admin(state, request)
    folder = adapter_folder(state, body.name, body.path)
    engine = state.engine
    await asyncio.wrap_future(engine.call(lambda: engine.adapters.register(body.name, folder)))
    return json_response(model_card(engine, body.name, True), 201)


async def remove_adapter(name: str, request: Request) -> Any:
    """DELETE /v1/adapters/{name} (admin): unload it and forget its registration."""
    state = state_of(request)
    require_admin(state, request)
    if not ADAPTER_NAME.fullmatch(name):
        raise ServeError(400, f"invalid adapter name {name!r}", code="invalid_name", param="name")
    engine = state.engine
    await asyncio.wrap_future(engine.call(lambda: engine.adapters.remove(name)))
    return {"id": name, "object": "model", "deleted": True}


async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> Any:
    """vLLM's POST /v1/load_lora_adapter ``{"lora_name", "lora_path"}`` (admin token): as POST /v1/adapters,
    answered as vLLM answers (plain text)."""
    state = state_of(request)
    require_admin(state, request)
    folder = adapter_folder(state, body.lora_name, body.lora_path)
    engine = state.engine
    await asyncio.wrap_future(engine.call(lambda: engine.adapters.register(body.lora_name, folder)))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> Any:
    """vLLM's POST /v1/unload_lora_adapter ``{"lora_name"}`` (admin token): as DELETE /v1/adapters/{name}."""
    state = state_of(request)
    require_admin(state, request)
    name = body.lora_name
    if not ADAPTER_NAME.fullmatch(name):
        raise ServeError(400, f"invalid adapter name {name!r}", code="invalid_name", param="lora_name")
    engine = state.engine
    await asyncio.wrap_future(engine.call(lambda: engine.adapters.remove(name)))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


async def health(request: Request) -> Any:
    engine = state_of(request).engine
    body = {"status": "ok" if engine.alive else "engine stopped", "model": engine.base_name, "task": engine.task,
            **engine.counts(), "adapters_loaded": len(engine.adapters.loaded)}
    return json_response(body, 200 if engine.alive else 503)


async def metrics(request: Request) -> Any:
    engine = state_of(request).engine
    counts = engine.counts()
    gauges = {"active_sequences": ("Rows in the running batch.", counts["active"]),
              "waiting_requests": ("Generations waiting for a row.", counts["waiting"]),
              "adapters_loaded": ("Adapters held on the model.", len(engine.adapters.loaded)),
              "adapters_known": ("Adapters the server can load by name.", len(engine.adapters.listing()))}
    return PlainTextResponse(engine.metrics.render(gauges), media_type="text/plain; version=0.0.4")


#: (method, path, handler) of every endpoint
ROUTES = (("POST", "/v1/completions", completions), ("POST", "/v1/chat/completions", chat_completions),
          ("POST", "/v1/classify", classify), ("GET", "/v1/models", list_models),
          ("GET", "/v1/models/{model_id}", get_model), ("POST", "/v1/adapters", add_adapter),
          ("DELETE", "/v1/adapters/{name}", remove_adapter), ("POST", "/v1/load_lora_adapter", load_lora_adapter),
          ("POST", "/v1/unload_lora_adapter", unload_lora_adapter), ("GET", "/health", health),
          ("GET", "/metrics", metrics))


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app serving ``engine``; the engine thread starts and stops with the app."""
    state = ServerState(engine, concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lorakit-tokenize"),
                        longest_token(engine.tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            state.tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.state.serve = state
    app.add_middleware(BodyLimitMiddleware, limit=lambda: engine.config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=engine.metrics)  # outermost: counts the 413s too
    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    return app
