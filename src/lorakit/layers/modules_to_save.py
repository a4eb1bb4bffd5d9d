"""`ModulesToSave`: a module trained in full per adapter (a classifier head), as PEFT's ``ModulesToSaveWrapper``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..routing import Routing


class ModulesToSave(nn.Module):
    """A module trained in full for each adapter (e.g. a classifier head), as PEFT's ``ModulesToSaveWrapper``:
    ``original_module`` stays frozen, ``modules_to_save[name]`` is adapter ``name``'s trainable copy."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.routing: Routing | None = None

    def add(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.modules_to_save[name] = clone

    def remove(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters())

    def active_module(self) -> nn.Module:
        """The first active adapter's copy (PEFT's rule), or the original when none/disabled."""
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.routing is None or self.disabled:
            return self.active_module()(x, *args, **kwargs)
        # mixed batch: the original on every row, then each adapter's copy on its own rows
        runs = self.routing.runs()
        if runs is not None:  # contiguous rows per adapter: each row runs only through its own module
            parts = []
            for (j, _, _), xr in zip(runs, x.split([stop - start for _, start, stop in runs])):
                name = self.routing.names[j] if j >= 0 else None
                module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
                parts.append(module(xr, *args, **kwargs))
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        out = self.original_module(x, *args, **kwargs)
        for j, name in enumerate(self.routing.names):
            rows = (self.routing.index == j).nonzero().squeeze(1)
            if name in self.modules_to_save and rows.numel():
                part = self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs)
                out = out.index_copy(0, rows, part)
        return out
