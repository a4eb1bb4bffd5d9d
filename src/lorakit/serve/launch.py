"""Starting a server: `build_engine` loads a base model and its adapters; `ServerThread` runs uvicorn on a
background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from .config import ADAPTER_NAME, ServeConfig, ServeError, resolve_device, resolve_dtype
from .engine import Engine


def build_engine(base: str, task: str = "causal-lm", adapters: dict[str, str] | None = None,
                 adapter_dir: str | None = None, name: str | None = None, num_labels: int | None = None,
                 config: ServeConfig | None = None) -> Engine:
    """Load ``base``, then the named adapters (validated against the base), into an engine (not started) on
    ``config.device`` in ``config.dtype``. Device, dtype and adapter names are checked before anything loads."""
    from ..models import load_model

    config = config or ServeConfig()
    resolve_device(config.device)
    resolve_dtype(config.dtype)
    for adapter_name in adapters or {}:
        if not ADAPTER_NAME.fullmatch(adapter_name):
            raise ServeError(400, f"invalid adapter name {adapter_name!r}: use letters, digits, '-' and '_'")
    loaded = load_model(base, task=task, num_labels=num_labels)
    return Engine(loaded.model, loaded.tokenizer, task, name or base, config, adapter_dir, adapters)


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

    def __enter__(self) -> ServerThread:
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
