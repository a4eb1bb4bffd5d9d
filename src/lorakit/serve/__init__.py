"""Serving many adapters over one base model: an OpenAI-compatible HTTP server with continuous batching.

``lorakit serve --base smollm2 --adapter-dir adapters/`` holds one base model in memory; each request names an
adapter (or the base) in its ``model`` field. Endpoints: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream`` as server-sent events), ``POST /v1/classify`` (classification bases),
``GET /health``, ``GET /metrics`` (Prometheus text), and ``POST /v1/adapters`` / ``DELETE /v1/adapters/{name}``
behind a bearer token.

How a request is served (one engine thread owns the model; HTTP handlers only tokenize, validate and wait):

- A request becomes a `Generation` in a bounded waiting queue (429 when full).
- Between decoding steps the engine admits waiting generations (up to ``max_batch`` rows, ``max_prefill_tokens``
  prompt tokens per step), loading their adapters on first use (LRU, ``max_adapters`` held). The newcomers are
  prefilled together in one forward, left-padded, with each row routed to its adapter (`lorakit.route`).
  Prompt blocks already prefilled for the same adapter (the chat template's system prompt...) come from a
  prefix cache instead of being computed again. The newcomers' KV cache is joined to the running batch's: both
  are left-padded to a common length and concatenated along the batch; the attention mask marks the padding
  and each row keeps its own position ids, so a row computes what it would compute alone.
- Each decoding step is ONE forward of every active row (one new token each) through the mixed-adapter path,
  reading and extending the shared KV cache (transformers' ``DynamicCache``). Finished, cancelled (client gone)
  and timed-out rows leave between steps: their cache rows are dropped and columns that became all padding are
  trimmed.

Greedy decoding (``temperature=0``) gives the tokens `lorakit.evaluate.generate` gives for the same prompt and
adapter (up to floating-point ties: batched matmuls round differently from single-row ones).

Modules: `config` (ServeConfig, ServeError), `metrics`, `pool` (adapter LRU), `kv_cache` (prefix cache, batch
cache join/trim), `sampling`, `engine` (admission, prefill, decode), `schema` (request bodies), `responses`
(OpenAI answers and streams), `http` (the FastAPI app), `launch` (build_engine, ServerThread). The command is `lorakit.cli.serve`.
The HTTP parts import FastAPI, so they load on first use.
"""

from __future__ import annotations

from typing import Any

from .config import ADAPTER_NAME, ServeConfig, ServeError
from .engine import Classification, Engine, Event, Generation
from .kv_cache import PrefixCache
from .metrics import Histogram, Metrics
from .pool import AdapterPool
from .sampling import SamplingParams, sample_token

__all__ = ["ADAPTER_NAME", "AdapterPool", "Classification", "Engine", "Event", "Generation", "Histogram",
           "Metrics", "PrefixCache", "SamplingParams", "ServeConfig", "ServeError", "ServerThread", "build_engine",
           "create_app", "sample_token"]

_LAZY = {"create_app": "http", "ServerThread": "launch", "build_engine": "launch"}


def __getattr__(name: str) -> Any:
    """`create_app`, `ServerThread`, `build_engine`: imported on first use (FastAPI, uvicorn, transformers)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
