"""The engine: one thread that owns the model, admits generations, prefills newcomers and runs one
mixed-adapter decoding step at a time (continuous batching). HTTP handlers only submit and wait."""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import inspect
import logging
import math
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import Tensor

from ..adapters import lora_modules, route
from ..evaluate import stop_token_ids
from .config import ADAPTER_NAME, ServeConfig, ServeError, resolve_device, resolve_dtype
from .kv_cache import BatchCache, PrefixCache, check_cache_layout, new_cache, stack_prefixes
from .metrics import Metrics
from .pool import AdapterPool
from .sampling import SamplingError, SamplingParams, held_back, penalize, sample_token, token_logprobs

log = logging.getLogger(__name__)

#: one generated token with its log-probability and the most likely alternatives: (text, logprob, [(text, logprob)])
TokenLogprob = tuple[str, float, list[tuple[str, float]]]


@dataclass
class Event:
    """What the engine tells a handler about choice ``index``: new text, the end (``finish_reason``), or an
    error. ``final_text`` is the whole answer, on the last event; ``logprobs`` holds ``(token, logprob, top
    alternatives)`` of the tokens behind ``text`` when the request asked for them."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    final_text: str | None = None
    error: ServeError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass(eq=False)
class Generation:
    """One sequence being generated: the request's settings, then the engine's state for it."""

    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
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
    finished: bool = False  # ended (answered, failed or cancelled): nothing more is emitted
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asked for them
    logprobs_sent: int = 0  # entries of ``logprobs`` already emitted
    last_logprob: tuple[float, list[tuple[int, float]]] | None = None  # of the token just chosen

    @property
    def position(self) -> int:
        """Position id of the newest token (the one fed next)."""
        return len(self.prompt_ids) + len(self.generated) - 1


@dataclass(eq=False)
class LongPrefill:
    """A prompt longer than ``max_prefill_tokens``, prefilled one chunk per engine step (the running batch
    decodes between chunks) into its own cache ``(1, heads, done, dim)`` per layer; it joins the batch when
    ``done`` reaches the prompt's length."""

    g: Generation
    cache: Any
    done: int


@dataclass(eq=False)
class Classification:
    """A classification request waiting for the engine: texts through one adapter, answered by ``future``."""

    adapter: str | None
    texts: list[str]
    future: concurrent.futures.Future
    deadline: float = math.inf


