"""Fingerprint of the base model an adapter is applied to: which weights, exactly, it was trained on.

`save_adapter` records it in the file; `load_adapter` recomputes it on the model at hand and refuses an adapter
saved for other weights (another checkpoint, another dtype, a merged model) unless forced.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .errors import AdapterError, AdapterStateError
from .inject import targeting_report
from .layers import LoraLayer

FINGERPRINT_ALGORITHM = "sha256-16MiB-chunks-v1"
_CHUNK = 16 << 20


def _tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw bytes of a tensor (no copy for a contiguous CPU tensor)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def digest(items: Sequence[tuple[str, Tensor]]) -> tuple[str, int]:
    """sha256 over ``(name, shape, dtype, sha256 of the bytes)`` per tensor, in order; also the byte count.

    Bytes are hashed in 16 MiB chunks on a thread pool (hashlib releases the GIL), so the result does not
    depend on the thread count and large models hash at several GB/s.
    """
    views = [_tensor_bytes(t) for _, t in items]
    chunks = [(i, view[start:start + _CHUNK]) for i, view in enumerate(views)
              for start in range(0, max(len(view), 1), _CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda job: hashlib.sha256(job[1]).digest(), chunks))
    per_item: list[list[bytes]] = [[] for _ in items]
    for (i, _), d in zip(chunks, digests):
        per_item[i].append(d)
    total = hashlib.sha256()
    for (name, tensor), parts in zip(items, per_item):
        total.update(f"{name}\0{tuple(tensor.shape)}\0{str(tensor.dtype)}\0".encode())
        total.update(hashlib.sha256(b"".join(parts)).digest())
    return total.hexdigest(), sum(len(v) for v in views)


def _base_weights(model: nn.Module, names: Iterable[str]) -> list[tuple[str, Tensor]]:
    """``(module name, base weight)`` of each named module, sorted; every problem an `AdapterError`."""
    modules = dict(model.named_modules())
    items = []
    for name in sorted(set(names)):
        module = modules.get(name)
        if module is None:
            raise AdapterError(f"cannot fingerprint module {name!r}: the model has no such module")
        if isinstance(module, LoraLayer):
            if module.merged_adapters:
                raise AdapterStateError(f"adapters {module.merged_adapters} are merged into {name}; its weight is not "
                                        "the base weight any more: unmerge(model) first")
            module = module.base_layer
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise AdapterError(f"cannot fingerprint module {name!r}: it has no weight tensor")
        if weight.device.type == "meta":
            raise AdapterError(f"cannot fingerprint module {name!r}: its weight is on the meta device (not loaded)")
        items.append((name, weight))
    return items


def base_fingerprint(model: nn.Module, targets: LoraConfig | Iterable[str], tokenizer: Any = None) -> dict[str, Any]:
    """Fingerprint of the base weights an adapter is applied to.

    Hashes the name, shape, dtype and every byte of the ``weight`` of each targeted module (the base layer's, never
    a LoRA tensor), plus the tokenizer's vocabulary size when given. ``targets`` is a `LoraConfig` (the modules
    it selects) or module names. A base loaded in another dtype counts as another base.

    Compute it *before* `inject` for ``init="pissa"``: PiSSA replaces the base weights by a residual.
    Raises `AdapterStateError` when an adapter is merged into a targeted weight (unmerge first).
    """
    if isinstance(targets, LoraConfig):
        names = [row.name for row in targeting_report(model, targets).targeted]
    else:
        names = list(targets)
    items = _base_weights(model, names)
    sha, nbytes = digest(items)
    return {"algorithm": FINGERPRINT_ALGORITHM, "sha256": sha, "modules": len(items), "bytes": nbytes,
            "vocab_size": None if tokenizer is None else len(tokenizer)}


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


__all__ = ["FINGERPRINT_ALGORITHM", "base_fingerprint", "digest", "fingerprint_difference"]
