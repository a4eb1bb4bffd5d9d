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
  prefilled together in one forward, left-padded, with each row routed to its adapter (as `lorakit.route`).
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
"""


import argparse
import asyncio
import bisect
import concurrent.futures
import contextlib
import copy
import hmac
import inspect
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .adapters import delete_adapter, lora_modules
from .cli import command
from .errors import LorakitError
from .layers import Routing

log = logging.getLogger(__name__)

#: adapter names: letters, digits, ``-`` and ``_`` (no dots, no slashes: never a path)
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


class ServeError(LorakitError):
    """A request the server answers with an HTTP error status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(self.status, "invalid_request_error" if self.status < 500
                                             else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ServeConfig:
    """Limits and sizes of a server (``lorakit serve`` options of the same names)."""

    max_batch: int = 32  # rows decoded together
    max_queue: int = 256  # generations waiting for a row; more are refused with 429
    max_tokens: int = 512  # largest max_tokens a request may ask for
    max_context: int | None = None  # prompt + max_tokens; None: the model's max_position_embeddings
    max_prefill_tokens: int = 2048  # prompt tokens prefilled in one step (one prompt may exceed it alone)
    request_timeout: float = 300.0  # seconds from arrival to the last token
    max_adapters: int = 32  # adapters held on the model at once (least recently used ones are unloaded)
    prefix_cache_tokens: int = 4096  # prompt tokens whose keys/values are kept for reuse (0: no prefix cache)
    prefix_block: int = 8  # prompts share cached keys/values in blocks of this many tokens
    admin_token: str | None = None  # bearer token of the adapter admin endpoints; None: endpoints disabled


# =========================================================================================================
# Metrics (Prometheus text format, no dependency)
# =========================================================================================================
class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            running += count
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.total}", f"{name}_count{suffix} {running}"]
        return out


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Counters and histograms shared by the HTTP handlers and the engine thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram((1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.adapter_loads = 0
        self.adapter_unloads = 0
        self.cancelled = 0
        self.prefix_cache_tokens = 0

    def request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def observe(self, histogram: str, value: float) -> None:
        with self._lock:
            getattr(self, histogram).observe(value)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """Prometheus exposition text; ``gauges``: name -> (help, value) read at scrape time."""
        with self._lock:
            out = ["# HELP lorakit_requests_total HTTP requests by method, endpoint and status.",
                   "# TYPE lorakit_requests_total counter"]
            out += [f'lorakit_requests_total{{method="{m}",endpoint="{e}",status="{s}"}} {n}'
                    for (m, e, s), n in sorted(self.requests.items())]
            out += ["# HELP lorakit_request_latency_seconds Time from request to the last byte of the response.",
                    "# TYPE lorakit_request_latency_seconds histogram"]
            for endpoint, hist in sorted(self.latency.items()):
                out += hist.lines("lorakit_request_latency_seconds", f'endpoint="{endpoint}"')
            out += ["# HELP lorakit_time_to_first_token_seconds Time from arrival to the first generated token.",
                    "# TYPE lorakit_time_to_first_token_seconds histogram", *self.ttft.lines(
                        "lorakit_time_to_first_token_seconds"),
                    "# HELP lorakit_batch_size Rows in each decoding step.",
                    "# TYPE lorakit_batch_size histogram", *self.batch_size.lines("lorakit_batch_size")]
            for name, help_text, value in (
                    ("prompt_tokens_total", "Prompt tokens prefilled.", self.prompt_tokens),
                    ("prefix_cache_tokens_total", "Prompt tokens whose keys/values came from the prefix cache.",
                     self.prefix_cache_tokens),
                    ("generated_tokens_total", "Tokens generated.", self.generated_tokens),
                    ("decode_steps_total", "Batched decoding steps.", self.decode_steps),
                    ("adapter_loads_total", "Adapters loaded onto the model.", self.adapter_loads),
                    ("adapter_unloads_total", "Adapters unloaded (LRU or DELETE).", self.adapter_unloads),
                    ("cancelled_total", "Generations dropped because their client went away.", self.cancelled)):
                out += [f"# HELP lorakit_{name} {help_text}", f"# TYPE lorakit_{name} counter",
                        f"lorakit_{name} {value}"]
        for name, (help_text, value) in gauges.items():
            out += [f"# HELP lorakit_{name} {help_text}", f"# TYPE lorakit_{name} gauge", f"lorakit_{name} {value}"]
        return "\n".join(out) + "\n"


# =========================================================================================================
# Adapters: known by name, loaded on use, least recently used unloaded
# =========================================================================================================
class AdapterPool:
    """The adapters a server knows (registered folders, and ``adapter_dir/NAME``) and those loaded on the model.

    Loading and unloading change the model, so they run on the engine thread only; `resolve` and `listing` are
    safe from any thread. At most ``max_loaded`` adapters sit on the model; loading one more unloads the least
    recently used adapter that no active generation uses (none free: the request waits for one).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, base_name: str, adapter_dir: str | os.PathLike | None,
                 max_loaded: int, metrics: Metrics) -> None:
        if max_loaded < 1:
            raise ServeError(400, f"max_adapters must be >= 1, got {max_loaded}")
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        if self.adapter_dir is not None and not self.adapter_dir.is_dir():
            raise ServeError(400, f"--adapter-dir {adapter_dir} is not a folder")
        self.max_loaded, self.metrics = max_loaded, metrics
        self.registered: dict[str, Path] = {}
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.in_use: Counter[str] = Counter()
        self.version = 0  # bumped whenever the model's LoRA modules change
        self.on_unload: Callable[[str], None] = lambda name: None
        self._lock = threading.Lock()

    # -- any thread --------------------------------------------------------------------------------------
    def resolve(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base). Unknown names raise a 404."""
        if model == self.base_name:
            return None
        with self._lock:
            if model in self.registered or model in self.loaded:
                return model
        if self._dir_entry(model) is not None:
            return model
        raise ServeError(404, f"model {model!r} does not exist: not the base ({self.base_name!r}), not a loaded "
                              "adapter" + (", not a folder in the adapter directory" if self.adapter_dir else "")
                         + "; GET /v1/models lists them", code="model_not_found", param="model")

    def _dir_entry(self, name: str) -> Path | None:
        """``adapter_dir/name`` when it holds an adapter. Only plain names are looked up: anything that could
        be a path (``/``, ``..``) is refused before the filesystem is touched, and symlinks leading out of
        the folder are refused too."""
        if self.adapter_dir is None or not ADAPTER_NAME.fullmatch(name):
            return None
        folder = (self.adapter_dir / name).resolve()
        if folder.parent != self.adapter_dir or not (folder / "adapter_config.json").is_file():
            return None
        return folder

    def source(self, name: str) -> Path | None:
        with self._lock:
            path = self.registered.get(name)
        return path if path is not None else self._dir_entry(name)

    def listing(self) -> list[tuple[str, bool]]:
        """(name, loaded) of every known adapter: registered, loaded, and those in the adapter folder."""
        with self._lock:
            names = dict.fromkeys([*self.registered, *self.loaded])
            loaded = set(self.loaded)
        if self.adapter_dir is not None:
            for entry in sorted(self.adapter_dir.iterdir()):
                if entry.name not in names and self._dir_entry(entry.name) is not None:
                    names[entry.name] = None
        return [(n, n in loaded) for n in names]

    # -- engine thread -----------------------------------------------------------------------------------
    def acquire(self, name: str | None) -> bool:
        """Make adapter ``name`` usable by one more generation; False when no slot can be freed now."""
        if name is None:
            return True
        if name not in self.loaded:
            path = self.source(name)
            if path is None:
                raise ServeError(404, f"adapter {name!r} is gone (deleted, or removed from the adapter directory)",
                                 code="model_not_found", param="model")
            if not self._make_room():
                return False
            self._load(name, path)
        self.loaded.move_to_end(name)
        self.in_use[name] += 1
        return True

    def release(self, name: str | None) -> None:
        if name is not None:
            self.in_use[name] -= 1
            if self.in_use[name] <= 0:
                del self.in_use[name]

    def register(self, name: str, path: Path) -> None:
        """Add (and load now, validating it) adapter ``name`` from ``path``."""
        if name == self.base_name or name in self.registered or name in self.loaded:
            raise ServeError(409, f"an adapter or model named {name!r} exists already; DELETE it first",
                             code="adapter_exists", param="name")
        if not self._make_room():
            raise ServeError(503, f"all {self.max_loaded} adapter slots are in use by running requests; retry later")
        self._load(name, path)
        with self._lock:
            self.registered[name] = path

    def remove(self, name: str) -> None:
        """Unload ``name`` and forget its registration (an adapter-folder entry stays loadable by name)."""
        if name not in self.registered and name not in self.loaded:
            raise ServeError(404, f"adapter {name!r} is neither registered nor loaded", code="model_not_found")
        if self.in_use[name]:
            raise ServeError(409, f"adapter {name!r} is used by {self.in_use[name]} running request(s); retry when "
                                  "they finish", code="adapter_in_use")
        if name in self.loaded:
            self._unload(name)
        with self._lock:
            self.registered.pop(name, None)

    def _make_room(self) -> bool:
        while len(self.loaded) >= self.max_loaded:
            victim = next((n for n in self.loaded if not self.in_use[n]), None)
            if victim is None:
                return False
            self._unload(victim)
        return True

    def _load(self, name: str, path: Path) -> None:
        from .io import load_adapter, read_adapter_config

        try:
            if read_adapter_config(path).init == "pissa":
                raise ServeError(422, f"adapter {name!r} is a PiSSA adapter, which rewrites the base weights every "
                                      "other adapter shares; export it as plain LoRA first (lorakit export --target "
                                      "peft)", code="adapter_load_failed")
            load_adapter(self.model, path, adapter_name=name, tokenizer=self.tokenizer)
        except LorakitError as err:  # unreadable files, another base (fingerprint), no matching modules...
            if isinstance(err, ServeError):
                raise
            raise ServeError(422, f"adapter {name!r} cannot be loaded: {err}", code="adapter_load_failed") from err
        self.model.eval()
        self.version += 1
        with self._lock:
            self.loaded[name] = None
        self.metrics.add(adapter_loads=1)
        log.info("loaded adapter %s from %s", name, path)

    def _unload(self, name: str) -> None:
        delete_adapter(self.model, name)
        self.on_unload(name)
        self.version += 1
        with self._lock:
            del self.loaded[name]
        self.metrics.add(adapter_unloads=1)
        log.info("unloaded adapter %s", name)


# =========================================================================================================
# Generations and the engine
# =========================================================================================================
@dataclass
class Event:
    """What the engine tells a handler about choice ``index``: new text, the end (``finish_reason``), or an
    error. ``final_text`` is the whole answer, on the last event."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    final_text: str | None = None
    error: ServeError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Generation:
    """One sequence being generated: the request's settings, then the engine's state for it."""

    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    index: int = 0
    stream: bool = True  # emit text as it comes (else only the final event)
    deadline: float = math.inf  # time.monotonic() after which it fails with 408
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already emitted
    generator: torch.Generator | None = None
    holds_adapter: bool = False

    @property
    def position(self) -> int:
        """Position id of the newest token (the one fed next)."""
        return len(self.prompt_ids) + len(self.generated) - 1


@dataclass(eq=False)
class Classification:
    adapter: str | None
    texts: list[str]
    future: concurrent.futures.Future
    deadline: float = math.inf


def _pad_left(t: Tensor, n: int, dim: int) -> Tensor:
    """``n`` zeros in front of dimension ``dim`` (the sequence dimension)."""
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [n, 0]
    return F.pad(t, pad)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` not to stream yet: a possible start of a stop string, or an
    incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def sample_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from ``logits`` (vocab,): softmax at ``temperature``, nucleus of mass ``top_p``
    (Holtzman et al. 2020, section 3.1); ``temperature == 0`` is argmax."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class _Block:
    """A cached block of prompt tokens: its keys and values in every layer, and the blocks that may follow."""

    __slots__ = ("tokens", "kv", "children", "parent")

    def __init__(self, tokens: tuple[int, ...], kv: list[tuple[Tensor, Tensor]], parent: dict) -> None:
        self.tokens, self.kv, self.parent = tokens, kv, parent
        self.children: dict[tuple[int, ...], "_Block"] = {}


class PrefixCache:
    """Keys and values of prompt blocks already prefilled, per adapter, as vLLM's automatic prefix caching: a
    prompt that starts with cached blocks (the chat template's system prompt, a shared preamble) prefills only
    the rest. Per adapter, since an adapter changes every key and value after the first layer.

    A trie of ``block``-token blocks (exact token comparison, no hashes); beyond ``max_tokens`` the least
    recently used blocks are dropped with the blocks that follow them.
    """

    def __init__(self, block: int, max_tokens: int) -> None:
        self.block, self.max_blocks = block, max_tokens // block
        self.roots: dict[str | None, dict[tuple[int, ...], _Block]] = {}
        self._lru: OrderedDict[int, _Block] = OrderedDict()

    def lookup(self, adapter: str | None, ids: list[int]) -> tuple[int, list[tuple[Tensor, Tensor]] | None]:
        """``(P, keys/values (heads, P, dim) per layer)`` of the longest cached start of ``ids``; P < len(ids)
        (the last prompt token is always computed: its logits give the first new token)."""
        children, found = self.roots.get(adapter), []
        for b in range((len(ids) - 1) // self.block):
            node = children.get(tuple(ids[b * self.block:(b + 1) * self.block])) if children is not None else None
            if node is None:
                break
            found.append(node)
            self._lru.move_to_end(id(node))
            children = node.children
        if not found:
            return 0, None
        layers = range(len(found[0].kv))
        return len(found) * self.block, [(torch.cat([n.kv[i][0] for n in found], dim=1),
                                          torch.cat([n.kv[i][1] for n in found], dim=1)) for i in layers]

    def store(self, adapter: str | None, ids: list[int],
              block_kv: Callable[[int], list[tuple[Tensor, Tensor]]]) -> None:
        """Add the full blocks of ``ids`` missing from the trie; ``block_kv(b)`` gives block b's keys/values."""
        if self.max_blocks < 1:
            return
        children = self.roots.setdefault(adapter, {})
        for b in range(len(ids) // self.block):
            tokens = tuple(ids[b * self.block:(b + 1) * self.block])
            node = children.get(tokens)
            if node is None:
                node = children[tokens] = _Block(tokens, block_kv(b), children)
            self._lru[id(node)] = node
            self._lru.move_to_end(id(node))
            children = node.children
        while len(self._lru) > self.max_blocks:
            _, oldest = self._lru.popitem(last=False)
            self._drop(oldest)

    def forget(self, adapter: str | None) -> None:
        """Drop every block of ``adapter`` (unloaded: its keys and values may not come back the same)."""
        for node in list(self.roots.pop(adapter, {}).values()):
            self._drop(node)

    def _drop(self, node: _Block) -> None:
        node.parent.pop(node.tokens, None)
        self._lru.pop(id(node), None)
        for child in list(node.children.values()):
            self._drop(child)

    @property
    def tokens(self) -> int:
        return len(self._lru) * self.block


class Engine:
    """Owns the model: admits generations, prefills newcomers, runs one mixed-adapter decoding step at a time.

    Public methods are thread-safe; everything touching the model runs on the engine's own thread.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, task: str, base_name: str,
                 config: ServeConfig | None = None, adapter_dir: str | os.PathLike | None = None) -> None:
        if task not in ("causal-lm", "sequence-classification"):
            raise ServeError(400, f"lorakit serve serves causal-lm and sequence-classification models, not {task!r}")
        if tokenizer is None:
            raise ServeError(400, "the base model has no tokenizer; text serving needs one")
        self.model = model.eval()
        self.tokenizer = tokenizer  # used by HTTP handlers (one event loop thread)
        self._detokenizer = copy.deepcopy(tokenizer)  # used by the engine thread: HF tokenizers are not re-entrant
        self.task, self.base_name = task, base_name
        self.config = config or ServeConfig()
        self.metrics = Metrics()
        self.adapters = AdapterPool(model, tokenizer, base_name, adapter_dir, self.config.max_adapters, self.metrics)
        model_config = getattr(model, "config", None)
        self.context = self.config.max_context or getattr(model_config, "max_position_embeddings", None) or 2048
        self.labels: dict[int, str] = dict(getattr(model_config, "id2label", None) or {})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if task == "causal-lm":
            self._check_cache_layout()
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            eos = eos if eos is not None else tokenizer.eos_token_id
            self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
            self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefix = PrefixCache(self.config.prefix_block, self.config.prefix_cache_tokens)
        self.adapters.on_unload = self.prefix.forget
        self.waiting: deque[Generation] = deque()
        self.rows: list[Generation] = []  # the running batch, in cache row order
        self._cache: Any = None  # DynamicCache of the running batch
        self._mask: Tensor | None = None  # (rows, cache length) 1 = real token, 0 = left padding
        self._lora_modules: list[torch.nn.Module] = []
        self._modules_version = -1
        self._classifications: deque[Classification] = deque()
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.started = time.time()

    def _check_cache_layout(self) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=self.model.config).layers
        if any(type(layer) is not DynamicLayer for layer in layers):
            raise ServeError(400, "continuous batching joins KV caches of full-attention layers; this model has "
                                  "sliding-window or other cache layers, which lorakit serve does not support")

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail_everything(ServeError(503, "the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- called by handlers ------------------------------------------------------------------------------
    def submit(self, generations: list[Generation]) -> None:
        """Queue generations (all or none): 429 when the waiting queue would overflow."""
        with self._wake:
            if len(self.waiting) + len(generations) > self.config.max_queue:
                raise ServeError(429, f"the server is busy: {len(self.waiting)} requests are waiting (limit "
                                      f"{self.config.max_queue}); retry later", code="queue_full")
            self.waiting.extend(generations)
            self._wake.notify_all()

    def cancel(self, generations: list[Generation]) -> None:
        """Client gone: the engine drops these rows before its next step (no-op once finished)."""
        with self._wake:
            for g in generations:
                g.cancelled = True
            self._wake.notify_all()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between two steps (adapter loading, unloading)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify_all()
        return future

    def classify(self, adapter: str | None, texts: list[str]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if len(self._classifications) >= self.config.max_queue:
                raise ServeError(429, "the server is busy; retry later", code="queue_full")
            self._classifications.append(Classification(adapter, texts, future,
                                                        time.monotonic() + self.config.request_timeout))
            self._wake.notify_all()
        return future

    def counts(self) -> dict[str, int]:
        with self._wake:
            return {"active": len(self.rows), "waiting": len(self.waiting)}

    # -- the loop ----------------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._commands or self._classifications or self.rows or self.waiting)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # per thread; also lets LoRA layers reuse their stacked adapters
        while True:
            with self._wake:
                while not self._stopping and not self._has_work():
                    self._wake.wait()
                if self._stopping:
                    return
                blocked = not (self._commands or self._classifications or self.rows)
            try:
                admitted = self._step()
            except Exception as err:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("engine step failed")
                self._fail_everything(ServeError(500, f"generation failed ({type(err).__name__}: {err})"))
                admitted = True
            if blocked and not admitted:  # every waiting request needs an adapter slot: poll for deadlines
                with self._wake:
                    self._wake.wait(timeout=0.05)

    def _step(self) -> bool:
        while self._commands:
            fn, future = self._commands.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as err:  # noqa: BLE001 - handed to the waiting handler
                    future.set_exception(err)
        if self._classifications:
            self._classify_pending()
        self._drop_finished_rows()
        newcomers = self._admit()
        if newcomers:
            self._prefill(newcomers)
        if self.rows:
            self._decode()
        return bool(newcomers)

    def _fail_everything(self, error: ServeError) -> None:
        with self._wake:
            pending = list(self.waiting) + list(self.rows)
            self.waiting.clear()
            classifications = list(self._classifications)
            self._classifications.clear()
        for g in pending:
            self._end(g, error=error)
        with self._wake:
            self.rows, self._cache, self._mask = [], None, None
        for job in classifications:
            if not job.future.done():
                job.future.set_exception(error)

    # -- admission and prefill ---------------------------------------------------------------------------
    def _admit(self) -> list[Generation]:
        with self._wake:
            candidates = list(self.waiting)
        admitted: list[Generation] = []
        tokens = 0
        now = time.monotonic()
        for g in candidates:
            if len(self.rows) + len(admitted) >= self.config.max_batch:
                break
            if g.cancelled or now >= g.deadline:
                self._unqueue(g)
                if not g.cancelled:
                    self._end(g, error=self._timeout("waiting in the queue"))
                continue
            if admitted and tokens + len(g.prompt_ids) > self.config.max_prefill_tokens:
                break
            try:
                if not self.adapters.acquire(g.adapter):
                    continue  # every adapter slot is busy: it waits, later requests may go first
            except ServeError as err:
                self._unqueue(g)
                self._end(g, error=err)
                continue
            g.holds_adapter = True
            self._unqueue(g)
            if g.temperature > 0:
                g.generator = torch.Generator().manual_seed(g.seed if g.seed is not None
                                                            else random.getrandbits(63))
            admitted.append(g)
            tokens += len(g.prompt_ids)
        return admitted

    def _unqueue(self, g: Generation) -> None:
        with self._wake:
            with contextlib.suppress(ValueError):
                self.waiting.remove(g)

    def _timeout(self, where: str) -> ServeError:
        return ServeError(408, f"request timed out {where} (limit {self.config.request_timeout:g} s)",
                          code="timeout")

    @contextlib.contextmanager
    def _route(self, adapters: list[str | None]) -> Iterator[None]:
        """What `lorakit.route` does, with the LoRA modules listed once per adapter change instead of on every
        call: walking the module tree costs ~0.2 s per step with 16 all-linear adapters on SmolLM2. Every
        name is loaded (the pool acquired it) and nothing is merged (the pool never merges)."""
        if self._modules_version != self.adapters.version:
            self._lora_modules = [module for _, module in lora_modules(self.model)]
            self._modules_version = self.adapters.version
        routing = Routing.for_rows(adapters, next(self.model.parameters()).device)
        for module in self._lora_modules:
            module.routing = routing
        try:
            yield
        finally:
            for module in self._lora_modules:
                module.routing = None

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, adapters: list[str | None]) -> Tensor:
        """Last-position logits ``(rows, vocab)``; row i through adapter ``adapters[i]``."""
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        with self._route(adapters):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, **extra)
        return out.logits[:, -1].float()

    def _prefill(self, gens: list[Generation]) -> None:
        """One forward over the newcomers' prompts, then their caches join the running batch.

        A prompt whose first blocks are in the prefix cache starts from their keys/values; row i's cache then
        reads ``[padding][cached prefix][padding][computed rest]``, the mask marking both paddings.
        """
        hits = [self.prefix.lookup(g.adapter, g.prompt_ids) for g in gens]
        past = max(p for p, _ in hits)
        new = max(len(g.prompt_ids) - p for g, (p, _) in zip(gens, hits))
        ids = torch.full((len(gens), new), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(gens), past + new), dtype=torch.long)
        positions = torch.zeros((len(gens), new), dtype=torch.long)
        for i, (g, (p, _)) in enumerate(zip(gens, hits)):
            rest = len(g.prompt_ids) - p
            ids[i, new - rest:] = torch.tensor(g.prompt_ids[p:])
            positions[i, new - rest:] = torch.arange(p, len(g.prompt_ids))
            mask[i, past - p:past] = 1
            mask[i, past + new - rest:] = 1
        cache = self._cache_from(self._cached_past(hits, past) if past else None)
        logits = self._forward(ids, mask, positions, cache, [g.adapter for g in gens])
        now = time.monotonic()
        self.metrics.add(prompt_tokens=sum(len(g.prompt_ids) - p for g, (p, _) in zip(gens, hits)),
                         prefix_cache_tokens=sum(p for p, _ in hits))
        for i, (g, (p, _)) in enumerate(zip(gens, hits)):
            self.metrics.observe("ttft", now - g.submitted)
            rest = len(g.prompt_ids) - p
            columns = lambda b, i=i, p=p, rest=rest: (  # noqa: E731 - prompt block b -> cache columns of row i
                past - p + b * self.prefix.block if b * self.prefix.block < p
                else past + new - rest + b * self.prefix.block - p)
            self.prefix.store(g.adapter, g.prompt_ids, lambda b, i=i, columns=columns: [
                (layer.keys[i, :, columns(b):columns(b) + self.prefix.block].clone(),
                 layer.values[i, :, columns(b):columns(b) + self.prefix.block].clone()) for layer in cache.layers])
        keep = [i for i, g in enumerate(gens) if not self._advance(g, self._choose(logits[i], g))]
        if keep:
            self._join(cache, mask, keep, [gens[i] for i in keep])

    @staticmethod
    def _cached_past(hits: list[tuple[int, list[tuple[Tensor, Tensor]] | None]], past: int
                     ) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the rows' cached prefixes left-padded to ``past`` tokens, stacked ``(rows, heads, past, dim)``."""
        some = next(kv for _, kv in hits if kv is not None)
        layers = []
        for layer, (k0, _) in enumerate(some):
            empty = k0.new_zeros(k0.shape[0], past, k0.shape[2])
            layers.append(tuple(torch.stack([empty if kv is None else _pad_left(kv[layer][part], past - p, 1)
                                             for p, kv in hits]) for part in (0, 1)))
        return layers

    def _cache_from(self, layers: list[tuple[Tensor, Tensor]] | None) -> Any:
        """A ``DynamicCache`` holding ``layers`` (keys, values) ``(rows, heads, length, dim)``, or empty."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer, (keys, values) in zip(cache.layers, layers or []):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        return cache

    def _join(self, cache: Any, mask: Tensor, keep: list[int], gens: list[Generation]) -> None:
        """Append the prefilled rows ``keep`` of ``cache`` to the running batch, left-padding the shorter side."""
        if len(keep) < mask.shape[0]:
            index = torch.tensor(keep)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            mask = mask.index_select(0, index)
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            old, new = self._mask.shape[1], mask.shape[1]
            length = max(old, new)
            for mine, theirs in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([_pad_left(mine.keys, length - old, 2), _pad_left(theirs.keys, length - new, 2)])
                mine.values = torch.cat([_pad_left(mine.values, length - old, 2),
                                         _pad_left(theirs.values, length - new, 2)])
            self._mask = torch.cat([_pad_left(self._mask, length - old, 1), _pad_left(mask, length - new, 1)])
        with self._wake:
            self.rows.extend(gens)

    # -- decoding ----------------------------------------------------------------------------------------
    def _decode(self) -> None:
        """One token for every row: one forward through the mixed-adapter path over the shared cache."""
        rows = self.rows
        ids = torch.tensor([[g.generated[-1]] for g in rows])
        positions = torch.tensor([[g.position] for g in rows])
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        logits = self._forward(ids, self._mask, positions, self._cache, [g.adapter for g in rows])
        self.metrics.add(decode_steps=1)
        self.metrics.observe("batch_size", len(rows))
        done = [i for i, g in enumerate(rows) if self._advance(g, self._choose(logits[i], g))]
        if done:
            self._remove_rows(done)

    def _drop_finished_rows(self) -> None:
        now = time.monotonic()
        done = []
        for i, g in enumerate(self.rows):
            if g.cancelled:
                done.append(i)
                self._end(g)
            elif now >= g.deadline:
                done.append(i)
                self._end(g, error=self._timeout("while generating"))
        if done:
            self._remove_rows(done)

    def _remove_rows(self, done: list[int]) -> None:
        gone = set(done)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        with self._wake:
            self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep)
        self._mask = self._mask.index_select(0, index)
        start = int(self._mask.any(0).long().argmax())  # columns before it are padding in every row left
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def _choose(self, logits: Tensor, g: Generation) -> int:
        return sample_token(logits, g.temperature, g.top_p, g.generator)

    def _advance(self, g: Generation, token: int) -> bool:
        """Record ``token`` for ``g`` and emit what can be shown; True when ``g`` is finished (and ended)."""
        if g.cancelled:
            self._end(g)
            return True
        if token in self.eos_ids:
            self._end(g, "stop")
            return True
        g.generated.append(token)
        self.metrics.add(generated_tokens=1)
        text = self._detokenizer.decode(g.generated, skip_special_tokens=True)
        reason = None
        if g.stop:
            hits = [i for i in (text.find(s, max(0, g.sent - len(s))) for s in g.stop) if i >= 0]
            if hits:
                text, reason = text[:min(hits)], "stop"
        if reason is None and len(g.generated) >= g.max_tokens:
            reason = "length"
        g.text = text
        if reason is not None:
            self._end(g, reason)
            return True
        shown = len(text) - _held_back(text, g.stop)
        if g.stream and shown > g.sent:
            g.emit(Event(g.index, text[g.sent:shown]))
            g.sent = shown
        return False

    def _end(self, g: Generation, reason: str | None = None, error: ServeError | None = None) -> None:
        """Finish ``g``: free its adapter, tell its handler (nothing for a cancelled one)."""
        if g.holds_adapter:
            self.adapters.release(g.adapter)
            g.holds_adapter = False
        if g.cancelled:
            self.metrics.add(cancelled=1)
            return
        if error is not None:
            g.emit(Event(g.index, error=error))
        else:
            g.emit(Event(g.index, g.text[g.sent:], reason, final_text=g.text, prompt_tokens=len(g.prompt_ids),
                         completion_tokens=len(g.generated)))
            g.sent = len(g.text)

    # -- classification ----------------------------------------------------------------------------------
    def _classify_pending(self) -> None:
        """Every waiting classification request in one mixed-adapter forward."""
        jobs, held = [], []
        with self._wake:
            pending = list(self._classifications)
            self._classifications.clear()
        now = time.monotonic()
        for job in pending:
            if now >= job.deadline:
                job.future.set_exception(ServeError(408, "request timed out waiting in the queue", code="timeout"))
                continue
            try:
                if not self.adapters.acquire(job.adapter):
                    with self._wake:
                        self._classifications.append(job)
                    continue
            except ServeError as err:
                job.future.set_exception(err)
                continue
            held.append(job.adapter)
            jobs.append(job)
        try:
            if jobs:
                texts = [t for job in jobs for t in job.texts]
                adapters = [job.adapter for job in jobs for _ in job.texts]
                enc = self._detokenizer(texts, padding=True, truncation=True, max_length=self.context,
                                     return_tensors="pt")
                with self._route(adapters):
                    logits = self.model(**enc).logits.float()
                probs = torch.softmax(logits, dim=-1)
                start = 0
                for job in jobs:
                    part = probs[start:start + len(job.texts)]
                    start += len(job.texts)
                    job.future.set_result((part, int(enc["attention_mask"].sum())))
        except Exception as err:  # noqa: BLE001 - reported to the requests, the server goes on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(ServeError(500, f"classification failed ({type(err).__name__}: {err})"))
        finally:
            for name in held:
                self.adapters.release(name)


# =========================================================================================================
# HTTP: OpenAI-compatible API
# =========================================================================================================
def _request_models():
    """Request bodies (pydantic, built lazily so importing lorakit does not import fastapi)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Sampling(BaseModel):
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

    return CompletionRequest, ChatRequest, ClassifyRequest, AdapterRequest


#: OpenAI parameters lorakit does not implement: refused (400) unless left at their default
_UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
                "suffix": (None, ""), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
                "response_format": (None, {"type": "text"}), "presence_penalty": (None, 0, 0.0),
                "frequency_penalty": (None, 0, 0.0)}


def _endpoint_label(path: str) -> str:
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    known = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models", "/v1/adapters", "/health",
             "/metrics")
    return path if path in known else "other"


class _MetricsMiddleware:
    """Counts every request by endpoint and status and times it to the last body byte (streams included)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def tracking_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            self.metrics.request(scope["method"], _endpoint_label(scope["path"]), status[0],
                                 time.perf_counter() - started)


def create_app(engine: Engine) -> Any:
    """The FastAPI app serving ``engine``; the engine thread starts and stops with the app."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    CompletionRequest, ChatRequest, ClassifyRequest, AdapterRequest = _request_models()
    config = engine.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.add_middleware(_MetricsMiddleware, metrics=engine.metrics)
    app.state.engine = engine

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        if err.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            message = "malformed JSON in the request body: " + "; ".join(
                str(p.get("ctx", {}).get("error", p.get("msg"))) for p in problems)
            return JSONResponse(ServeError(400, message, code="invalid_json").body(), status_code=400)
        first = problems[0] if problems else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = "; ".join(f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body')}: {p.get('msg')}"
                            for p in problems)
        return JSONResponse(ServeError(400, f"invalid request: {message}", param=where or None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(ServeError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    # -- helpers -------------------------------------------------------------------------------------------
    def check_generation_task() -> None:
        if engine.task != "causal-lm":
            raise ServeError(400, f"the base model is a {engine.task} model: use POST /v1/classify")

    def settings(body: Any) -> dict[str, Any]:
        extra = body.model_extra or {}
        for name, defaults in _UNSUPPORTED.items():
            if name in extra and extra[name] not in defaults:
                raise ServeError(400, f"parameter {name!r} is not supported by lorakit serve", param=name)
        if body.n != 1:
            raise ServeError(400, "only n=1 is supported (send several requests instead)", param="n")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4 or any(not s for s in stop):
            raise ServeError(400, "stop must be up to 4 non-empty strings", param="stop")
        return {"temperature": body.temperature, "top_p": body.top_p, "stop": stop, "seed": body.seed}

    def budget(body: Any, prompt_len: int, default: int) -> int:
        """max_tokens checked against the server limit and the context left after the prompt."""
        if prompt_len >= engine.context:
            raise ServeError(400, f"the prompt is {prompt_len} tokens; this model's context is {engine.context} "
                                  "tokens. Shorten the prompt", code="context_length_exceeded", param="messages")
        asked = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        if asked is None:
            return max(1, min(default, config.max_tokens, engine.context - prompt_len))
        if asked > config.max_tokens:
            raise ServeError(400, f"max_tokens={asked} exceeds this server's limit of {config.max_tokens}",
                             code="max_tokens_exceeded", param="max_tokens")
        if prompt_len + asked > engine.context:
            raise ServeError(400, f"prompt ({prompt_len} tokens) + max_tokens ({asked}) exceeds the context of "
                                  f"{engine.context} tokens; lower max_tokens or shorten the prompt",
                             code="context_length_exceeded", param="max_tokens")
        return asked

    async def next_event(queue: asyncio.Queue, request: Request, gens: list[Generation]) -> Event | None:
        """The next engine event; None when the client disconnected (its generations are cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(gens)
                    return None
                if not engine.alive:
                    raise ServeError(503, "the generation engine stopped; see the server log") from None

    async def run(request: Request, body: Any, prompts: list[list[int]], adapter: str | None, kind: str,
                  default_max: int) -> Any:
        sampling = settings(body)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed: the server is stopping
                loop.call_soon_threadsafe(queue.put_nowait, event)

        deadline = time.monotonic() + config.request_timeout
        gens = [Generation(adapter, ids, budget(body, len(ids), default_max), emit, index=i, stream=body.stream,
                           deadline=deadline, **sampling) for i, ids in enumerate(prompts)]
        engine.submit(gens)
        created, rid = int(time.time()), ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        first = await next_event(queue, request, gens)
        if first is None:
            return JSONResponse(ServeError(499, "client closed the request").body(), status_code=499)
        if first.error is not None:
            engine.cancel(gens)
            raise first.error
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(first, queue, request, gens, kind, rid, created, body.model,
                                            include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons, usage = [""] * len(gens), [None] * len(gens), [0, 0]
        event: Event | None = first
        while True:
            if event is None:
                return JSONResponse(ServeError(499, "client closed the request").body(), status_code=499)
            if event.error is not None:
                engine.cancel(gens)
                raise event.error
            if event.finish_reason is not None:
                texts[event.index], reasons[event.index] = event.final_text or "", event.finish_reason
                usage[0] += event.prompt_tokens
                usage[1] += event.completion_tokens
                if all(r is not None for r in reasons):
                    break
            event = await next_event(queue, request, gens)
        if kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}

    async def stream(first: Event, queue: asyncio.Queue, request: Request, gens: list[Generation], kind: str,
                     rid: str, created: int, model: str, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            data = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        def choice(index: int, text: str | None, reason: str | None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}

        finished, usage = set(), [0, 0]
        try:
            if kind == "chat":
                for g in gens:
                    yield chunk([choice(g.index, None, None, role=True)])
            event: Event | None = first
            while event is not None:
                if event.error is not None:
                    yield f"data: {json.dumps(event.error.body())}\n\n"
                    break
                if event.text or event.finish_reason:
                    yield chunk([choice(event.index, event.text, event.finish_reason)])
                if event.finish_reason is not None:
                    finished.add(event.index)
                    usage[0] += event.prompt_tokens
                    usage[1] += event.completion_tokens
                    if len(finished) == len(gens):
                        if include_usage:
                            data = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                                    "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                              "total_tokens": sum(usage)}}
                            yield f"data: {json.dumps(data)}\n\n"
                        break
                event = await next_event(queue, request, gens)
            yield "data: [DONE]\n\n"
        finally:  # also on client disconnect (the response task is cancelled): free the rows
            if len(finished) < len(gens):
                engine.cancel(gens)

    def tokenize(text: str, special: bool) -> list[int]:
        return engine.tokenizer(text, add_special_tokens=special)["input_ids"]

    # -- endpoints -----------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_generation_task()
        adapter = engine.adapters.resolve(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ServeError(400, "prompt must not be empty", param="prompt")
        ids = [tokenize(p, special=True) for p in prompts]
        if any(not i for i in ids):
            raise ServeError(400, "prompt must not be empty", param="prompt")
        return await run(request, body, ids, adapter, "text", default_max=16)  # OpenAI's default for completions

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        check_generation_task()
        adapter = engine.adapters.resolve(body.model)
        if not getattr(engine.tokenizer, "chat_template", None):
            raise ServeError(400, "the base model's tokenizer has no chat template; use /v1/completions")
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else "".join(
                part.get("text", "") for part in m.content if part.get("type") == "text")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        try:
            text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - template errors (e.g. role order) are the client's
            raise ServeError(400, f"the chat template rejected these messages: {err}", param="messages") from err
        return await run(request, body, [tokenize(text, special=False)], adapter, "chat",
                         default_max=config.max_tokens)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> Any:
        if engine.task != "sequence-classification":
            raise ServeError(400, f"the base model is a {engine.task} model: classification needs a "
                                  "sequence-classification base (lorakit serve --task sequence-classification)")
        adapter = engine.adapters.resolve(body.model)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or len(texts) > 256:
            raise ServeError(400, "input must hold 1 to 256 texts", param="input")
        for t in texts:
            if len(tokenize(t, special=True)) > engine.context:
                raise ServeError(400, f"an input is longer than the model's context of {engine.context} tokens",
                                 code="context_length_exceeded", param="input")
        future = engine.classify(adapter, texts)
        try:
            probs, tokens = await asyncio.wait_for(asyncio.wrap_future(future), timeout=config.request_timeout + 5)
        except asyncio.TimeoutError:
            raise ServeError(408, "request timed out", code="timeout") from None
        data = []
        for i, row in enumerate(probs.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            data.append({"index": i, "label": engine.labels.get(best, str(best)), "label_id": best, "probs": row})
        return {"object": "list", "model": body.model, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def model_card(name: str, loaded: bool | None) -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": int(engine.started), "owned_by": "lorakit",
                "root": engine.base_name, "parent": None if loaded is None else engine.base_name}
        if loaded is not None:
            card["loaded"] = loaded
        return card

    @app.get("/v1/models")
    async def models() -> Any:
        cards = [model_card(engine.base_name, None)] + [model_card(n, l) for n, l in engine.adapters.listing()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> Any:
        adapter = engine.adapters.resolve(model_id)
        return model_card(model_id, None if adapter is None else adapter in engine.adapters.loaded)

    def require_admin(request: Request) -> None:
        if not config.admin_token:
            raise ServeError(403, "adapter administration is disabled: start the server with --admin-token "
                                  "(or LORAKIT_ADMIN_TOKEN)")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.admin_token.encode()):
            raise ServeError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)", code="unauthorized")

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(body: AdapterRequest, request: Request) -> Any:
        require_admin(request)
        if not ADAPTER_NAME.fullmatch(body.name):
            raise ServeError(400, f"invalid adapter name {body.name!r}: use letters, digits, '-' and '_' (no paths)",
                             code="invalid_name", param="name")
        if body.path is None:
            path = engine.adapters._dir_entry(body.name)
            if path is None:
                raise ServeError(404, f"no adapter folder {body.name!r} in the adapter directory"
                                 if engine.adapters.adapter_dir else "no --adapter-dir: give a path",
                                 code="adapter_not_found", param="name")
        else:
            path = Path(body.path).expanduser().resolve()
            if not (path / "adapter_config.json").is_file():
                raise ServeError(400, f"{body.path} is not an adapter folder (no adapter_config.json)", param="path")
        await asyncio.wrap_future(engine.call(lambda: engine.adapters.register(body.name, path)))
        return model_card(body.name, True)

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str, request: Request) -> Any:
        require_admin(request)
        if not ADAPTER_NAME.fullmatch(name):
            raise ServeError(400, f"invalid adapter name {name!r}", code="invalid_name", param="name")
        await asyncio.wrap_future(engine.call(lambda: engine.adapters.remove(name)))
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health() -> Any:
        counts = engine.counts()
        body = {"status": "ok" if engine.alive else "engine stopped", "model": engine.base_name, "task": engine.task,
                **counts, "adapters_loaded": len(engine.adapters.loaded)}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def metrics() -> Any:
        counts = engine.counts()
        gauges = {"active_sequences": ("Rows in the running batch.", counts["active"]),
                  "waiting_requests": ("Generations waiting for a row.", counts["waiting"]),
                  "adapters_loaded": ("Adapters held on the model.", len(engine.adapters.loaded)),
                  "adapters_known": ("Adapters the server can load by name.", len(engine.adapters.listing()))}
        return PlainTextResponse(engine.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    return app


class ServerThread:
    """uvicorn serving ``app`` on a background thread, on a port chosen by the OS (tests, benchmarks)::

        with ServerThread(create_app(engine)) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()


# =========================================================================================================
# lorakit serve
# =========================================================================================================
def build_engine(base: str, task: str = "causal-lm", adapters: dict[str, str] | None = None,
                 adapter_dir: str | None = None, name: str | None = None, num_labels: int | None = None,
                 config: ServeConfig | None = None) -> Engine:
    """Load ``base``, then the named adapters (validated against the base), into an engine (not started)."""
    from .models import load_model

    loaded = load_model(base, task=task, num_labels=num_labels)
    engine = Engine(loaded.model, loaded.tokenizer, task, name or base, config, adapter_dir)
    for adapter_name, path in (adapters or {}).items():
        if not ADAPTER_NAME.fullmatch(adapter_name):
            raise ServeError(400, f"invalid adapter name {adapter_name!r}: use letters, digits, '-' and '_'")
        engine.adapters.register(adapter_name, Path(path).expanduser().resolve())
    return engine


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="smollm2", help="base model: packaged name, HF folder or hub id")
    p.add_argument("--task", default="causal-lm", choices=("causal-lm", "sequence-classification"))
    p.add_argument("--num-labels", type=int, default=None, help="classes of a new classification head")
    p.add_argument("--name", default=None, help="the base's model id in the API (default: --base)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="adapter loaded at start (repeat); a bare PATH is named after its folder")
    p.add_argument("--adapter-dir", default=None, help="folder of adapter folders, loaded by name on first use")
    p.add_argument("--max-adapters", type=int, default=32, help="adapters held in memory (LRU)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--admin-token", default=os.environ.get("LORAKIT_ADMIN_TOKEN"),
                   help="bearer token for POST/DELETE /v1/adapters (default: $LORAKIT_ADMIN_TOKEN; none: disabled)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-context", type=int, default=None, help="prompt + max_tokens (default: the model's)")
    p.add_argument("--max-prefill-tokens", type=int, default=2048, help="prompt tokens prefilled per step")
    p.add_argument("--prefix-cache-tokens", type=int, default=4096,
                   help="prompt tokens whose keys/values are kept for prompts that start the same way (0: off)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds until a request fails with 408")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info")


@command("serve", _serve_args)
def _serve_cli(args: argparse.Namespace) -> int:
    """Serve a base model and many adapters over an OpenAI-compatible HTTP API, with continuous batching."""
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    adapters: dict[str, str] = {}
    for spec in args.adapter:
        adapter_name, sep, path = spec.partition("=")
        if not sep:
            adapter_name, path = Path(spec).resolve().name, spec
        adapters[adapter_name] = path
    config = ServeConfig(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                         max_context=args.max_context, max_prefill_tokens=args.max_prefill_tokens,
                         request_timeout=args.request_timeout, max_adapters=args.max_adapters,
                         prefix_cache_tokens=args.prefix_cache_tokens,
                         admin_token=args.admin_token or None)
    engine = build_engine(args.base, args.task, adapters, args.adapter_dir, args.name, args.num_labels, config)
    log.info("serving %s (%s) with %d adapter(s) on http://%s:%d", engine.base_name, engine.task, len(adapters),
             args.host, args.port)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0