class Engine:
    """Owns the model: admits generations, prefills newcomers, runs one mixed-adapter decoding step at a time.

    Public methods are thread-safe; everything touching the model runs on the engine's own thread.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, task: str, base_name: str,
                 config: ServeConfig | None = None, adapter_dir: str | os.PathLike | None = None,
                 adapters: dict[str, str | os.PathLike] | None = None) -> None:
        """Serve ``model`` (moved to ``config.device`` and converted to ``config.dtype``: the engine owns it).

        ``adapters``: name -> folder, loaded now and validated against the base (its fingerprint) before any
        dtype conversion; ``adapter_dir``: adapters loaded by name on first use.
        """
        if task not in ("causal-lm", "sequence-classification"):
            raise ServeError(400, f"lorakit serve serves causal-lm and sequence-classification models, not {task!r}")
        if tokenizer is None:
            raise ServeError(400, "the base model has no tokenizer; text serving needs one")
        self.config = config or ServeConfig()
        self.device, dtype = resolve_device(self.config.device), resolve_dtype(self.config.dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer  # used by HTTP handlers (one tokenizing thread)
        self._detokenizer = copy.deepcopy(tokenizer)  # used by the engine thread: HF tokenizers are not re-entrant
        self.task, self.base_name = task, base_name
        self.metrics = Metrics()
        # the pool loads adapters on the engine thread: it gets the engine thread's tokenizer
        self.adapters = AdapterPool(model, self._detokenizer, base_name, adapter_dir, self.config.max_adapters,
                                    self.metrics, self.config.max_adapter_bytes)
        model_config = getattr(model, "config", None)
        self.context = self.config.max_context or getattr(model_config, "max_position_embeddings", None) or 2048
        #: longest prompt accepted, in tokens (the last context position is left for the first new token)
        self.max_prompt_tokens = min(self.config.max_prompt_tokens or self.context - 1, self.context - 1)
        self.labels: dict[int, str] = dict(getattr(model_config, "id2label", None) or {})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if task == "causal-lm":
            if not check_cache_layout(model.config):
                raise ServeError(400, "continuous batching joins KV caches of full-attention layers; this model has "
                                      "sliding-window or other cache layers, which lorakit serve does not support")
            # the same stop set as `lorakit generate`: EOS, the generation config's EOS and the template's
            # end-of-turn token(s), so a model whose EOS is not `<|im_end|>` does not run into a new turn
            self.eos_ids = set(stop_token_ids(tokenizer, model))
            self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefix = PrefixCache(self.config.prefix_block, self.config.prefix_cache_tokens)
        self.adapters.on_unload = self.prefix.forget
        self.waiting: deque[Generation] = deque()
        self.rows: list[Generation] = []  # the running batch, in cache row order
        self.batch = BatchCache()
        self.long: LongPrefill | None = None  # the long prompt being prefilled in chunks
        self._joining = 0  # generations admitted in this step and not in the running batch yet
        self._lora_modules: list[torch.nn.Module] = []
        self._modules_version = -1
        self._classifications: deque[Classification] = deque()
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.started = time.time()
        for name, path in (adapters or {}).items():
            if not ADAPTER_NAME.fullmatch(name):
                raise ServeError(400, f"invalid adapter name {name!r}: use letters, digits, '-' and '_'")
            self.adapters.register(name, Path(path).expanduser().resolve())
        if dtype is not None and dtype != next(model.parameters()).dtype:
            self.adapters.cast(dtype)  # adapters verified against the base as loaded, then everything converted
        self.model.to(self.device)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> Engine:
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
        """Queue a classification; the future gives ``(probs (texts, labels), prompt tokens)``."""
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
            return {"active": len(self.rows) + (self.long is not None) + self._joining, "waiting": len(self.waiting)}

    # -- the loop ----------------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._commands or self._classifications or self.rows or self.waiting or self.long)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # per thread; also lets LoRA layers reuse their stacked adapters
        while True:
            with self._wake:
                while not self._stopping and not self._has_work():
                    self._wake.wait()
                if self._stopping:
                    return
                blocked = not (self._commands or self._classifications or self.rows or self.long)
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
        if self.long is not None:
            self._prefill_chunk()
        newcomers = self._admit()
        if newcomers:
            try:
                self._prefill(newcomers)
            except Exception as err:  # noqa: BLE001 - the newcomers fail, the running batch goes on
                log.exception("prefill failed")
                error = ServeError(500, f"prefill failed ({type(err).__name__}: {err})", code="prefill_failed")
                for g in newcomers:
                    if g not in self.rows:
                        self._end(g, error=error)
            finally:
                with self._wake:
                    self._joining = 0
        if self.rows:
            try:
                self._decode()
            except Exception as err:  # noqa: BLE001 - the rows of this step fail; the queue goes on
                log.exception("decoding step failed")
                self._end_rows(ServeError(500, f"generation failed ({type(err).__name__}: {err})",
                                          code="generation_failed"))
        return bool(newcomers)

    def _end_rows(self, error: ServeError) -> None:
        """End every row of the running batch with ``error`` and drop the batch's cache."""
        with self._wake:
            rows, self.rows = self.rows, []
            self.batch.clear()
        for g in rows:
            self._end(g, error=error)

    def _fail_everything(self, error: ServeError) -> None:
        with self._wake:
            pending = list(self.waiting) + list(self.rows) + ([self.long.g] if self.long else [])
            self.waiting.clear()
            self.long = None
            classifications = list(self._classifications)
            self._classifications.clear()
        for g in pending:
            self._end(g, error=error)
        with self._wake:
            self.rows = []
            self.batch.clear()
        for job in classifications:
            if not job.future.done():
                job.future.set_exception(error)

    # -- admission and prefill ---------------------------------------------------------------------------
    def _admit(self) -> list[Generation]:
        """Waiting generations that join now (FIFO while they fit): up to ``max_batch`` rows and
        ``max_prefill_tokens`` prompt tokens; a longer prompt starts a chunked prefill when none runs."""
        with self._wake:
            candidates = list(self.waiting)
        admitted: list[Generation] = []
        tokens = 0
        now = time.monotonic()
        for g in candidates:
            if len(self.rows) + len(admitted) + (self.long is not None) >= self.config.max_batch:
                break
            if g.cancelled or now >= g.deadline:
                self._unqueue(g)
                self._end(g, error=None if g.cancelled else self._timeout("waiting in the queue"))
                continue
            long = len(g.prompt_ids) > self.config.max_prefill_tokens
            if long and self.long is not None:
                continue  # one chunked prefill at a time: it waits, shorter prompts may go first
            if not long and admitted and tokens + len(g.prompt_ids) > self.config.max_prefill_tokens:
                break
            if not self._hold(g):
                continue
            if long:
                self._start_long(g)
            else:
                admitted.append(g)
                tokens += len(g.prompt_ids)
        return grouped_by_adapter(admitted)

    def _hold(self, g: Generation) -> bool:
        """Take ``g`` off the queue with its sampling generator and its adapter; False (``g`` stays queued) when
        every adapter slot is busy. Any failure ends ``g`` alone, releasing what it held."""
        try:
            if g.generator is None and not g.params.greedy:
                seed = g.params.seed if g.params.seed is not None else random.getrandbits(63)
                g.generator = torch.Generator(device=self.device).manual_seed(seed)
            if not self.adapters.acquire(g.adapter):
                return False  # every adapter slot is busy: it waits, later requests may go first
            g.holds_adapter = True
            with self._wake:  # counted as active from the moment it leaves the queue
                self._unqueue(g)
                self._joining += len(g.prompt_ids) <= self.config.max_prefill_tokens
            return True
        except Exception as err:  # noqa: BLE001 - this request fails, the others go on
            self._unqueue(g)
            self._end(g, error=err if isinstance(err, ServeError) else ServeError(
                400, f"request cannot start ({type(err).__name__}: {err})", code="invalid_request"))
            return False

    def _start_long(self, g: Generation) -> None:
        """Begin the chunked prefill of ``g``, from the prefix cache's keys/values of its start when held."""
        past, kv = self.prefix.lookup(g.adapter, g.prompt_ids)
        layers = [(k[None], v[None]) for k, v in kv] if kv is not None else None
        self.metrics.add(prefix_cache_tokens=past)
        self.long = LongPrefill(g, new_cache(self.model.config, layers), past)

    def _unqueue(self, g: Generation) -> None:
        with self._wake:
            with contextlib.suppress(ValueError):
                self.waiting.remove(g)

    def _timeout(self, where: str) -> ServeError:
        return ServeError(408, f"request timed out {where} (limit {self.config.request_timeout:g} s)",
                          code="timeout")

    @contextlib.contextmanager
    def _route(self, adapters: list[str | None]) -> Iterator[None]:
        """`lorakit.route` over the model's LoRA modules, listed once per adapter change instead of on every
        call: walking the module tree costs ~0.2 s per step with 16 all-linear adapters on SmolLM2. A model
        without LoRA modules (no adapter loaded yet) serves the base as it is."""
        if self._modules_version != self.adapters.version:
            self._lora_modules = [module for _, module in lora_modules(self.model)]
            self._modules_version = self.adapters.version
        if not self._lora_modules:
            yield
            return
        with route(self.model, adapters, modules=self._lora_modules):
            yield

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
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = new_cache(self.model.config, stack_prefixes(hits, past) if past else None)
        logits = self._forward(ids, mask, positions, cache, [g.adapter for g in gens])
        self.metrics.add(prompt_tokens=sum(len(g.prompt_ids) - p for g, (p, _) in zip(gens, hits)),
                         prefix_cache_tokens=sum(p for p, _ in hits))
        block = self.prefix.block
        for i, (g, (p, _)) in enumerate(zip(gens, hits)):
            rest = len(g.prompt_ids) - p
            self._store_prefix(g, cache, i, lambda b, p=p, rest=rest: (  # prompt block b -> cache column of row i
                past - p + b * block if b * block < p else past + new - rest + b * block - p))
        self._first_tokens(gens, logits, cache, mask)

    def _prefill_chunk(self) -> None:
        """The next ``max_prefill_tokens`` of the long prompt (its timeout and cancellation checked first)."""
        job, g = self.long, self.long.g
        if g.cancelled or time.monotonic() >= g.deadline:
            self.long = None
            self._end(g, error=None if g.cancelled else self._timeout("while its prompt was prefilled"))
            return
        start, stop = job.done, min(len(g.prompt_ids), job.done + self.config.max_prefill_tokens)
        ids = torch.tensor([g.prompt_ids[start:stop]], device=self.device)
        positions = torch.arange(start, stop, device=self.device)[None]
        mask = torch.ones((1, stop), dtype=torch.long, device=self.device)
        try:
            logits = self._forward(ids, mask, positions, job.cache, [g.adapter])
        except Exception as err:  # noqa: BLE001 - this request fails, the running batch goes on
            log.exception("chunked prefill failed")
            self.long = None
            self._end(g, error=ServeError(500, f"prefill failed ({type(err).__name__}: {err})",
                                          code="prefill_failed"))
            return
        job.done = stop
        self.metrics.add(prompt_tokens=stop - start, prefill_chunks=1)
        if stop < len(g.prompt_ids):
            return
        self.long = None
        self._store_prefix(g, job.cache, 0, lambda b: b * self.prefix.block)
        self._first_tokens([g], logits, job.cache, mask)

    def _store_prefix(self, g: Generation, cache: Any, row: int, column: Callable[[int], int]) -> None:
        """Keep the full prompt blocks of ``g`` (row ``row`` of ``cache``; block b starts at ``column(b)``)."""
        block = self.prefix.block
        self.prefix.store(g.adapter, g.prompt_ids, lambda b: [
            (layer.keys[row, :, column(b):column(b) + block].clone(),
             layer.values[row, :, column(b):column(b) + block].clone()) for layer in cache.layers])

    def _first_tokens(self, gens: list[Generation], logits: Tensor, cache: Any, mask: Tensor) -> None:
        """After a prefill: each newcomer's first token; those not finished by it join the running batch."""
        now = time.monotonic()
        for g in gens:
            self.metrics.observe("ttft", now - g.submitted)
        tokens = self._pick(logits, gens)
        keep = [i for i, (g, token) in enumerate(zip(gens, tokens)) if token is not None and not self._advance(g, token)]
        if keep:
            self.batch.join(cache, mask, keep)
            with self._wake:
                self.rows.extend(gens[i] for i in keep)

    # -- decoding ----------------------------------------------------------------------------------------
    def _decode(self) -> None:
        """One token for every row: one forward through the mixed-adapter path over the shared cache."""
        rows = self.rows
        ids = torch.tensor([[g.generated[-1]] for g in rows], device=self.device)
        positions = torch.tensor([[g.position] for g in rows], device=self.device)
        mask = self.batch.grow()
        logits = self._forward(ids, mask, positions, self.batch.cache, [g.adapter for g in rows])
        self.metrics.add(decode_steps=1)
        self.metrics.observe("batch_size", len(rows))
        tokens = self._pick(logits, rows)
        done = [i for i, (g, token) in enumerate(zip(rows, tokens)) if token is None or self._advance(g, token)]
        if done:
            self._remove_rows(done)

    def _pick(self, logits: Tensor, gens: list[Generation]) -> list[int | None]:
        """The next token of each row of ``logits`` ``(rows, vocab)``: plain greedy rows from one argmax (read
        from the device once, with every row's finiteness), the others one by one. A row whose logits are not
        finite or whose sampling fails is ended with an error (None): the other rows go on."""
        best, finite = torch.stack([logits.argmax(-1), torch.isfinite(logits).all(-1).long()]).tolist()
        tokens: list[int | None] = [None] * len(gens)
        for i, g in enumerate(gens):
            try:
                if not finite[i]:
                    raise SamplingError("the model's logits for this request are not finite (NaN or inf)")
                if g.params.greedy and not g.params.penalized and g.params.logprobs is None:
                    tokens[i] = best[i]
                else:
                    tokens[i] = self._choose(logits[i], g)
            except Exception as err:  # noqa: BLE001 - this request fails, the batch goes on
                log.warning("sampling failed for one request: %s", err)
                self._end(g, error=ServeError(500, f"sampling failed for this request ({type(err).__name__}: "
                                                   f"{err})", code="sampling_failed"))
        return tokens

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
        self.batch.keep_rows(keep)

    def _choose(self, logits: Tensor, g: Generation) -> int:
        """``g``'s next token from its row of logits (penalties, then sampling); its log-probability under the
        model's own distribution noted when asked for."""
        token = sample_token(penalize(logits, g.params, g.prompt_ids, g.generated), g.params, g.generator)
        if g.params.logprobs is not None:
            g.last_logprob = token_logprobs(logits, token, g.params.logprobs)
        return token

    def _note_logprob(self, g: Generation, token: int) -> None:
        if g.last_logprob is not None:
            logprob, top = g.last_logprob
            text = self._detokenizer.decode
            g.logprobs.append((text([token]), logprob, [(text([t]), lp) for t, lp in top]))
            g.last_logprob = None

    @staticmethod
    def _unsent_logprobs(g: Generation) -> list[TokenLogprob] | None:
        if g.params.logprobs is None:
            return None
        unsent, g.logprobs_sent = g.logprobs[g.logprobs_sent:], len(g.logprobs)
        return unsent

    def _advance(self, g: Generation, token: int) -> bool:
        """Record ``token`` for ``g`` and emit what can be shown; True when ``g`` is finished (and ended)."""
        if g.cancelled:
            self._end(g)
            return True
        if token in self.eos_ids:
            self._end(g, "stop")
            return True
        g.generated.append(token)
        self._note_logprob(g, token)
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
        shown = len(text) - held_back(text, g.stop)
        if g.stream and shown > g.sent:
            g.emit(Event(g.index, text[g.sent:shown], logprobs=self._unsent_logprobs(g)))
            g.sent = shown
        return False

    def _end(self, g: Generation, reason: str | None = None, error: ServeError | None = None) -> None:
        """Finish ``g`` once: free its adapter, tell its handler (nothing for a cancelled one)."""
        if g.finished:
            return
        g.finished = True
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
                         completion_tokens=len(g.generated), logprobs=self._unsent_logprobs(g)))
            g.sent = len(g.text)

    # -- classification ----------------------------------------------------------------------------------
    def _classify_pending(self) -> None:
        """Every waiting classification request in one mixed-adapter forward."""
        jobs = self._admit_classifications()
        try:
            if jobs:
                texts = [t for job in jobs for t in job.texts]
                adapters = [job.adapter for job in jobs for _ in job.texts]
                enc = self._detokenizer(texts, padding=True, truncation=True, max_length=self.context,
                                        return_tensors="pt").to(self.device)
                with self._route(adapters):
                    logits = self.model(**enc).logits.float()
                probs = torch.softmax(logits, dim=-1).cpu()
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
            for job in jobs:
                self.adapters.release(job.adapter)

    def _admit_classifications(self) -> list[Classification]:
        """The waiting classifications whose adapter could be acquired (the others wait or fail)."""
        jobs = []
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
            jobs.append(job)
        return grouped_by_adapter(jobs)


_Request = TypeVar("_Request", "Generation", "Classification")


def grouped_by_adapter(requests: list[_Request]) -> list[_Request]:
    """``requests`` with those on one adapter made adjacent (adapters in order of first arrival, requests in arrival
    order within each), so a batch built from them has one run of rows per adapter: linear LoRA layers then fold each
    adapter into its own weight on long prompts (`LoraLinear._folded_runs`), and layers that apply each adapter to
    its rows apart (`routing.per_adapter`: embeddings, convolutions) read them as slices, not gathered copies."""
    first: dict[str | None, int] = {}
    for request in requests:
        first.setdefault(request.adapter, len(first))
    return sorted(requests, key=lambda request: first[request.adapter])
