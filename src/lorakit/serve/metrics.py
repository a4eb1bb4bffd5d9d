"""Prometheus counters and histograms of a server (text exposition format, no dependency), and the ASGI
middleware that counts and times every HTTP request."""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import Counter
from typing import Any, Callable

#: upper bounds (seconds) of the latency and time-to-first-token buckets
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Histogram:
    """Counts of observed values per bucket (``buckets``: upper bounds, ascending; one more for +Inf)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        """Cumulative ``_bucket`` lines, then ``_sum`` and ``_count``, as Prometheus expects."""
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            running += count
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.total}", f"{name}_count{suffix} {running}"]
        return out


#: counters rendered as ``lorakit_NAME``: attribute of `Metrics` -> help text
_COUNTERS = {
    "prompt_tokens": "Prompt tokens prefilled.",
    "prefix_cache_tokens": "Prompt tokens whose keys/values came from the prefix cache.",
    "generated_tokens": "Tokens generated.",
    "decode_steps": "Batched decoding steps.",
    "adapter_loads": "Adapters loaded onto the model.",
    "adapter_unloads": "Adapters unloaded (LRU or DELETE).",
    "cancelled": "Generations dropped because their client went away.",
    "prefill_chunks": "Chunks of prompts longer than --max-prefill-tokens, prefilled between decoding steps.",
}


class Metrics:
    """Counters and histograms shared by the HTTP handlers and the engine thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram((1, 2, 4, 8, 16, 32, 64, 128, 256))
        for name in _COUNTERS:
            setattr(self, name, 0)

    def request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def add(self, **counts: float) -> None:
        """Add to counters by name (``add(generated_tokens=1)``)."""
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
            for name, help_text in _COUNTERS.items():
                out += [f"# HELP lorakit_{name}_total {help_text}", f"# TYPE lorakit_{name}_total counter",
                        f"lorakit_{name}_total {getattr(self, name)}"]
        for name, (help_text, value) in gauges.items():
            out += [f"# HELP lorakit_{name} {help_text}", f"# TYPE lorakit_{name} gauge", f"lorakit_{name} {value}"]
        return "\n".join(out) + "\n"


#: endpoints counted under their own label (anything else: "other", so scanners cannot grow the label set)
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models", "/v1/adapters", "/health",
              "/metrics", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label of a request path (path parameters folded into one label)."""
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in _ENDPOINTS else "other"


class MetricsMiddleware:
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
            self.metrics.request(scope["method"], endpoint_label(scope["path"]), status[0],
                                 time.perf_counter() - started)
