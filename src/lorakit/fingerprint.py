"""Fingerprint of the base model an adapter is applied to: which weights, exactly, it was trained on.

`save_adapter` records it in the file; `load_adapter` recomputes it on the model at hand and refuses an adapter
saved for other weights (another checkpoint, a merged model) unless forced. An adapter trained on a rounded copy
of a base (``train.dtype: bf16`` stores an fp32 checkpoint's weights in bf16) is accepted on the full-precision
base when the base, rounded the same way, gives the recorded hash (`verify`): the same checkpoint, as PEFT users
apply adapters trained on a bf16 or quantized copy to the original weights.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .errors import AdapterError, AdapterStateError
from .inject import targeting_report
from .layers import LoraLayer, LoraParameter, wrapper_for

_UNWRAPPED = re.compile(r"\.base_layer\b")  # nested parameter wrappers -> the owning module

FINGERPRINT_ALGORITHM = "sha256-16MiB-chunks-v1"
_CHUNK = 16 << 20


#: evenly spaced elements of a weight kept with its cached hash and compared before the hash is reused
SAMPLE = 64


def _tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw bytes of a tensor (no copy for a contiguous CPU tensor)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _signature(tensor: Tensor) -> tuple:
    """What identifies a tensor's current content without reading it all: its storage, layout and autograd's
    version counter (bumped by every in-place write through the tensor), plus a few evenly spaced elements —
    ``param.data.copy_(...)`` writes through an alias with a counter of its own, and ``param.data = t`` swaps
    the storage, so both are caught too."""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    sample = flat[torch.linspace(0, n - 1, min(n, SAMPLE), device=flat.device).long()] if n else flat
    return (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tuple(tensor.stride()),
            tensor.storage_offset(), tensor.dtype, str(tensor.device), sample.cpu().view(torch.uint8).numpy().tobytes())


class _HashCache:
    """sha256 of each base weight's bytes, reused while the weight is unchanged (see `_signature`): saving and
    loading adapters of one base hash its weights once, not on every call (SmolLM2 all-linear: 425 MB)."""

    def __init__(self) -> None:
        # by id (tensors compare elementwise, so no WeakKeyDictionary); an entry leaves with its tensor
        self._entries: dict[int, tuple[weakref.ref, tuple, bytes, int]] = {}
        self._lock = threading.RLock()  # a weakref callback may run inside a locked section (GC)

    def get(self, tensor: Tensor, signature: tuple) -> tuple[bytes, int] | None:
        with self._lock:
            entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor or entry[1] != signature:
            return None
        return entry[2], entry[3]

    def put(self, tensor: Tensor, signature: tuple, sha: bytes, nbytes: int) -> None:
        key = id(tensor)
        ref = weakref.ref(tensor, lambda _, key=key: self._drop(key))
        with self._lock:
            self._entries[key] = (ref, signature, sha, nbytes)

    def _drop(self, key: int) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is None:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


#: the process-wide cache `base_fingerprint` uses (`clear_cache` empties it)
_CACHE = _HashCache()


def clear_cache() -> None:
    """Forget every cached weight hash (the next fingerprint reads all bytes again)."""
    _CACHE.clear()


def _hash_all(tensors: Sequence[Tensor]) -> list[tuple[bytes, int]]:
    """``(sha256 of the bytes, byte count)`` per tensor, hashed in 16 MiB chunks on a thread pool (hashlib
    releases the GIL), so the result does not depend on the thread count."""
    if not tensors:  # every base weight's hash was cached: no thread pool to start
        return []
    views = [_tensor_bytes(t) for t in tensors]
    chunks = [(i, view[start:start + _CHUNK]) for i, view in enumerate(views)
              for start in range(0, max(len(view), 1), _CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda job: hashlib.sha256(job[1]).digest(), chunks))
    per_item: list[list[bytes]] = [[] for _ in tensors]
    for (i, _), d in zip(chunks, digests):
        per_item[i].append(d)
    return [(hashlib.sha256(b"".join(parts)).digest(), len(view)) for parts, view in zip(per_item, views)]


def digest(items: Sequence[tuple[str, Tensor]], cache: bool = False,
           cast: torch.dtype | None = None) -> tuple[str, int]:
    """sha256 over ``(name, shape, dtype, sha256 of the bytes)`` per tensor, in order; also the byte count.

    With ``cache`` each tensor's hash is reused while its `_signature` is unchanged (base weights); without it
    every byte is read (adapter tensors, fresh copies each time). ``cast``: hash each tensor as rounded to that
    dtype, one rounded copy alive at a time (never cached).
    """
    hashes: list[tuple[bytes, int] | None] = [None] * len(items)
    signatures = [_signature(t) for _, t in items] if cache and cast is None else []
    if signatures:
        hashes = [_CACHE.get(t, sig) for (_, t), sig in zip(items, signatures)]
    todo = [i for i, h in enumerate(hashes) if h is None]
    if cast is not None:  # a rounded copy of a large base at once would cost half the base again
        results = [_hash_all([items[i][1].detach().to(cast)])[0] for i in todo]
    else:
        results = _hash_all([items[i][1] for i in todo])
    for i, result in zip(todo, results):
        hashes[i] = result
        if signatures:
            _CACHE.put(items[i][1], signatures[i], *result)
    total = hashlib.sha256()
    for (name, tensor), (sha, _) in zip(items, hashes):
        total.update(f"{name}\0{tuple(tensor.shape)}\0{str(cast or tensor.dtype)}\0".encode())
        total.update(sha)
    return total.hexdigest(), sum(n for _, n in hashes)


def _base_weights(model: nn.Module, names: Iterable[str]) -> list[tuple[str, Tensor]]:
    """``(module name, base weight)`` of each named module, sorted; every problem an `AdapterError`."""
    modules = dict(model.named_modules())
    items = []
    for name in sorted(set(names)):
        module = modules.get(name)
        if isinstance(module, LoraParameter):  # recorded under its target's name (module.parameter), as unwrapped
            name = _UNWRAPPED.sub("", name) + "." + module.parameter_name
        elif module is None:
            module = _parameter_owner(modules, name)
        elif (wrapped := getattr(wrapper_for(module), "wrapped_parameter", None)) is not None:
            name, module = f"{name}.{wrapped}", LoraParameter(module, wrapped)  # as once wrapped (attention)
        if module is None:
            raise AdapterError(f"cannot fingerprint module {name!r}: the model has no such module")
        if isinstance(module, LoraLayer):
            if module.merged_adapters:
                raise AdapterStateError(f"adapters {module.merged_adapters} are merged into {name}; its weight is not "
                                        "the base weight any more: unmerge(model) first")
            weight = module.weight  # the base weight (for a parameter target: that parameter)
        else:
            weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise AdapterError(f"cannot fingerprint module {name!r}: it has no weight tensor")
        if weight.device.type == "meta":
            raise AdapterError(f"cannot fingerprint module {name!r}: its weight is on the meta device (not loaded)")
        items.append((name, weight))
    return sorted(items, key=lambda item: item[0])


def _parameter_owner(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    """For ``module.parameter`` (a ``target_parameters`` entry): the `LoraParameter` wrapping it, or a stand-in
    reading it from the unwrapped module; None when there is no such parameter."""
    owner_name, _, param_name = name.rpartition(".")
    module = modules.get(owner_name)
    while isinstance(module, LoraParameter):
        if module.parameter_name == param_name:
            return module
        module = module.base_layer
    if module is None or not isinstance(getattr(module, param_name, None), Tensor):
        return None
    return LoraParameter(module, param_name)  # not attached to the model: reads the parameter, changes nothing


def base_fingerprint(model: nn.Module, targets: LoraConfig | Iterable[str], tokenizer: Any = None,
                     as_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Fingerprint of the base weights an adapter is applied to.

    Hashes the name, shape, dtype and every byte of the ``weight`` of each targeted module (the base layer's, never
    a LoRA tensor), plus the tokenizer's vocabulary size when given; records the weights' dtype when they share
    one. ``targets`` is a `LoraConfig` (the modules it selects) or module names. ``as_dtype``: the fingerprint of
    the weights rounded to that dtype (what a base stored in it from these weights records; see `verify`).

    Each weight's hash is cached while the weight is unchanged (storage, version counter, layout and a sample of
    its elements), so saving or loading adapters of one base reads its bytes once. Compute it *before*
    `inject` for ``init="pissa"``: PiSSA replaces the base weights by a residual.
    Raises `AdapterStateError` when an adapter is merged into a targeted weight (unmerge first).
    """
    if isinstance(targets, LoraConfig):
        names = [row.name for row in targeting_report(model, targets).targeted]
    else:
        names = list(targets)
    items = _base_weights(model, names)
    sha, nbytes = digest(items, cache=True, cast=as_dtype)
    dtypes = {as_dtype or tensor.dtype for _, tensor in items}
    return {"algorithm": FINGERPRINT_ALGORITHM, "sha256": sha, "modules": len(items), "bytes": nbytes,
            "vocab_size": None if tokenizer is None else len(tokenizer),
            "dtype": str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None}


