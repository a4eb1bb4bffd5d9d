"""The adapters a server knows and those loaded on its model: registered folders and ``--adapter-dir/NAME``
entries, loaded on first use, the least recently used unloaded when ``max_adapters`` are held."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

from ..adapters import delete_adapter
from ..errors import LorakitError
from .config import ADAPTER_NAME, ServeError
from .metrics import Metrics

log = logging.getLogger(__name__)


class AdapterPool:
    """The adapters a server knows (registered folders, and ``adapter_dir/NAME``) and those loaded on the model.

    Loading and unloading change the model, so they run on the engine thread only; `resolve`, `dir_entry` and
    `listing` are safe from any thread. At most ``max_loaded`` adapters sit on the model; loading one more
    unloads the least recently used adapter that no active generation uses (none free: the request waits).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, base_name: str, adapter_dir: str | os.PathLike | None,
                 max_loaded: int, metrics: Metrics, max_bytes: int | None = None) -> None:
        if max_loaded < 1:
            raise ServeError(400, f"max_adapters must be >= 1, got {max_loaded}")
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        if self.adapter_dir is not None and not self.adapter_dir.is_dir():
            raise ServeError(400, f"--adapter-dir {adapter_dir} is not a folder")
        self.max_loaded, self.metrics = max_loaded, metrics
        #: largest adapter folder (bytes) read; default: the base model's own parameter bytes
        self.max_bytes = max_bytes if max_bytes is not None else sum(
            p.numel() * p.element_size() for p in model.parameters())
        self.registered: dict[str, Path] = {}
        self.removed: set[str] = set()  # adapter-directory entries unloaded by DELETE: hidden until added again
        #: set by `cast`: the base was converted from the dtype adapters were checked against; only adapters
        #: verified before (folder -> file signature) load from then on
        self.cast_from: torch.dtype | None = None
        self.verified: dict[Path, tuple] = {}
        self.failed: dict[Path, str] = {}  # folders that did not pass that check, with the reason
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
        if self.dir_entry(model) is not None:
            return model
        raise ServeError(404, f"model {model!r} does not exist: not the base ({self.base_name!r}), not a loaded "
                              "adapter" + (", not a folder in the adapter directory" if self.adapter_dir else "")
                         + "; GET /v1/models lists them", code="model_not_found", param="model")

    def dir_entry(self, name: str, removed_too: bool = False) -> Path | None:
        """``adapter_dir/name`` when it holds an adapter, else None. Only plain names are looked up: anything
        that could be a path (``/``, ``..``) is refused before the filesystem is touched, and a folder or a file
        in it that a symlink leads out of the adapter directory is refused too. Entries removed by DELETE count
        only with ``removed_too`` (adding one again)."""
        if self.adapter_dir is None or not ADAPTER_NAME.fullmatch(name) or (name in self.removed
                                                                            and not removed_too):
            return None
        folder = (self.adapter_dir / name).resolve()
        if folder.parent != self.adapter_dir or not (folder / "adapter_config.json").is_file():
            return None
        try:
            if any(self.adapter_dir not in entry.resolve().parents for entry in folder.iterdir()):
                log.warning("adapter folder %s holds a symlink out of %s: refused", folder, self.adapter_dir)
                return None
        except OSError:
            return None
        return folder

    def source(self, name: str) -> Path | None:
        """The folder adapter ``name`` loads from (registered, else the adapter directory's), or None."""
        with self._lock:
            path = self.registered.get(name)
        return path if path is not None else self.dir_entry(name)

    def listing(self) -> list[tuple[str, bool]]:
        """(name, loaded) of every known adapter: registered, loaded, and those in the adapter folder."""
        with self._lock:
            names = dict.fromkeys([*self.registered, *self.loaded])
            loaded = set(self.loaded)
        if self.adapter_dir is not None:
            for entry in sorted(self.adapter_dir.iterdir()):
                if entry.name not in names and self.dir_entry(entry.name) is not None:
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
        """One generation less uses ``name`` (the counterpart of a successful `acquire`)."""
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
            self.removed.discard(name)

    def remove(self, name: str) -> None:
        """Unload ``name`` and forget it: a registered adapter is unregistered, an adapter-directory entry is
        hidden (from /v1/models and from requests) until it is added again (POST /v1/adapters)."""
        in_dir = self.dir_entry(name) is not None
        if name not in self.registered and name not in self.loaded and not in_dir:
            raise ServeError(404, f"adapter {name!r} is neither registered, loaded nor in the adapter directory",
                             code="model_not_found")
        if self.in_use[name]:
            raise ServeError(409, f"adapter {name!r} is used by {self.in_use[name]} running request(s); retry when "
                                  "they finish", code="adapter_in_use")
        if name in self.loaded:
            self._unload(name)
        with self._lock:
            self.registered.pop(name, None)
            if in_dir:
                self.removed.add(name)

    def _make_room(self) -> bool:
        while len(self.loaded) >= self.max_loaded:
            victim = next((n for n in self.loaded if not self.in_use[n]), None)
            if victim is None:
                return False
            self._unload(victim)
        return True

    def _load(self, name: str, path: Path) -> None:
        from ..io import load_adapter, read_adapter_config

        self._check_size(name, path)
        try:
            if read_adapter_config(path).init == "pissa":
                raise ServeError(422, f"adapter {name!r} is a PiSSA adapter, which rewrites the base weights every "
                                      "other adapter shares; export it as plain LoRA first (lorakit export --target "
                                      "peft)", code="adapter_load_failed")
            verified = self._verified_before(name, path)
            with warnings.catch_warnings():  # a verified adapter on the converted base: not "another base"
                if verified:
                    warnings.filterwarnings("ignore", message=r".*loading anyway \(force=True\)")
                load_adapter(self.model, path, adapter_name=name, tokenizer=self.tokenizer, force=verified)
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

    def cast(self, dtype: torch.dtype) -> None:
        """Verify every adapter known now against the base as loaded (its fingerprint is taken in the dtype the
        adapters were saved against), then convert the model — loaded adapters included — to ``dtype``. From then
        on an adapter loads only if it was verified here and its files are unchanged: a base converted to
        another dtype no longer matches any stored fingerprint, and loading unchecked would risk serving an
        adapter on the wrong base."""
        loaded = set(self.loaded)
        for name, _ in self.listing():
            path = self.source(name)
            if name not in loaded:
                try:
                    self._load(name, path)
                except ServeError as err:
                    log.warning("adapter %s is not served: %s", name, err.message)
                    self.failed[path] = err.message
                    continue
                self._unload(name)
            self.verified[path] = _signature(path)
        self.cast_from = next(self.model.parameters()).dtype
        self.model.to(dtype)
        self.version += 1

    def _verified_before(self, name: str, path: Path) -> bool:
        """False while the base is as loaded (the fingerprint is checked); once it is cast, True for an adapter
        verified by `cast` whose files did not change, else a 422."""
        if self.cast_from is None:
            return False
        if path in self.failed:
            raise ServeError(422, self.failed[path], code="adapter_load_failed")
        if self.verified.get(path) != _signature(path):
            raise ServeError(422, f"adapter {name!r} was not verified against the base: this server converted the "
                                  f"base from {self.cast_from} (--dtype), after which fingerprints cannot be "
                                  "checked; put the adapter in --adapter-dir (or --adapter) and restart the server",
                             code="adapter_unverified")
        return True

    def _check_size(self, name: str, path: Path) -> None:
        """Refuse a folder whose files add up to more than ``max_bytes`` before anything in it is read."""
        try:
            size = sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())
        except OSError as err:
            raise ServeError(422, f"adapter {name!r} cannot be read: {err}", code="adapter_load_failed") from err
        if size > self.max_bytes:
            raise ServeError(422, f"adapter {name!r} is {size} bytes, over this server's limit of {self.max_bytes} "
                                  "(--max-adapter-bytes; default: the base model's size)", code="adapter_too_large")

    def _unload(self, name: str) -> None:
        delete_adapter(self.model, name)
        self.on_unload(name)
        self.version += 1
        with self._lock:
            del self.loaded[name]
        self.metrics.add(adapter_unloads=1)
        log.info("unloaded adapter %s", name)


def _signature(folder: Path) -> tuple:
    """(name, size, mtime) of every file in ``folder``: an adapter verified once is trusted while it holds."""
    return tuple(sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                        for entry in folder.iterdir() if entry.is_file()))
