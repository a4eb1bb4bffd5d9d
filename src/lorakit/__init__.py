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
from .export import adapter_info, export_adapter, merge_to_folder
from .fingerprint import base_fingerprint
from .io import (adapter_state_dict, load_adapter, load_adapters,
                 read_adapter, save_adapter, save_adapters)

__version__ = "0.1.0"

__all__ = [
    "LAYER_REGISTRY", "AdapterError", "AdapterStateError", "ConfigError", "DataError", "LoadedModel", "LoraConfig",
    "LoraLayer", "LorakitError", "ModelLoadError", "TargetError", "TargetingReport", "active_adapters",
    "adapter_info", "adapter_names", "adapter_state_dict", "add_adapter", "add_weighted_adapter",
    "base_fingerprint", "delete_adapter", "disable_adapters", "export_adapter", "get_config", "inject",
    "load_adapter", "load_adapters", "load_dataset", "load_model", "merge", "merge_to_folder", "read_adapter",
    "register_layer", "route", "save_adapter", "save_adapters", "set_adapter", "targeting_report",
    "trainable_parameters", "unload", "unmerge",
]
