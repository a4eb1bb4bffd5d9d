"""The one registry of layer types lorakit adapts: ``{layer type: LoRA wrapper}``, looked up along the MRO."""

from __future__ import annotations

import sys

from torch import nn

from .base import LoraLayer

#: layer type -> LoRA wrapper. Lookup walks the type's MRO, so subclasses work too (a subclass that overrides
#: ``forward`` is skipped with the reason unless its wrapper runs through that forward: see `LoraLayer.skip_reason`).
LAYER_REGISTRY: dict[type[nn.Module], type[LoraLayer]] = {}


def register_layer(layer_type: type[nn.Module], wrapper: type[LoraLayer]) -> None:
    """Teach lorakit a new layer type: ``register_layer(MyLinear, MyLoraLinear)``."""
    if not (isinstance(wrapper, type) and issubclass(wrapper, LoraLayer)):
        raise TypeError(f"wrapper must be a subclass of lorakit.layers.LoraLayer, got {wrapper!r}")
    LAYER_REGISTRY[layer_type] = wrapper


def registered_type(module: nn.Module) -> type[nn.Module] | None:
    """The registered class ``module`` is an instance of (its own class or the nearest base class), else None."""
    _register_transformers_layers()
    return next((cls for cls in type(module).__mro__ if cls in LAYER_REGISTRY), None)


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The registered wrapper for ``module``'s type (or a base class of it), else None."""
    owner = registered_type(module)
    return None if owner is None else LAYER_REGISTRY[owner]


def _register_transformers_layers() -> None:
    # transformers is imported only if the user's model already did; GPT-2 style Conv1D lives there.
    if "transformers" not in sys.modules or getattr(_register_transformers_layers, "done", False):
        return
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old/new transformers
        return
    from .linear import LoraConv1D

    LAYER_REGISTRY.setdefault(Conv1D, LoraConv1D)
    _register_transformers_layers.done = True  # type: ignore[attr-defined]