#: dtypes a base may be stored in for training (``train.dtype``), by the name fingerprints record
ROUNDED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def verify(model: nn.Module, names: Iterable[str], stored: Mapping[str, Any],
           tokenizer: Any = None) -> tuple[str | None, str | None]:
    """``(why the model's base is not the one ``stored`` was taken from, or None; a note when it is, but at
    another precision)``. An adapter saved on a bf16/fp16 copy of a base matches the full-precision base when
    the targeted weights, rounded to that dtype, give the recorded hash: the same checkpoint. The other way
    round (a bf16 base, a fingerprint of fp32 weights) cannot be checked: the rounding lost the bytes."""
    names = list(names)
    current = base_fingerprint(model, names, tokenizer)
    difference = fingerprint_difference(stored, current)
    rounded = ROUNDED_DTYPES.get(str(stored.get("dtype")))
    if difference is None or rounded is None or current.get("dtype") != "float32":
        return difference, None
    if fingerprint_difference(stored, base_fingerprint(model, names, tokenizer, as_dtype=rounded)) is not None:
        return difference, None
    return None, (f"trained on a {stored['dtype']} copy of these float32 weights (the same checkpoint, "
                  f"rounded): applied to the float32 weights")


def fingerprint_difference(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Why two fingerprints differ, in words, or None when they agree."""
    if stored.get("algorithm") != current["algorithm"]:
        return f"fingerprint algorithm {stored.get('algorithm')!r} is not lorakit's {current['algorithm']!r}"
    reasons = []
    if stored.get("vocab_size") is not None and current["vocab_size"] is not None \
            and stored["vocab_size"] != current["vocab_size"]:
        reasons.append(f"tokenizer vocabulary {current['vocab_size']} != {stored['vocab_size']}")
    if stored.get("sha256") != current["sha256"]:
        what = "different weights"
        if stored.get("modules") != current["modules"] or stored.get("bytes") != current["bytes"]:
            what = (f"{current['modules']} targeted modules / {current['bytes']} bytes here, "
                    f"{stored.get('modules')} / {stored.get('bytes')} when saved")
        reasons.append(f"weights hash {current['sha256'][:12]} != {str(stored.get('sha256'))[:12]} ({what})")
    return "; ".join(reasons) or None


__all__ = ["FINGERPRINT_ALGORITHM", "ROUNDED_DTYPES", "base_fingerprint", "clear_cache", "digest",
           "fingerprint_difference", "verify"]
