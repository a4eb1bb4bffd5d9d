"""Measured memory on any device: the peak bytes of live tensors (what ``torch.cuda.max_memory_allocated``
reports on a GPU, counted on a CPU too) and the process's resident-set high-water mark.

`LiveTensorBytes` is a `TorchDispatchMode`: it sees every tensor an op returns (forward, backward,
recomputation under gradient checkpointing, the optimizer step), counts each storage once (views share it) and
drops it when Python frees the storage. Tensors that exist before the mode starts (parameters, buffers) are
passed in. Used to check `lorakit.plan` against real training steps; it does not depend on other processes, so
its figures hold on a busy machine.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes(model.parameters()) as tracker: ...``; then ``tracker.peak`` (bytes)."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage address -> bytes
        self.current = self.peak = 0
        for tensor in existing:
            self.track(tensor)

    def track(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage until it is freed (once, however many views of it are seen)."""
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and item.device.type != "meta":
                self.track(item)
        return out


def resident_kib(field: str = "VmRSS") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (high-water mark) of this process from /proc/self/status, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field} (Linux only)")


def reset_peak_resident() -> None:
    """Reset this process's ``VmHWM`` to its current resident set (Linux ``clear_refs``), so a later peak
    belongs to what ran after this call."""
    Path("/proc/self/clear_refs").write_text("5")
