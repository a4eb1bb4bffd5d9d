"""lorakit: Low-Rank Adaptation for any PyTorch model, PEFT-compatible.

```python
from lorakit import LoraConfig, inject
model = inject(model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"]))
```
"""

from .adapters import (
    active_adapters,
    adapter_names,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    get_config,
    merge,
    route,
    set_adapter,
    unload,
    unmerge,
)
from .config import LoraConfig
from .errors import AdapterError, AdapterStateError, ConfigError, LorakitError, TargetError
from .inject import TargetingReport, add_adapter, inject, targeting_report, trainable_parameters
from .layers import LAYER_REGISTRY, LoraLayer, register_layer
from .models import LoadedModel, ModelLoadError, load_model
from .data import DataError, load_dataset

__version__ = "0.1.0"

__all__ = [
    "LAYER_REGISTRY", "AdapterError", "AdapterStateError", "ConfigError", "LoraConfig", "LoraLayer",
    "LorakitError", "TargetError", "TargetingReport", "active_adapters", "adapter_names", "add_adapter",
    "add_weighted_adapter", "delete_adapter", "disable_adapters", "get_config", "inject", "merge",
    "register_layer", "route", "LoadedModel", "ModelLoadError", "load_model", "DataError", "load_dataset", "set_adapter", "targeting_report", "trainable_parameters", "unload", "unmerge",
]
